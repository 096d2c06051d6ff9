"""`Stream` / `AsyncStream`: a request's token events, as iterators, plus its outcome.

A stream reads events from an `EventSource` (the local engine, a remote OpenAI-compatible server,
or a swallow-stream server's WebSocket), applies stop strings, and keeps the tallies (reasoning,
answer, usage, stats). Leaving the loop early (break, exception, garbage collection) cancels the
request.

Every source is fed by a producer thread (the engine loop, or an HTTP/WebSocket reader) through a
`QueueChannel` that the consumer owns: a sync consumer blocks on its queue, an async one is woken
through its event loop, so no producer ever waits on a consumer.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator, Protocol, TypeVar

from .errors import GenerationError, SwallowError
from .harmony.tokens import ANSWER_CHANNELS



@dataclass(slots=True)
class TokenEvent:
    """One generated token. `text` is the decoded content delta ("" for control and header tokens)."""

    text: str
    channel: str | None
    token_id: int | None
    special: bool = False
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def is_reasoning(self) -> bool:
        return self.channel == "analysis"


@dataclass(slots=True)
class Finished:
    """The end of a request, as a source reports it."""

    reason: str  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None
    num_cached_tokens: int = 0
    completion_tokens: int | None = None  # when the source counts them itself (remote)
    prompt_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class Stats:
    time_to_first_token: float | None = None  # seconds from submit to the first token
    tokens_per_second: float | None = None  # completion tokens after the first, per second
    total_time: float | None = None

    def as_dict(self) -> dict:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {
            "time_to_first_token": r(self.time_to_first_token),
            "tokens_per_second": r(self.tokens_per_second),
            "total_time": r(self.total_time),
        }


class QueueChannel:
    """Thread-safe hand-off of items from one producer thread to the consumer that owns it.

    loop: the consumer's event loop (async consumers); each put then wakes it through
    call_soon_threadsafe: the channel's own event, or instead `notify` (a front door that serves
    many streams from one task passes its own wake-up and only ever drains without waiting).
    pump: for an engine without a thread of its own (inline mode), run one engine step while waiting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, notify: Callable[[], None] | None = None):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = loop
        self._notify = notify
        self._event = asyncio.Event() if loop is not None else None
        self.pump: Callable[[], None] | None = None
        # called (once, from the producer's thread) when a put finds the consumer's loop closed
        self.on_orphaned: Callable[[], None] | None = None

    def put(self, item) -> None:
        self._q.put(item)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_put)
            except RuntimeError:  # loop closed: nobody is listening any more, so stop producing
                orphaned, self.on_orphaned = self.on_orphaned, None
                if orphaned is not None:
                    orphaned()

    @property
    def sink(self) -> Callable[[object], None]:
        """`put`, as the producer should call it: with no event loop to wake, the queue's own
        (C) put, one call less per item."""
        return self._q.put if self._loop is None else self.put

    def _on_put(self) -> None:
        if self._notify is not None:
            self._notify()
        else:
            self._event.set()

    def get_all(self, block: bool) -> list:
        """Everything queued; with block, wait for at least one item."""
        q = self._q
        while True:
            items = [q.get()] if block and self.pump is None else []
            # one consumer: what qsize counts is there to take (no Empty raised per drain)
            for _ in range(q.qsize()):
                items.append(q.get_nowait())
            if items or not block:
                return items
            self.pump()

    async def aget_all(self) -> list:
        while True:
            items = self.get_all(block=False)
            if items:
                return items
            if self.pump is not None:
                await asyncio.to_thread(self.pump)
                continue
            self._event.clear()
            if not self._q.empty():
                continue
            await self._event.wait()


class EventSource(Protocol):
    """Where a stream's events come from. `get` returns at least one item unless `block` is False."""

    prompt_token_ids: list[int]
    model: str

    def get(self, block: bool = True) -> list[TokenEvent | Finished]: ...

    async def aget(self) -> list[TokenEvent | Finished]: ...

    def cancel(self) -> None: ...


class ChannelSource:
    """An EventSource reading a QueueChannel that a producer thread fills; `_convert` turns what
    the producer put into events (identity for producers that put events)."""

    def __init__(self, channel: QueueChannel, model: str, prompt_token_ids: list[int] | None = None):
        self.channel = channel
        self.model = model
        self.prompt_token_ids = prompt_token_ids if prompt_token_ids is not None else []
        channel.on_orphaned = self.cancel

    def _convert(self, items: list) -> list[TokenEvent | Finished]:
        return items

    def get(self, block: bool = True) -> list[TokenEvent | Finished]:
        return self._convert(self.channel.get_all(block))

    async def aget(self) -> list[TokenEvent | Finished]:
        return self._convert(await self.channel.aget_all())

    def cancel(self) -> None:
        raise NotImplementedError


class _StopMatcher:
    """Stop strings over the answer's text (every channel but the reasoning, as vLLM matches stop
    strings after its reasoning parser), holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.channel: str | None = None

    def feed(self, text: str, channel: str | None) -> tuple[str, str, bool]:
        """-> (text of the previous channel flushed, text releasable now, hit a stop)."""
        flushed = ""
        if channel != self.channel:
            flushed, self.pending, self.channel = self.pending, "", channel
        if channel == "analysis":
            return flushed, text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return flushed, buf[:cut], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.pending = buf[len(buf) - keep :] if keep else ""
        return flushed, buf[: len(buf) - keep], False


class _StreamState:
    """Shared bookkeeping of Stream and AsyncStream."""

    def __init__(self, source: EventSource, stop: tuple[str, ...] = ()):
        self._source = source
        self._stop = _StopMatcher(stop) if stop else None
        self._ready: list[TokenEvent] = []
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.usage = Usage(prompt_tokens=len(source.prompt_token_ids))
        self.stats = Stats()
        self._t_start = time.monotonic()
        self._t_first: float | None = None
        self._reasoning_count = 0

    @property
    def model(self) -> str:
        return self._source.model

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._source.prompt_token_ids

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    def _text(self, ev: TokenEvent, text: str, channel: str | None) -> TokenEvent:
        if text:
            if channel == "analysis":
                self._reasoning.append(text)
            elif channel in ANSWER_CHANNELS:
                self._answer.append(text)
        ev.text = text
        return ev

    def _absorb(self, items: list[TokenEvent | Finished]) -> None:
        now = time.monotonic()
        ready, token_ids = self._ready, self.token_ids
        for item in items:
            if self.finish_reason is not None:
                return
            if isinstance(item, Finished):
                self._finish(item, now)
                continue
            if self._t_first is None:
                self._t_first = now
                self.stats.time_to_first_token = now - self._t_start
            channel = item.channel
            if item.token_id is not None:
                token_ids.append(item.token_id)
                self.usage.completion_tokens += 1
                if channel == "analysis":
                    self._reasoning_count += 1
            if self._stop is None:
                text = item.text
                if text:  # as _text
                    if channel == "analysis":
                        self._reasoning.append(text)
                    elif channel in ANSWER_CHANNELS:
                        self._answer.append(text)
                ready.append(item)
                continue
            prev = self._stop.channel
            flushed, text, hit = self._stop.feed(item.text, item.channel)
            if flushed:
                self._ready.append(self._text(TokenEvent("", prev, None), flushed, prev))
            self._ready.append(self._text(item, text, item.channel))
            if hit:
                self._source.cancel()
                self._finish(Finished("stop"), now)
                return

    def _finish(self, f: Finished, now: float) -> None:
        if self._stop is not None and self._stop.pending:
            ch = self._stop.channel
            self._ready.append(self._text(TokenEvent("", ch, None), self._stop.pending, ch))
            self._stop.pending = ""
        self.finish_reason = f.reason
        self.error = f.error
        self.usage.cached_tokens = f.num_cached_tokens
        self.usage.reasoning_tokens = self._reasoning_count if f.reasoning_tokens is None else f.reasoning_tokens
        if f.completion_tokens is not None:
            self.usage.completion_tokens = f.completion_tokens
        if f.prompt_tokens is not None:
            self.usage.prompt_tokens = f.prompt_tokens
        self.stats.total_time = now - self._t_start
        if self._t_first is not None and self.usage.completion_tokens > 1 and now > self._t_first:
            self.stats.tokens_per_second = (self.usage.completion_tokens - 1) / (now - self._t_first)

    def raise_if_failed(self) -> None:
        if self.finish_reason == "error":
            err = self.error
            if isinstance(err, SwallowError):
                raise err
            raise GenerationError(f"generation failed: {err!r}") from err

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's cache before its next step."""
        if not self.done:
            self._source.cancel()
            self._finish(Finished("cancelled"), time.monotonic())

    def display(self):
        """Show live in Jupyter, consuming the stream (an AsyncStream returns an awaitable task)."""
        from .notebook import display_stream
        return display_stream(self)

    @property
    def _ipython_display_(self):  # None outside a rich front end: IPython then shows the repr
        from .notebook import ipython_display_hook
        return ipython_display_hook(self)

    def __repr__(self) -> str:
        state = self.finish_reason or "streaming"
        return f"<{type(self).__name__} {self.model} {state} tokens={len(self.token_ids)}>"


class Stream(_StreamState):
    """Iterate for TokenEvents (`str(ev)` is its text). Afterwards: .reasoning, .answer,
    .finish_reason, .usage, .stats, .prompt_token_ids, .token_ids."""

    def __next__(self) -> TokenEvent:
        while not self._ready:
            if self.done:
                self.raise_if_failed()
                raise StopIteration
            self._absorb(self._source.get(block=True))
        return self._ready.pop(0)

    def __iter__(self) -> Iterator[TokenEvent]:
        # A generator per loop: when a `for` loop breaks, this generator is closed and the
        # request cancelled, even if the caller still holds the Stream. (`__next__`, inlined.)
        try:
            ready = self._ready
            while True:
                while not ready:
                    if self.finish_reason is not None:
                        self.raise_if_failed()
                        return
                    self._absorb(self._source.get(block=True))
                yield ready.pop(0)
        finally:
            self.cancel()

    def collect(self) -> "Stream":
        """Run to the end; returns self for .answer / .reasoning / .usage."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class AsyncStream(_StreamState):
    """`async for ev in astream(...)`; the same events and tallies as Stream."""

    async def __anext__(self) -> TokenEvent:
        while not self._ready:
            if self.done:
                self.raise_if_failed()
                raise StopAsyncIteration
            self._absorb(await self._source.aget())
        return self._ready.pop(0)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return _AsyncLoop(self)

    async def collect(self) -> "AsyncStream":
        async for _ in self:
            pass
        return self

    async def aclose(self) -> None:
        self.cancel()

    def drain_ready(self) -> list[TokenEvent]:
        """Events already received, without waiting (a front door serving many streams from one
        task, or coalescing what piled up into one frame). Never raises: check `.error` once done."""
        if not self._ready and not self.done:
            self._absorb(self._source.get(block=False))
        out, self._ready = self._ready, []
        return out

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """The events in batches: the next event plus every event already received, so a consumer
        that is slow to come back sends one frame (or one UI update) instead of hundreds. Raises
        what the stream raises."""
        while True:
            try:
                ev = await self.__anext__()
            except StopAsyncIteration:
                return
            yield [ev, *self.drain_ready()]

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class _AsyncLoop:
    """The iterator of one `async for`. Dropped when the loop breaks (refcount), it cancels the
    request right away; an async generator would only be closed later by the event loop."""

    __slots__ = ("_stream",)

    def __init__(self, stream: AsyncStream):
        self._stream = stream

    def __aiter__(self) -> "_AsyncLoop":
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._stream.__anext__()

    def __del__(self) -> None:
        try:
            self._stream.cancel()
        except Exception:
            pass


K = TypeVar("K")


def channel_runs(events: Iterable[TokenEvent], key: Callable[[TokenEvent], K] = lambda ev: ev.channel
                 ) -> list[tuple[K, list[TokenEvent]]]:
    """Consecutive events with the same key, grouped: [(key, events)]. Front doors send one frame,
    chunk or UI update per run (key: the channel, or reasoning vs answer)."""
    runs: list[tuple[K, list[TokenEvent]]] = []
    for ev in events:
        k = key(ev)
        if runs and runs[-1][0] == k:
            runs[-1][1].append(ev)
        else:
            runs.append((k, [ev]))
    return runs
