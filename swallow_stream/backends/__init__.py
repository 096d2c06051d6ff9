"""Backends behind one contract (`base.Backend`): the in-process engine and a remote
OpenAI-compatible server."""

from .base import Backend, open_astream, open_stream

__all__ = ["Backend", "open_astream", "open_stream"]
