"""What every front door shares: opening a request on the backend, the served model's names,
and errors in the shape each wire wants. A door only parses its request and formats output."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
from typing import Any, Callable

from ..backends.base import Backend
from ..catalog import MODEL_20B, MODEL_120B
from ..errors import OverloadedError, SwallowError, wire
from ..request import GenerateRequest
from ..stream import AsyncStream, QueueChannel

log = logging.getLogger("swallow_stream.server")

# Names the tiny random-weight model stands in for: the model card's snippet names these, and a
# machine with no GPU serves `tiny` in their place (every response says model "tiny").
TINY_STANDS_IN_FOR = (MODEL_120B, MODEL_20B)


# Rendering and tokenizing a prompt is CPU work linear in its size (up to ~1 MB a frame): it runs
# here, never on the event loop. A few workers, so a burst of huge prompts queues behind them
# instead of taking every core; each open must finish within OPEN_TIMEOUT_S.
OPEN_WORKERS = 2
OPEN_TIMEOUT_S = 30.0
_open_pool = concurrent.futures.ThreadPoolExecutor(OPEN_WORKERS, thread_name_prefix="swallow-open")


def key_tenant(api_key: str | None) -> str | None:
    """The prefix-cache tenant of requests made with an API key: a hash, never the key itself.
    No key: None, one cache shared by every request (local, single-user use)."""
    return None if not api_key else "key:" + hashlib.sha256(api_key.encode()).hexdigest()


async def open_request(backend: Backend, prompt_or_messages: Any, options: dict[str, Any],
                       notify: Callable[[], None] | None = None, tenant: str | None = None) -> AsyncStream:
    """Validate and start a generation; raises SwallowError subclasses for bad input or a full engine.

    Validation (cheap, and bounded: text too long for the context is refused by its length) runs
    on the loop; rendering, tokenizing and admission run in a worker. notify: called on the loop
    whenever events arrive (a front door serving many streams from one task). tenant: see
    `GenerateRequest.create` (prefix-cache isolation)."""
    request = GenerateRequest.create(prompt_or_messages, backend.generation, max_model_len=backend.max_model_len,
                                     tenant=tenant, **options)
    channel = QueueChannel(asyncio.get_running_loop(), notify)
    future = _open_pool.submit(backend.open, request, channel)
    try:
        source = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), OPEN_TIMEOUT_S)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        # Nobody will read this request: cancel it as soon as the worker has opened it.
        if not future.cancel():
            future.add_done_callback(_cancel_opened)
        if isinstance(e, asyncio.CancelledError):
            raise
        raise OverloadedError(f"preparing the prompt took longer than {OPEN_TIMEOUT_S:.0f} s; retry shortly") from None
    return AsyncStream(source, request.params.stop)


def _cancel_opened(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


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
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: a closed socket's error is expected, not worth a warning
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
