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

from ..backends.base import Backend
from ..errors import SwallowError
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
        hist = clean_history(history)
        text = (message or "").strip()
        if not text:
            yield hist, message or "", ""
            return
        convo = model_messages(hist) + [{"role": "user", "content": text}]
        hist.append({"role": "user", "content": text})
        yield hist, "", "waiting for the first token…"
        session = getattr(request, "session_hash", None) or "anonymous"
        try:
            # Each browser session is its own prefix-cache tenant: one user's prompt never
            # shortens (or shows in the timing of) another's.
            s = await open_request(backend, convo, dict(
                system=(system or "").strip() or None,
                reasoning_effort=effort or "medium",
                temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
                max_tokens=int(max_tokens) if max_tokens else None,
            ), tenant=f"ui:{session}")
        except SwallowError as e:
            metrics.count_error("ui", e.code)
            hist.append({"role": "assistant", "content": f"⚠️ {e}"})
            yield hist, "", ""
            return
        metrics.count_request("ui")
        sessions.add(session, s)
        t0 = time.monotonic()
        reasoning: dict | None = None
        answer: dict | None = None
        t_reason: float | None = None
        pending: asyncio.Future | None = None
        last = 0.0
        dirty = False

        def close_reasoning(now: float) -> None:
            if reasoning is not None and reasoning["metadata"]["status"] == "pending":
                reasoning["metadata"]["status"] = "done"
                reasoning["metadata"]["duration"] = round(now - (t_reason or now), 2)

        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(s.__anext__())
                wait = None if not dirty else max(0.0, last + interval - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=wait)
                now = time.monotonic()
                if pending in done:
                    fut, pending = pending, None
                    try:
                        batch = [fut.result(), *s.drain_ready()]
                    except StopAsyncIteration:
                        break
                    for ev in batch:
                        if not ev.text:
                            continue
                        if ev.channel == "analysis":
                            if reasoning is None:
                                t_reason = now
                                reasoning = {"role": "assistant", "content": "",
                                             "metadata": {"title": REASONING_TITLE, "status": "pending"}}
                                hist.append(reasoning)
                            reasoning["content"] += ev.text
                        else:
                            close_reasoning(now)
                            if answer is None:
                                answer = {"role": "assistant", "content": ""}
                                hist.append(answer)
                            answer["content"] += ev.text
                    dirty = True
                if dirty and now - last >= interval:
                    last, dirty = now, False
                    yield hist, "", format_stats(s, now, t0)
        except SwallowError as e:
            metrics.count_error("ui", e.code)
            hist.append({"role": "assistant", "content": f"⚠️ generation failed: {e}"})
        except Exception as e:
            log.exception("chat generation failed")
            metrics.count_error("ui", "internal")
            hist.append({"role": "assistant", "content": f"⚠️ generation failed: {type(e).__name__}"})
        finally:
            if pending is not None:
                pending.cancel()
            s.cancel()  # Stop, a closed tab, an error: the engine frees the request now
            sessions.discard(session, s)
        now = time.monotonic()
        close_reasoning(now)
        metrics.count_finish("ui", s.finish_reason or "cancelled", s.usage)
        if answer is None and reasoning is None:
            hist.append({"role": "assistant", "content": "",
                         "metadata": {"title": "No visible output", "status": "done"}})
        yield hist, "", format_stats(s, now, t0)

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
            respond = settings.gpu_decorator(respond)
        concurrency = settings.ui_concurrency or backend.max_num_seqs
        common = dict(concurrency_limit=concurrency, concurrency_id="chat", show_progress="hidden")
        ev_submit = prompt.submit(respond, inputs, outputs, api_name="chat", **common)
        ev_click = send.click(respond, inputs, outputs, api_visibility="private", **common)
        stop_btn.click(stop, None, None, cancels=[ev_submit, ev_click], queue=False, api_visibility="private")
        clear.click(lambda: ([], ""), None, [chatbot, stats], queue=False, api_visibility="private")
    # Bounded like the engine's own queue: beyond it a chat is refused at once ("queue full")
    # instead of waiting in an unbounded line in front of the engine's admission limits.
    max_queue = settings.ui_max_queue
    if max_queue is None:
        max_queue = getattr(getattr(backend, "engine", None), "engine_config", None)
        max_queue = max_queue.max_queued_requests if max_queue is not None else 64
    demo.queue(default_concurrency_limit=concurrency, max_size=max(1, max_queue))
    return demo
