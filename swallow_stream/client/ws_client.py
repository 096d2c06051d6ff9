"""A client for the server's `/ws` endpoint: one more EventSource behind `Stream`.

    from swallow_stream.client import ws_stream
    s = ws_stream("ws://127.0.0.1:7860/ws", "Create a casual one-day Tokyo itinerary in Japanese.")
    for tok in s:
        print(tok, end="", flush=True)
    print(s.finish_reason, s.usage)

`ws_stream` returns a `Stream`, `aws_stream` an `AsyncStream`: the same events, tallies, stop
handling and cancellation as `stream()`. A reader thread owns the connection. A token frame may
carry several tokens (the server coalesces when the client is slow): its text comes as one event
with the first token id, followed by text-less events for the other ids, so the events' token
ids still rebuild the completion exactly.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from ..errors import SwallowError, UnauthorizedError, UpstreamError, error_for_code
from ..stream import AsyncStream, ChannelSource, Finished, QueueChannel, Stream, TokenEvent

POLICY_VIOLATION = 1008


def ws_url(url: str, api_key: str | None = None, key_in_query: bool = False) -> str:
    """'http://h:7860' -> 'ws://h:7860/ws' (ws/wss URLs with a path are kept)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = parts.query
    if api_key and key_in_query:
        query = (query + "&" if query else "") + urlencode({"api_key": api_key})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _closed_error(e: Exception) -> SwallowError:
    rcvd = getattr(e, "rcvd", None)
    if getattr(rcvd, "code", None) == POLICY_VIOLATION:
        return UnauthorizedError(f"connection refused: {getattr(rcvd, 'reason', '') or 'policy violation'}")
    return UpstreamError(f"connection closed before the generation finished ({e})")


class WSSource(ChannelSource):
    """One generation on a swallow-stream server, read by a thread that owns the connection."""

    def __init__(self, url: str, prompt_or_messages: Any, params: dict, channel: QueueChannel, *,
                 api_key: str | None, request_id: str | None, open_timeout: float):
        super().__init__(channel, model="")
        self.id = request_id or uuid.uuid4().hex
        msg: dict[str, Any] = {"type": "generate", "id": self.id, "params": params}
        msg["prompt" if isinstance(prompt_or_messages, str) else "messages"] = (
            prompt_or_messages if isinstance(prompt_or_messages, str) else list(prompt_or_messages))
        self._payload = json.dumps(msg, ensure_ascii=False)
        self._url = ws_url(url)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._open_timeout = open_timeout
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._ws: Any = None
        self.frames = 0  # token frames received
        threading.Thread(target=self._run, name="swallow-ws-client", daemon=True).start()

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        try:
            with connect(self._url, additional_headers=self._headers, open_timeout=self._open_timeout,
                         max_size=None) as ws:
                with self._lock:
                    self._ws = ws
                if self._cancelled.is_set():
                    return
                try:
                    ws.send(self._payload)
                except ConnectionClosed:
                    pass  # the server may already have refused us: read its error frame below
                while not self._cancelled.is_set():
                    try:
                        frame = json.loads(ws.recv())
                    except ConnectionClosed as e:
                        if not self._cancelled.is_set():
                            self.channel.put(Finished("error", _closed_error(e)))
                        return
                    if self._absorb(frame):
                        return
        except Exception as e:  # refused, unreachable, bad URL: the stream ends with the error
            if not self._cancelled.is_set():
                self.channel.put(Finished("error", UpstreamError(f"cannot stream from {self._url}: {e}")))

    def _absorb(self, frame: dict) -> bool:
        """One server frame -> events on the channel; True when it ends this generation."""
        kind = frame.get("type")
        mine = frame.get("id") == self.id
        if kind == "error" and frame.get("id") is None and frame.get("code") == "unauthorized":
            mine = True  # a connection-level refusal ends every generation on it
        if not mine:
            return False
        if kind == "start":
            self.model = frame.get("model") or ""
        elif kind == "token":
            self.frames += 1
            text, channel = frame.get("text", ""), frame.get("channel")
            ids = list(frame.get("token_ids") or [])
            lps = list(frame.get("logprobs") or [])
            if not ids:
                self.channel.put(TokenEvent(text, channel, None))
            for i, tid in enumerate(ids):
                self.channel.put(TokenEvent(text if i == 0 else "", channel, tid, False, lps[i] if i < len(lps) else None))
        elif kind == "done":
            u = frame.get("usage") or {}
            self.channel.put(Finished(frame.get("finish_reason") or "stop", None, u.get("cached_tokens", 0),
                                      u.get("completion_tokens"), u.get("prompt_tokens"), u.get("reasoning_tokens")))
            return True
        elif kind == "error":
            self.channel.put(Finished("error", error_for_code(frame.get("code"), frame.get("message") or "error")))
            return True
        return False

    def cancel(self) -> None:
        """Tell the server to cancel (it frees the cache at once), then close the connection."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._lock:
            ws = self._ws
        if ws is None:
            return
        try:
            ws.send(json.dumps({"type": "cancel", "id": self.id}))
        except Exception:
            pass
        try:
            ws.close()
        except Exception:
            pass


def ws_stream(url: str, prompt_or_messages: Any, *, api_key: str | None = None, request_id: str | None = None,
              open_timeout: float = 30.0, **params: Any) -> Stream:
    """Generate over the server's WebSocket; iterate the result for TokenEvents.

    url: ws://host:port/ws (http://host:port also works). params: as for `stream()`
    (reasoning_effort, max_tokens, temperature, top_p, top_k, min_p, seed, stop, system, ...);
    the server checks them and applies the stop strings."""
    return Stream(WSSource(url, prompt_or_messages, params, QueueChannel(), api_key=api_key, request_id=request_id,
                           open_timeout=open_timeout))


def aws_stream(url: str, prompt_or_messages: Any, *, api_key: str | None = None, request_id: str | None = None,
               open_timeout: float = 30.0, **params: Any) -> AsyncStream:
    """`ws_stream` as an async iterator; call it inside a running event loop."""
    channel = QueueChannel(asyncio.get_running_loop())
    return AsyncStream(WSSource(url, prompt_or_messages, params, channel, api_key=api_key, request_id=request_id,
                                open_timeout=open_timeout))
