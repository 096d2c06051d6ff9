"""`/ws`: token streaming over a WebSocket (JSON text frames; protocol in DESIGN.md).

Per connection: a receive loop reads client frames and opens or cancels generations; one sender
task does everything else. Each generation's channel wakes the sender when tokens arrive; the
sender then takes what every generation has ready and sends one token frame per channel run.
A slow client therefore gets fewer, bigger (coalesced) frames, while the engine, other
generations and other connections never wait on its socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketState

from ..backends.base import Backend
from ..errors import InvalidRequestError, SwallowError
from ..request import check_options
from ..stream import AsyncStream, channel_runs
from .auth import request_authorized
from .doors import cancel_task, error_fields, key_tenant, open_request
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.ws")

POLICY_VIOLATION = 1008
PENDING_PER_LIMIT = 8  # generations a connection may hold, cancelled ones included, per one running


@dataclass(eq=False)  # kept in a set by identity
class _Generation:
    id: Any
    stream: AsyncStream | None = None  # None while its prompt is being prepared off the loop
    cancelled: bool = False


def _key(gid: Any) -> Any:
    return (type(gid).__name__, gid)


class WSConnection:
    def __init__(self, ws: WebSocket, backend: Backend, settings: Settings, metrics: Metrics):
        self.ws = ws
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.tenant = key_tenant(settings.api_key)
        self.gens: dict[Any, _Generation] = {}
        self._outbox: list[dict] = []  # control frames (start, error), sent before token frames
        self._wake = asyncio.Event()
        self._opening: set[asyncio.Task] = set()
        self._last_open: asyncio.Task | None = None
        self._detached: set[_Generation] = set()  # cancelled while being opened (ids already free)
        self.closed = False

    def wake(self) -> None:
        self._wake.set()

    def push(self, frame: dict) -> None:
        if self.closed:
            return
        if frame["type"] == "error":
            self.metrics.count_error("ws", frame["code"])
        self._outbox.append(frame)
        self._wake.set()

    def error(self, code: str, message: str, gid: Any = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if gid is not None:
            frame = {"type": "error", "id": gid, "code": code, "message": message}
        self.push(frame)

    # -- sender ----------------------------------------------------------------------------------
    def _collect(self) -> list[dict]:
        """Frames for everything ready now: control frames first, then per generation one token
        frame per channel run, and its end frame once it is done."""
        frames, self._outbox = self._outbox, []
        for gen in list(self.gens.values()):
            if gen.stream is not None:
                self._frames_of(gen, frames)
        return frames

    def _frames_of(self, gen: _Generation, frames: list[dict]) -> None:
        """Append gen's ready token frames (one per channel run) and, once done, its end frame."""
        s = gen.stream
        for channel, events in channel_runs(s.drain_ready()):
            frame: dict[str, Any] = {
                "type": "token", "id": gen.id, "channel": channel,
                "text": "".join(ev.text for ev in events),
                "token_ids": [ev.token_id for ev in events if ev.token_id is not None],
            }
            logprobs = [ev.logprob for ev in events if ev.logprob is not None]
            if logprobs:
                frame["logprobs"] = logprobs
            frames.append(frame)
        if s.done:
            frames.append(self._end_frame(gen))
            self._forget(gen)

    def _end_frame(self, gen: _Generation) -> dict:
        s = gen.stream
        if s.finish_reason == "error":
            code, _, message = error_fields(s.error or SwallowError("generation failed"))
            self.metrics.count_error("ws", code)
            return {"type": "error", "id": gen.id, "code": code, "message": message}
        self.metrics.count_finish("ws", s.finish_reason, s.usage)
        return {"type": "done", "id": gen.id, "finish_reason": s.finish_reason, "usage": s.usage.as_dict(),
                "stats": s.stats.as_dict()}

    def _forget(self, gen: _Generation) -> None:
        if self.gens.get(_key(gen.id)) is gen:
            del self.gens[_key(gen.id)]
            self.metrics.generations_active -= 1
        elif gen in self._detached:
            self._detached.discard(gen)
            self.metrics.generations_active -= 1

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for frame in self._collect():
                await self.ws.send_text(json.dumps(frame, ensure_ascii=False))

    # -- connection ----------------------------------------------------------------------------
    async def run(self) -> None:
        if not origin_allowed(self.ws.headers, self.settings.ws_allowed_origins):
            # Before the handshake completes (HTTP 403): a web page from another site cannot
            # drive a server on this machine through the visitor's browser.
            self.metrics.count_error("ws", "forbidden_origin")
            await self.ws.close(code=POLICY_VIOLATION, reason="origin not allowed")
            return
        await self.ws.accept()
        if not request_authorized(self.settings.api_key, self.ws.headers, self.ws.query_params):
            self.metrics.count_error("ws", "unauthorized")
            await self.ws.send_text(json.dumps({"type": "error", "code": "unauthorized",
                                                "message": "missing or wrong API key"}))
            await self.ws.close(code=POLICY_VIOLATION, reason="unauthorized")
            return
        self.metrics.ws_connections += 1
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._receive_loop())
        try:
            # Whichever ends first (client gone, send failed) ends the connection.
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.closed = True
            self.metrics.ws_connections -= 1
            await cancel_task(receiver)  # first: it would open more
            for task in list(self._opening):
                await cancel_task(task)  # a request still being opened is cancelled once open
            for gen in [*self.gens.values(), *self._detached]:
                if gen.stream is not None:
                    gen.stream.cancel()  # the engine frees their blocks before its next step
                self._forget(gen)
            await cancel_task(sender)
            if self.ws.application_state == WebSocketState.CONNECTED:
                try:
                    await self.ws.close()
                except Exception:
                    pass

    async def _receive_loop(self) -> None:
        limit = self.settings.ws_max_frame_bytes
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                data = msg.get("bytes") or b""
                if len(data) > limit:
                    self.error("invalid_request", f"frame of {len(data)} bytes exceeds the limit of {limit} bytes")
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.error("invalid_request", "binary frame is not UTF-8 JSON")
                    continue
            elif len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
                self.error("invalid_request", f"frame exceeds the limit of {limit} bytes")
                continue
            try:
                self._handle(text)
            except Exception as e:  # never let one bad frame end the connection
                code, _, message = error_fields(e)
                self.error(code, message)

    def _handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError as e:
            self.error("invalid_request", f"malformed JSON: {e}")
            return
        except RecursionError:
            self.error("invalid_request", "malformed JSON: nested too deeply")
            return
        if not isinstance(msg, dict):
            self.error("invalid_request", "a frame must be a JSON object with a 'type'")
            return
        kind = msg.get("type")
        gid = msg.get("id")
        if gid is not None and (isinstance(gid, bool) or not isinstance(gid, (str, int))):
            self.error("invalid_request", "'id' must be a string or an integer")
            return
        if kind == "generate":
            self._generate(gid, msg)
        elif kind == "cancel":
            self._cancel(gid)
        else:
            self.error("invalid_request", f"unknown message type {kind!r}; use 'generate' or 'cancel'", gid)

    def _generate(self, gid: Any, msg: dict) -> None:
        if gid is None or gid == "":
            self.error("invalid_request", "'generate' needs an 'id'")
            return
        refused = self.settings.generation_refused()
        if refused:
            self.error("internal", refused, gid)
            return
        if _key(gid) in self.gens:
            self.error("invalid_request", f"generation {gid!r} is already running on this connection", gid)
            return
        limit = self.settings.ws_max_generations
        running = len(self.gens)
        # Cancelled ones still being opened do not count against the limit, only against a bound
        # on what one connection may have pending (each holds its request's text).
        if running >= limit or running + len(self._detached) >= PENDING_PER_LIMIT * limit:
            self.error("overloaded", f"this connection already runs {running} generations (limit {limit})", gid)
            return
        try:
            has_msgs, has_prompt = "messages" in msg, "prompt" in msg
            if has_msgs == has_prompt:
                raise InvalidRequestError("'generate' needs exactly one of 'messages' or 'prompt'")
            source = msg["messages"] if has_msgs else msg["prompt"]
            if has_prompt and not isinstance(source, str):
                raise InvalidRequestError("'prompt' must be a string")
            options = check_options(msg.get("params"))
        except Exception as e:
            code, _, message = error_fields(e)
            self.error(code, message, gid)
            return
        # The id is taken now (frames of one generation stay start -> tokens -> done); the prompt
        # is prepared off the loop, so this loop goes on reading frames meanwhile.
        gen = _Generation(gid)
        self.gens[_key(gid)] = gen
        self.metrics.generations_active += 1
        task = asyncio.create_task(self._open(gen, source, options, self._last_open))
        self._last_open = task
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, gen: _Generation, source: Any, options: dict, previous: asyncio.Task | None) -> None:
        # One connection's requests open in the order sent: a generate sent right after a
        # cancel finds the cancelled one's engine slot already given back.
        if previous is not None:
            await asyncio.wait({previous})
        try:
            stream = await open_request(self.backend, source, options, notify=self.wake, tenant=self.tenant)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._forget(gen)
            code, _, message = error_fields(e)
            self.error(code, message, gen.id)
            return
        gen.stream = stream
        self.metrics.count_request("ws")
        self.push({"type": "start", "id": gen.id, "model": stream.model, "prompt_tokens": len(stream.prompt_token_ids)})
        if gen.cancelled:
            self._end_now(gen)

    def _cancel(self, gid: Any) -> None:
        gen = self.gens.get(_key(gid)) if gid is not None else None
        if gen is None or gen.cancelled:
            self.error("not_found", f"no running generation with id {gid!r}", gid)
            return
        gen.cancelled = True
        if gen.stream is not None:
            self._end_now(gen)
        else:  # still being opened: its id is free now, its frames follow once it is open
            del self.gens[_key(gid)]
            self._detached.add(gen)

    def _end_now(self, gen: _Generation) -> None:
        """Cancel gen and queue its last frames now: its id and its slot on this connection are
        free for the very next frame (the engine's admission slot is freed by the cancel)."""
        gen.stream.cancel()
        frames: list[dict] = []
        self._frames_of(gen, frames)
        self._outbox.extend(frames)
        self.wake()


def origin_allowed(headers: Any, allowed: tuple[str, ...]) -> bool:
    """A WebSocket handshake's Origin: absent (not a browser), this server itself, a loopback
    page, or one of `allowed` ("*": any)."""
    origin = headers.get("origin")
    if not origin or "*" in allowed:
        return True
    origin = origin.rstrip("/").lower()
    if origin in (o.rstrip("/").lower() for o in allowed):
        return True
    parsed = urlsplit(origin)
    host = (headers.get("host") or "").lower()
    if parsed.netloc and parsed.netloc == host:
        return True
    return parsed.hostname in ("localhost", "127.0.0.1", "::1")


def make_websocket_endpoint(backend: Backend, settings: Settings, metrics: Metrics):
    async def websocket_endpoint(ws: WebSocket) -> None:
        await WSConnection(ws, backend, settings, metrics).run()

    return websocket_endpoint
