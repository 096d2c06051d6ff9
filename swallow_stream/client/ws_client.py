"""A small client for the server's `/ws` endpoint, yielding the same TokenEvents as `stream()`.

    from swallow_stream.client import ws_stream
    s = ws_stream("ws://127.0.0.1:7860/ws", "Create a casual one-day Tokyo itinerary in Japanese.")
    for tok in s:
        print(tok, end="", flush=True)
    print(s.finish_reason, s.usage)

A token frame may carry several tokens (the server coalesces when the client is slow): its text
comes as one event with the first token id, followed by text-less events for the other ids, so
the events' token ids still rebuild the completion exactly.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

from ..errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    SwallowError,
)
from ..stream import Stats, TokenEvent, Usage


class UnauthorizedError(SwallowError):
    code = "unauthorized"
    status = 401


_ERRORS: dict[str, type[SwallowError]] = {
    "invalid_request": InvalidRequestError,
    "context_length_exceeded": ContextLengthExceededError,
    "overloaded": OverloadedError,
    "not_found": ModelNotFoundError,
    "unauthorized": UnauthorizedError,
}


def error_from_frame(frame: dict) -> SwallowError:
    cls = _ERRORS.get(frame.get("code", ""), SwallowError)
    err = cls(frame.get("message") or frame.get("code") or "error")
    if cls is SwallowError:
        err.code = frame.get("code", "internal")
    return err


def _closed_error(e: Exception) -> SwallowError:
    rcvd = getattr(e, "rcvd", None)
    code = getattr(rcvd, "code", None)
    if code == 1008:
        return UnauthorizedError(f"connection refused: {getattr(rcvd, 'reason', '') or 'policy violation'}")
    return SwallowError(f"connection closed before the generation finished ({e})")


def ws_url(url: str, api_key: str | None = None, key_in_query: bool = False) -> str:
    """'http://h:7860' -> 'ws://h:7860/ws' (ws/wss URLs with a path are kept)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = parts.query
    if api_key and key_in_query:
        query = (query + "&" if query else "") + urlencode({"api_key": api_key})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _request(prompt_or_messages: Any, gid: str, params: dict) -> str:
    msg: dict[str, Any] = {"type": "generate", "id": gid, "params": params}
    if isinstance(prompt_or_messages, str):
        msg["prompt"] = prompt_or_messages
    else:
        msg["messages"] = list(prompt_or_messages)
    return json.dumps(msg, ensure_ascii=False)


class _WSResult:
    """Tallies of one generation, filled from its frames."""

    def __init__(self, url: str, prompt_or_messages: Any, api_key: str | None, params: dict,
                 open_timeout: float, request_id: str | None):
        self.id = request_id or uuid.uuid4().hex
        self._url = url
        self._payload = _request(prompt_or_messages, self.id, params)
        self._api_key = api_key
        self._open_timeout = open_timeout
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.stats = Stats()
        self.token_ids: list[int] = []
        self.frames = 0
        self._parts: dict[str, list[str]] = {"analysis": [], "final": []}

    @property
    def reasoning(self) -> str:
        return "".join(self._parts["analysis"])

    @property
    def answer(self) -> str:
        return "".join(self._parts["final"])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _absorb(self, frame: dict) -> list[TokenEvent]:
        """One server frame for this id -> events (raises for an error frame)."""
        kind = frame.get("type")
        if kind == "start":
            self.model = frame.get("model")
            self.prompt_tokens = frame.get("prompt_tokens")
            return []
        if kind == "token":
            self.frames += 1
            text, channel = frame.get("text", ""), frame.get("channel")
            ids = list(frame.get("token_ids") or [])
            lps = list(frame.get("logprobs") or [])
            if text and channel in self._parts:
                self._parts[channel].append(text)
            self.token_ids += ids
            if not ids:
                return [TokenEvent(text, channel, None)]
            return [
                TokenEvent(text if i == 0 else "", channel, tid, False, lps[i] if i < len(lps) else None)
                for i, tid in enumerate(ids)
            ]
        if kind == "done":
            self.finish_reason = frame.get("finish_reason") or "stop"
            u = frame.get("usage") or {}
            self.usage = Usage(
                prompt_tokens=u.get("prompt_tokens", 0),
                completion_tokens=u.get("completion_tokens", 0),
                reasoning_tokens=u.get("reasoning_tokens", 0),
                cached_tokens=u.get("cached_tokens", 0),
            )
            st = frame.get("stats") or {}
            self.stats = Stats(st.get("time_to_first_token"), st.get("tokens_per_second"), st.get("total_time"))
            return []
        if kind == "error":
            self.finish_reason = "error"
            raise error_from_frame(frame)
        return []

    def _mine(self, frame: dict) -> bool:
        """Frames about this generation, and connection-level errors that end it (unauthorized)."""
        if frame.get("id") == self.id:
            return True
        return frame.get("id") is None and frame.get("type") == "error" and frame.get("code") == "unauthorized"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.finish_reason or 'streaming'} tokens={len(self.token_ids)}>"


class WSStream(_WSResult):
    """Iterate for TokenEvents; afterwards .reasoning, .answer, .finish_reason, .usage, .stats.
    Leaving the loop early sends a cancel and closes the connection."""

    def __iter__(self) -> Iterator[TokenEvent]:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        with connect(ws_url(self._url), additional_headers=headers, open_timeout=self._open_timeout,
                     max_size=None) as ws:
            try:
                try:
                    ws.send(self._payload)
                except ConnectionClosed:
                    pass  # the server may already have refused us: read its error frame below
                while not self.done:
                    try:
                        frame = json.loads(ws.recv())
                    except ConnectionClosed as e:
                        raise _closed_error(e) from e
                    if self._mine(frame):
                        yield from self._absorb(frame)
            finally:
                if not self.done:
                    try:
                        ws.send(json.dumps({"type": "cancel", "id": self.id}))
                    except Exception:
                        pass
                    self.finish_reason = "cancelled"

    def collect(self) -> "WSStream":
        for _ in self:
            pass
        return self


class AsyncWSStream(_WSResult):
    """`async for ev in aws_stream(...)`; the same events and tallies as WSStream."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        async with connect(ws_url(self._url), additional_headers=headers, open_timeout=self._open_timeout,
                           max_size=None) as ws:
            try:
                try:
                    await ws.send(self._payload)
                except ConnectionClosed:
                    pass
                while not self.done:
                    try:
                        frame = json.loads(await ws.recv())
                    except ConnectionClosed as e:
                        raise _closed_error(e) from e
                    if self._mine(frame):
                        for ev in self._absorb(frame):
                            yield ev
            finally:
                if not self.done:
                    try:
                        await ws.send(json.dumps({"type": "cancel", "id": self.id}))
                    except Exception:
                        pass
                    self.finish_reason = "cancelled"

    async def collect(self) -> "AsyncWSStream":
        async for _ in self:
            pass
        return self


def ws_stream(url: str, prompt_or_messages: Any, *, api_key: str | None = None, request_id: str | None = None,
              open_timeout: float = 30.0, **params: Any) -> WSStream:
    """Generate over the server's WebSocket; iterate the result for TokenEvents.

    url: ws://host:port/ws (http://host:port also works). params: as for `stream()`
    (reasoning_effort, max_tokens, temperature, top_p, top_k, min_p, seed, stop, system, ...)."""
    return WSStream(url, prompt_or_messages, api_key, params, open_timeout, request_id)


def aws_stream(url: str, prompt_or_messages: Any, *, api_key: str | None = None, request_id: str | None = None,
               open_timeout: float = 30.0, **params: Any) -> AsyncWSStream:
    """`ws_stream` as an async iterator."""
    return AsyncWSStream(url, prompt_or_messages, api_key, params, open_timeout, request_id)
