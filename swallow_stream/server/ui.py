"""The Gradio chat UI: the reasoning streams into its own collapsible message, the answer below it.

Updates are coalesced (at most one every `settings.ui_update_interval` seconds) so a fast engine
does not flood the browser; Stop cancels the request in the engine; several users share the
engine (the chat event's concurrency limit is raised from Gradio's default of 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import gradio as gr
import torch

from ..backends.base import Backend, open_stream
from ..errors import SwallowError
from ..request import GenerateRequest
from ..stream import AsyncStream
from .doors import open_request
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.ui")

EXAMPLES = [
    "Create a casual one-day Tokyo itinerary in Japanese.",
    "東京で一日ゆったり過ごすプランを提案してください。",
    "Explain the difference between TCP and UDP in three sentences.",
    "日本の四季を題材に俳句を三つ作ってください。",
    "What is 17 × 23? Explain briefly.",
]

REASONING_TITLE = "Reasoning"

CSS = """
#tiny-banner { background: #fff4e5; border: 1px solid #f0a04b; border-radius: 8px; padding: 4px 12px; }
#stats { min-height: 1.5em; font-variant-numeric: tabular-nums; }
"""


def _text_of(content: Any) -> str:
    """Text of a chat message's content as Gradio hands it over (str, a part, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or "" if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "\n".join(t for t in (_text_of(c) for c in content) if t)
    return str(content)


def _get(msg: Any, key: str) -> Any:
    return msg.get(key) if isinstance(msg, dict) else getattr(msg, key, None)


def clean_history(history: Any) -> list[dict]:
    """Chatbot value -> plain {"role","content"[,"metadata"]} dicts (text only)."""
    out = []
    for msg in history or []:
        role = _get(msg, "role")
        if role not in ("user", "assistant", "system"):
            continue
        item: dict[str, Any] = {"role": role, "content": _text_of(_get(msg, "content"))}
        meta = _get(msg, "metadata")
        if meta:
            item["metadata"] = dict(meta)
        out.append(item)
    return out


def model_messages(history: list[dict]) -> list[dict]:
    """What the model sees of the chat: user and answer messages; earlier reasoning is left out."""
    out = []
    for m in history:
        if (m.get("metadata") or {}).get("title"):
            continue  # reasoning (a "thought" message) or a notice: not part of the conversation
        if m["role"] == "assistant" and out and out[-1]["role"] == "assistant":
            out[-1] = {"role": "assistant", "content": out[-1]["content"] + m["content"]}
            continue
        out.append({"role": m["role"], "content": m["content"]})
    return out


def format_stats(s: AsyncStream | None, now: float | None = None, t0: float | None = None) -> str:
    if s is None:
        return ""
    n = s.usage.completion_tokens
    ttft = s.stats.time_to_first_token
    if ttft is None:
        return "waiting for the first token…"
    now = now or time.monotonic()
    tps = s.stats.tokens_per_second
    if tps is None and t0 is not None and n > 1:
        elapsed = now - (t0 + ttft)
        tps = (n - 1) / elapsed if elapsed > 0 else None
    parts = [f"**{tps:.1f} tokens/s**" if tps else "**– tokens/s**", f"first token {ttft:.2f} s", f"{n} tokens"]
    if s.usage.reasoning_tokens or s.done:
        parts.append(f"{s.usage.reasoning_tokens} reasoning")
    if s.done:
        parts.append(s.finish_reason or "")
    return " · ".join(p for p in parts if p)


class ChatTurn:
    """One reply as the chat shows it: the history with the user's message, then a "thought"
    message for the reasoning (pending while it streams, then its duration) and the answer.
    Both handlers (async on the server's loop; a sync generator inside ZeroGPU's GPU call) feed
    it events and yield `view()`s, at most one every `interval` seconds."""

    def __init__(self, hist: list[dict], interval: float):
        self.hist = hist
        self.interval = interval
        self.reasoning: dict | None = None
        self.answer: dict | None = None
        self.t0 = time.monotonic()
        self.t_reason: float | None = None
        self.last = 0.0

    def absorb(self, events, now: float) -> None:
        for ev in events:
            if not ev.text:
                continue
            if ev.channel == "analysis":
                if self.reasoning is None:
                    self.t_reason = now
                    self.reasoning = {"role": "assistant", "content": "",
                                      "metadata": {"title": REASONING_TITLE, "status": "pending"}}
                    self.hist.append(self.reasoning)
                self.reasoning["content"] += ev.text
            else:
                self.close_reasoning(now)
                if self.answer is None:
                    self.answer = {"role": "assistant", "content": ""}
                    self.hist.append(self.answer)
                self.answer["content"] += ev.text

    def close_reasoning(self, now: float) -> None:
        r = self.reasoning
        if r is not None and r["metadata"]["status"] == "pending":
            r["metadata"]["status"] = "done"
            r["metadata"]["duration"] = round(now - (self.t_reason or now), 2)

    def due(self, now: float) -> bool:
        if now - self.last < self.interval:
            return False
        self.last = now
        return True

    def fail(self, e: BaseException) -> str:
        """The error as the chat shows it; -> the metrics code."""
        if isinstance(e, SwallowError):
            self.hist.append({"role": "assistant", "content": f"⚠️ generation failed: {e}"})
            return e.code
        log.error("chat generation failed", exc_info=e)
        self.hist.append({"role": "assistant", "content": f"⚠️ generation failed: {type(e).__name__}"})
        return "internal"

    def finish(self, now: float) -> None:
        self.close_reasoning(now)
        if self.answer is None and self.reasoning is None:
            self.hist.append({"role": "assistant", "content": "",
                              "metadata": {"title": "No visible output", "status": "done"}})

    def view(self, s, now: float) -> tuple:
        return self.hist, "", format_stats(s, now, self.t0)


def start_turn(message, history) -> tuple[list[dict], list[dict] | None]:
    """-> (history as shown, with the new user message; the conversation the model gets, or None
    when the message is empty)."""
    hist = clean_history(history)
    text = (message or "").strip()
    if not text:
        return hist, None
    convo = model_messages(hist) + [{"role": "user", "content": text}]
    hist.append({"role": "user", "content": text})
    return hist, convo


def request_options(system, effort, temperature, top_p, top_k, min_p, max_tokens) -> dict:
    return dict(
        system=(system or "").strip() or None,
        reasoning_effort=effort or "medium",
        temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
        max_tokens=int(max_tokens) if max_tokens else None,
    )


class ChatSessions:
    """Streams running per browser session, so Stop cancels them in the engine at once."""

    def __init__(self) -> None:
        self._streams: dict[str, set[AsyncStream]] = {}

    def add(self, session: str, s: AsyncStream) -> None:
        self._streams.setdefault(session, set()).add(s)

    def discard(self, session: str, s: AsyncStream) -> None:
        group = self._streams.get(session)
        if group is not None:
            group.discard(s)
            if not group:
                del self._streams[session]

    def cancel(self, session: str) -> int:
        group = self._streams.pop(session, set())
        for s in group:
            s.cancel()
        return len(group)


def build_ui(backend: Backend, settings: Settings, metrics: Metrics) -> gr.Blocks:
    gen = backend.generation
    sessions = ChatSessions()
    interval = settings.ui_update_interval
    max_len = backend.max_model_len
    # Half the context at most: the prompt needs room too (a chat asking for the whole context fails)
    default_max = max(16, min(settings.ui_default_max_tokens, max_len // 2) // 16 * 16)
    if backend.is_tiny:
        default_max = min(default_max, 256)  # its output is noise: no point in minutes of it on a CPU

    async def respond(message, history, system, effort, temperature, top_p, top_k, min_p, max_tokens,
                      request: gr.Request) -> AsyncIterator[tuple]:
        hist, convo = start_turn(message, history)
        if convo is None:
            yield hist, message or "", ""
            return
        yield hist, "", "waiting for the first token…"
        session = getattr(request, "session_hash", None) or "anonymous"
        try:
            # Each browser session is its own prefix-cache tenant: one user's prompt never
            # shortens (or shows in the timing of) another's.
            s = await open_request(backend, convo, request_options(system, effort, temperature, top_p, top_k, min_p,
                                                                   max_tokens), tenant=f"ui:{session}")
        except SwallowError as e:
            metrics.count_error("ui", e.code)
            hist.append({"role": "assistant", "content": f"⚠️ {e}"})
            yield hist, "", ""
            return
        metrics.count_request("ui")
        sessions.add(session, s)
        turn = ChatTurn(hist, interval)
        pending: asyncio.Future | None = None
        dirty = False
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(s.__anext__())
                wait = None if not dirty else max(0.0, turn.last + interval - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=wait)
                now = time.monotonic()
                if pending in done:
                    fut, pending = pending, None
                    try:
                        turn.absorb([fut.result(), *s.drain_ready()], now)
                    except StopAsyncIteration:
                        break
                    dirty = True
                if dirty and turn.due(now):
                    dirty = False
                    yield turn.view(s, now)
        except Exception as e:
            metrics.count_error("ui", turn.fail(e))
        finally:
            if pending is not None:
                pending.cancel()
            s.cancel()  # Stop, a closed tab, an error: the engine frees the request now
            sessions.discard(session, s)
        now = time.monotonic()
        turn.finish(now)
        metrics.count_finish("ui", s.finish_reason or "cancelled", s.usage)
        yield turn.view(s, now)

    def respond_on_gpu(message, history, system, effort, temperature, top_p, top_k, min_p, max_tokens):
        """ZeroGPU: a synchronous generator that `spaces.GPU` runs in a forked worker holding the
        GPU. The engine (inline, weights placed at import) steps right here, in the process that
        owns the device, as the stream is read; what it yields is pickled back to the server."""
        # The worker is forked from the server process, whose OpenMP thread team does not survive
        # a fork: a parallel CPU op here would wait on it forever. The device does the work here.
        torch.set_num_threads(1)
        hist, convo = start_turn(message, history)
        if convo is None:
            yield hist, message or "", ""
            return
        yield hist, "", "waiting for the first token…"
        try:
            request = GenerateRequest.create(convo, backend.generation, max_model_len=backend.max_model_len,
                                             **request_options(system, effort, temperature, top_p, top_k, min_p,
                                                               max_tokens))
            s = open_stream(backend, request)
        except SwallowError as e:
            hist.append({"role": "assistant", "content": f"⚠️ {e}"})
            yield hist, "", ""
            return
        turn = ChatTurn(hist, interval)
        try:
            for ev in s:  # each read runs engine steps until a token is ready
                now = time.monotonic()
                turn.absorb([ev], now)
                if turn.due(now):
                    yield turn.view(s, now)
        except Exception as e:
            turn.fail(e)
        finally:
            s.cancel()
        now = time.monotonic()
        turn.finish(now)
        yield turn.view(s, now)

    async def stop(request: gr.Request) -> None:  # on the event loop, like the chats it cancels
        sessions.cancel(getattr(request, "session_hash", None) or "anonymous")

    title = settings.title
    with gr.Blocks(title=title, fill_height=False) as demo:
        picked = " (picked for this hardware)" if settings.model_source == "auto" else ""
        where = " on a remote server" if backend.kind == "openai" else ""
        gr.Markdown(f"## {title} chat\nServing **`{backend.name}`**{where}{picked}. "
                    "The model's reasoning streams in its own collapsible message above the answer.",
                    elem_id="model-info")
        if backend.is_tiny:
            gr.Markdown("⚠️ **Tiny demo model**: random weights, so its output is random noise (shaped like reasoning and an answer). "
                        "Run on a GPU machine (or pass `--model`) to serve GPT-OSS-Swallow.",
                        elem_id="tiny-banner")
        chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520, buttons=["copy", "copy_all"],
                             autoscroll=True, group_consecutive_messages=False)
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(placeholder="Ask anything… / 何でも聞いてください", show_label=False, scale=8,
                                lines=1, max_lines=8, elem_id="prompt", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
        stats = gr.Markdown("", elem_id="stats")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(label="System prompt", lines=2, placeholder="(optional) instructions for the model")
            effort = gr.Radio(["low", "medium", "high"], value="medium", label="Reasoning effort")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.01, 1.0, value=gen.top_p, step=0.01, label="top_p")
            with gr.Row():
                top_k = gr.Slider(0, 200, value=gen.top_k, step=1, label="top_k (0 = off)")
                min_p = gr.Slider(0.0, 1.0, value=gen.min_p, step=0.01, label="min_p")
            max_tokens = gr.Slider(16, max_len, value=default_max, step=16, label="Max new tokens")
        gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Examples")
        clear = gr.Button("Clear chat", size="sm", elem_id="clear")

        inputs = [prompt, chatbot, system, effort, temperature, top_p, top_k, min_p, max_tokens]
        outputs = [chatbot, prompt, stats]
        if settings.gpu_decorator is not None:
            respond = settings.gpu_decorator(respond_on_gpu)
        concurrency = settings.ui_concurrency or backend.max_num_seqs
        common = dict(concurrency_limit=concurrency, concurrency_id="chat", show_progress="hidden")
        ev_submit = prompt.submit(respond, inputs, outputs, api_name="chat", **common)
        ev_click = send.click(respond, inputs, outputs, api_visibility="private", **common)
        stop_btn.click(stop, None, None, cancels=[ev_submit, ev_click], queue=False, api_visibility="private")
        clear.click(lambda: ([], ""), None, [chatbot, stats], queue=False, api_visibility="private")
    # Bounded like the engine's own queue: beyond it a chat is refused at once ("queue full")
    # instead of waiting in an unbounded line in front of the engine's admission limits.
    max_queue = settings.ui_max_queue if settings.ui_max_queue is not None else backend.max_queued_requests
    demo.queue(default_concurrency_limit=concurrency, max_size=max(1, max_queue))
    return demo
