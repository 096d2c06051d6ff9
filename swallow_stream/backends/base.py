"""The contract every backend keeps, and opening a stream on one.

A backend runs `GenerateRequest`s: the in-process engine (`local.py`) or a remote
OpenAI-compatible server (`remote.py`). The consumer owns the `QueueChannel` its events arrive
on; `open` starts the request and returns the EventSource that reads them.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol, runtime_checkable

from ..config import GenerationDefaults
from ..request import GenerateRequest
from ..stream import AsyncStream, EventSource, QueueChannel, Stream


@runtime_checkable
class Backend(Protocol):
    kind: str  # "local" | "openai"
    name: str  # the served model's name
    generation: GenerationDefaults  # defaults for unset sampling values
    max_model_len: int  # prompt + completion tokens
    max_num_seqs: int  # sequences generated at once (the front doors size their own limits by it)
    max_queued_requests: int  # requests waiting beyond those before "overloaded"
    is_tiny: bool  # the random-weight demo model: every front door says its output is noise

    @property
    def closed(self) -> bool: ...

    def open(self, request: GenerateRequest, channel: QueueChannel) -> EventSource: ...

    def stats(self) -> dict: ...

    def describe(self) -> dict: ...

    def shutdown(self) -> None: ...


def open_stream(backend: Backend, request: GenerateRequest) -> Stream:
    return Stream(backend.open(request, QueueChannel()), request.params.stop)


def open_astream(backend: Backend, request: GenerateRequest, notify: Callable[[], None] | None = None) -> AsyncStream:
    """In the running event loop. notify: called on the loop whenever events arrive (a front
    door that serves many streams from one task); otherwise iterate the stream."""
    channel = QueueChannel(asyncio.get_running_loop(), notify)
    return AsyncStream(backend.open(request, channel), request.params.stop)
