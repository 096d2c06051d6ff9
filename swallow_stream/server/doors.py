"""What every front door shares: opening a request on the backend, the served model's names,
and errors in the shape each wire wants. A door only parses its request and formats output."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..backends.base import Backend, open_astream
from ..catalog import MODEL_20B, MODEL_120B
from ..errors import SwallowError, wire
from ..request import GenerateRequest
from ..stream import AsyncStream

log = logging.getLogger("swallow_stream.server")

# Names the tiny random-weight model stands in for: the model card's snippet names these, and a
# machine with no GPU serves `tiny` in their place (every response says model "tiny").
TINY_STANDS_IN_FOR = (MODEL_120B, MODEL_20B)


def open_request(backend: Backend, prompt_or_messages: Any, options: dict[str, Any],
                 notify: Callable[[], None] | None = None) -> AsyncStream:
    """Validate and start a generation; raises SwallowError subclasses for bad input or a full engine.
    On the event loop: rendering and admission are quick; the engine works in its own thread."""
    request = GenerateRequest.create(prompt_or_messages, backend.generation, **options)
    return open_astream(backend, request, notify)


def error_fields(exc: BaseException) -> tuple[str, int, str]:
    """-> (wire code, HTTP status, message). Unexpected exceptions are `internal` and logged."""
    if isinstance(exc, SwallowError):
        return exc.code, exc.status, str(exc)
    log.error("unexpected error in a front door", exc_info=exc)
    return "internal", wire("internal").status, f"internal error: {type(exc).__name__}: {exc}"


def model_aliases(name: str, is_tiny: bool, extra: tuple[str, ...] = ()) -> set[str]:
    """Lower-cased names a request may use for the served model.

    The served name itself; its last path component (``org/Model`` -> ``Model``); names given
    with --served-model-name; and, when the tiny stand-in serves, the Swallow names the model
    card uses (so its snippet runs unchanged on a machine without a GPU). Anything else is 404.
    """
    names = {name, name.rstrip("/").rsplit("/", 1)[-1], *extra}
    if is_tiny:
        names |= set(TINY_STANDS_IN_FOR)
        names |= {n.rsplit("/", 1)[-1] for n in TINY_STANDS_IN_FOR}
    return {n.lower() for n in names if n}


async def cancel_task(task: asyncio.Task | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
