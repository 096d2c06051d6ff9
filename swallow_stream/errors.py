"""Every error swallow-stream raises, and the one table that maps them onto each wire.

A class names its `code` (the WebSocket `error` frame's code); the HTTP status and the OpenAI
error type follow from the code through `WIRE`, so no front door keeps a table of its own.
"""

from __future__ import annotations

from typing import NamedTuple


class Wire(NamedTuple):
    status: int  # HTTP status
    openai_type: str  # OpenAI error "type"
    openai_code: str  # OpenAI error "code"


WIRE: dict[str, Wire] = {
    "invalid_request": Wire(400, "invalid_request_error", "invalid_request"),
    "context_length_exceeded": Wire(400, "invalid_request_error", "context_length_exceeded"),
    "unauthorized": Wire(401, "authentication_error", "invalid_api_key"),
    "not_found": Wire(404, "invalid_request_error", "model_not_found"),
    "overloaded": Wire(429, "rate_limit_error", "overloaded"),
    "internal": Wire(500, "server_error", "internal"),
}


class SwallowError(Exception):
    """Base class. `code` keys `WIRE`; `status` is the HTTP status it maps to."""

    code = "internal"
    http_status: int | None = None  # overrides the code's status (502 for a failed upstream)

    @property
    def status(self) -> int:
        return self.http_status or wire(self.code).status


def wire(code: str) -> Wire:
    return WIRE.get(code, WIRE["internal"])


class InvalidRequestError(SwallowError, ValueError):
    """The request itself is wrong (bad messages, bad parameters). Nothing ran."""

    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class UnauthorizedError(SwallowError):
    """A missing or wrong API key."""

    code = "unauthorized"


class OverloadedError(SwallowError):
    """The engine's queue is full; retry later."""

    code = "overloaded"


class ModelNotFoundError(SwallowError):
    code = "not_found"


class GenerationError(SwallowError):
    """A request failed while generating (the engine and other requests go on)."""


class UpstreamError(SwallowError):
    """A remote server (`--backend openai`, or a swallow-stream server read by the WS client)
    failed or could not be reached."""

    http_status = 502


class UnavailableError(SwallowError):
    """This server cannot do that here (a door closed by the hosting, not by the request)."""

    http_status = 503


class ConfigError(SwallowError, ValueError):
    """A config.json / generation_config.json the engine cannot run."""


class CheckpointError(SwallowError, ValueError):
    """A checkpoint that cannot be loaded: missing files, wrong shapes, truncated, wrong architecture."""


class InsufficientMemoryError(SwallowError):
    """The model does not fit the GPU with these options (said before anything is downloaded)."""


class VocabError(SwallowError, RuntimeError):
    """The o200k vocab is missing, unreadable or fails its sha256 check."""


_BY_CODE: dict[str, type[SwallowError]] = {
    "invalid_request": InvalidRequestError,
    "context_length_exceeded": ContextLengthExceededError,
    "unauthorized": UnauthorizedError,
    "not_found": ModelNotFoundError,
    "overloaded": OverloadedError,
}


def error_for_code(code: str | None, message: str) -> SwallowError:
    """The error a wire code stands for (a client turning an `error` frame back into an exception)."""
    err = _BY_CODE.get(code or "", SwallowError)(message)
    if type(err) is SwallowError and code in WIRE:
        err.code = code
    return err


def error_for_status(status: int, message: str) -> SwallowError:
    """The error an upstream HTTP status stands for (a remote OpenAI-compatible server)."""
    if status in (429, 503):
        return OverloadedError(message)
    if status == 404:
        return ModelNotFoundError(message)
    if status in (401, 403):
        return UnauthorizedError(message)
    if status in (400, 422):
        low = message.lower()
        if "context" in low and ("length" in low or "window" in low) or "maximum context" in low:
            return ContextLengthExceededError(message)
        return InvalidRequestError(message)
    return UpstreamError(f"{message} (HTTP {status})")
