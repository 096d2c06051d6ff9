"""Clients for a running swallow-stream server."""

from ..errors import UnauthorizedError
from .ws_client import WSSource, aws_stream, ws_stream, ws_url

__all__ = ["UnauthorizedError", "WSSource", "aws_stream", "ws_stream", "ws_url"]
