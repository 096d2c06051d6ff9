"""What the front doors share: opening a stream on the backend, coalescing events, model names."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ..api import MODEL_120B, MODEL_20B, astream
from ..errors import InvalidRequestError, SwallowError
from ..stream import AsyncStream, TokenEvent

# Keyword arguments of stream()/astream() a front door may pass through (WebSocket params).
STREAM_PARAMS = (
    "reasoning_effort",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "system",
    "logprobs",
    "top_logprobs",
)

# Names the tiny random-weight model stands in for: the model card's snippet names these, and a
# machine with no GPU serves `tiny` in their place (every response says model "tiny").
TINY_STANDS_IN_FOR = (MODEL_120B, MODEL_20B)


def open_stream(backend: Any, messages: Any, **params: Any) -> AsyncStream:
    """astream() on this backend; raises SwallowError subclasses for bad input or a full engine."""
    if "reasoning_effort" in params and params["reasoning_effort"] is None:
        del params["reasoning_effort"]
    return astream(messages, model=backend, **params)


async def event_batches(stream: AsyncStream) -> AsyncIterator[list[TokenEvent]]:
    """The stream's events in batches: the next event, plus every event already received.

    A consumer that is slow to come back gets everything that piled up in one batch, so it can
    send one frame (or one UI update) instead of hundreds. Raises what the stream raises."""
    while True:
        try:
            ev = await stream.__anext__()
        except StopAsyncIteration:
            return
        yield [ev, *stream.drain_ready()]


def channel_runs(events: list[TokenEvent]) -> list[tuple[str | None, str, list[int], list[TokenEvent]]]:
    """Group consecutive events on the same channel: [(channel, text, token_ids, events)]."""
    runs: list[tuple[str | None, str, list[int], list[TokenEvent]]] = []
    for ev in events:
        if runs and runs[-1][0] == ev.channel:
            ch, text, ids, evs = runs[-1]
            runs[-1] = (ch, text + ev.text, ids, evs)
        else:
            runs.append((ev.channel, ev.text, [], []))
        if ev.token_id is not None:
            runs[-1][2].append(ev.token_id)
        runs[-1][3].append(ev)
    return runs


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


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, SwallowError) else "internal"


def check_params(params: Any) -> dict:
    """WebSocket `params`: an object with known keys only (values are checked by the sampler)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequestError(f"'params' must be an object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(STREAM_PARAMS))
    if unknown:
        raise InvalidRequestError(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(STREAM_PARAMS)}"
        )
    return dict(params)


async def cancel_task(task: asyncio.Task | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
