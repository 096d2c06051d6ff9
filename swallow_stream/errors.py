"""Errors every front door maps to its own shape (WebSocket `error` frames, OpenAI errors)."""

from __future__ import annotations


class SwallowError(Exception):
    """Base class. `code` is the WebSocket error code; `status` the HTTP status."""

    code = "internal"
    status = 500


class InvalidRequestError(SwallowError, ValueError):
    """The request itself is wrong (bad messages, bad parameters). Nothing ran."""

    code = "invalid_request"
    status = 400


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"
    status = 400


class OverloadedError(SwallowError):
    """The engine's queue is full; retry later."""

    code = "overloaded"
    status = 429


class ModelNotFoundError(SwallowError):
    code = "not_found"
    status = 404


class CheckpointError(SwallowError, ValueError):
    """A checkpoint that cannot be loaded: missing files, wrong shapes, truncated, wrong architecture."""

    code = "internal"
    status = 500
