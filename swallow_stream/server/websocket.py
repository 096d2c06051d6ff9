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

from starlette.websockets import WebSocket, WebSocketState

from ..backends.base import Backend
from ..errors import InvalidRequestError, SwallowError
from ..request import check_options
from ..stream import AsyncStream, channel_runs
from .auth import request_authorized
from .doors import cancel_task, error_fields, open_request
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.ws")

POLICY_VIOLATION = 1008


@dataclass
class _Generation:
    id: Any
    stream: AsyncStream


def _key(gid: Any) -> Any:
    return (type(gid).__name__, gid)


class WSConnection:
    def __init__(self, ws: WebSocket, backend: Backend, settings: Settings, metrics: Metrics):
        self.ws = ws
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.gens: dict[Any, _Generation] = {}
        self._outbox: list[dict] = []  # control frames (start, error), sent before token frames
        self._wake = asyncio.Event()
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
        return frames

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
        if self.gens.pop(_key(gen.id), None) is not None:
            self.metrics.generations_active -= 1

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for frame in self._collect():
                await self.ws.send_text(json.dumps(frame, ensure_ascii=False))

    # -- connection ----------------------------------------------------------------------------
    async def run(self) -> None:
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
            for gen in list(self.gens.values()):
                gen.stream.cancel()  # the engine frees their blocks before its next step
                self._forget(gen)
            await cancel_task(receiver)
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
        if _key(gid) in self.gens:
            self.error("invalid_request", f"generation {gid!r} is already running on this connection", gid)
            return
        if len(self.gens) >= self.settings.ws_max_generations:
            self.error("overloaded",
                       f"this connection already runs {len(self.gens)} generations (limit {self.settings.ws_max_generations})",
                       gid)
            return
        try:
            has_msgs, has_prompt = "messages" in msg, "prompt" in msg
            if has_msgs == has_prompt:
                raise InvalidRequestError("'generate' needs exactly one of 'messages' or 'prompt'")
            source = msg["messages"] if has_msgs else msg["prompt"]
            if has_prompt and not isinstance(source, str):
                raise InvalidRequestError("'prompt' must be a string")
            options = check_options(msg.get("params"))
            stream = open_request(self.backend, source, options, notify=self.wake)
        except Exception as e:
            code, _, message = error_fields(e)
            self.error(code, message, gid)
            return
        self.gens[_key(gid)] = _Generation(gid, stream)
        self.metrics.count_request("ws")
        self.metrics.generations_active += 1
        self.push({"type": "start", "id": gid, "model": stream.model, "prompt_tokens": len(stream.prompt_token_ids)})

    def _cancel(self, gid: Any) -> None:
        gen = self.gens.get(_key(gid)) if gid is not None else None
        if gen is None:
            self.error("not_found", f"no running generation with id {gid!r}", gid)
            return
        gen.stream.cancel()
        self.wake()  # the sender sends its done frame ("cancelled")


def make_websocket_endpoint(backend: Backend, settings: Settings, metrics: Metrics):
    async def websocket_endpoint(ws: WebSocket) -> None:
        await WSConnection(ws, backend, settings, metrics).run()

    return websocket_endpoint
