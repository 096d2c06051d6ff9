"""Backends other than the in-process engine (which lives in swallow_stream.api.LocalBackend)."""

from .remote import RemoteBackend, RemoteBackendError

__all__ = ["RemoteBackend", "RemoteBackendError"]
