"""Clients for a running swallow-stream server."""

from .ws_client import AsyncWSStream, UnauthorizedError, WSStream, aws_stream, ws_stream

__all__ = ["AsyncWSStream", "UnauthorizedError", "WSStream", "aws_stream", "ws_stream"]
