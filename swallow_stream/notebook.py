"""Notebook support: a stream that renders itself live, a side-by-side comparison, and `Chat`.

In Jupyter (Lab, classic Notebook, VS Code) a stream shows one output, published through
`IPython.display` with a display id and updated in place (no widget extension needed):

- the reasoning in a collapsible `<details>` block, open while it streams, closed once the
  answer starts;
- the answer rendered as Markdown (raw HTML in the model's output is escaped: it is untrusted);
- a stats line: tokens/s, time to first token, token counts, finish reason.

Every bundle also carries `text/plain`. Updates are throttled to `MIN_INTERVAL` seconds; the final
one is always sent. Outside a front end that shows HTML, `display()` prints the text as it streams
and evaluating a stream shows its usual repr.

Only the public stream surface is used (iteration, `.reasoning`, `.answer`, `.finish_reason`,
`.usage`, `.stats`, `.model`), so any stream with it works: `stream`, `astream`, `ws_stream`.
"""

from __future__ import annotations

import asyncio
import html
import json
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Chat", "StreamView", "compare", "display_stream"]

MIN_INTERVAL = 0.1  # seconds between display updates: at most ~10 a second reach the front end

# Background display tasks (an AsyncStream evaluated in a cell): asyncio keeps only weak
# references to tasks, so a task nobody awaits must be held somewhere until it ends.
_tasks: set[asyncio.Task] = set()

# Replies `Chat` has already shown live: evaluating the returned stream must not show it twice.
_shown: "weakref.WeakSet[Any]" = weakref.WeakSet()


# ---------------------------------------------------------------------------------------------
# Rendering


def _markdown_renderer() -> Callable[[str], str]:
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # markdown-it-py comes with gradio (via rich); without it, plain text
        return lambda text: f'<div style="white-space:pre-wrap">{html.escape(text)}</div>'
    # "html": False escapes raw HTML in the text, and markdown-it refuses javascript:/vbscript:/
    # file:/data: links by itself, so the model's output cannot inject markup into the notebook.
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    return md.render


_render_markdown: Callable[[str], str] | None = None


def render_markdown(text: str) -> str:
    """Markdown -> HTML with any raw HTML in `text` escaped."""
    global _render_markdown
    if _render_markdown is None:
        _render_markdown = _markdown_renderer()
    return _render_markdown(text)


def _done(s: Any) -> bool:
    return getattr(s, "finish_reason", None) is not None


def _fmt_seconds(v: float | None) -> str | None:
    return None if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s")


def _reply_html(reasoning: str, answer: str, other: str, done: bool, stats: str | None,
                title: str | None = None) -> str:
    out = ['<div class="swallow-panel" style="flex:1;min-width:0">']
    if title:
        out.append(f'<div class="swallow-title"><b>{html.escape(title)}</b></div>')
    if reasoning or not (answer or other or done):
        # Open while the reasoning is what streams (or nothing has come yet), closed once the
        # answer starts. A reply that ends with no answer keeps it open: it is all there is.
        is_open = not (answer or other)
        if not reasoning:
            label = "Reasoning (waiting for the first token…)"
        elif is_open and not done:
            label = "Reasoning…"
        else:
            label = "Reasoning"
        out.append(
            f'<details class="swallow-reasoning"{" open" if is_open else ""}>'
            f"<summary>{label}</summary>"
            '<div class="swallow-reasoning-text" style="white-space:pre-wrap;opacity:0.75">'
            f"{html.escape(reasoning)}</div></details>"
        )
    if other:
        out.append(f'<div class="swallow-other" style="white-space:pre-wrap">{html.escape(other)}</div>')
    if answer:
        out.append(f'<div class="swallow-answer">{render_markdown(answer)}</div>')
    if stats:
        out.append(f'<div class="swallow-stats" style="font-size:smaller;opacity:0.7">{html.escape(stats)}</div>')
    out.append("</div>")
    return "".join(out)


class _Panel:
    """What the view knows of one stream beyond its own tallies: text outside the harmony
    channels (a model that breaks the grammar still shows its output) and live timing."""

    def __init__(self, stream: Any, title: str | None):
        self.stream = stream
        self.title = title
        self.other: list[str] = []
        self.t_first: float | None = None
        self.n_first = 0
        self.error: BaseException | None = None

    def seen(self, ev: Any, now: float) -> None:
        if self.t_first is None:
            self.t_first, self.n_first = now, self.stream.usage.completion_tokens
        if ev.text and ev.channel not in ("analysis", "final"):
            self.other.append(ev.text)

    def stats_line(self, now: float) -> str:
        s = self.stream
        u, st = s.usage, s.stats
        tps = st.tokens_per_second
        if tps is None and not _done(s) and self.t_first is not None and now > self.t_first:
            tps = (u.completion_tokens - self.n_first) / (now - self.t_first)
        parts = [s.finish_reason or "streaming…"]
        if self.error is not None and s.finish_reason in (None, "error"):
            parts[0] = f"error: {self.error}"
        tokens = f"{u.completion_tokens} tokens"
        if u.reasoning_tokens:
            tokens += f" ({u.reasoning_tokens} reasoning)"
        parts.append(tokens)
        if tps is not None:
            parts.append(f"{tps:.1f} tokens/s")
        ttft = _fmt_seconds(st.time_to_first_token)
        if ttft:
            parts.append(f"first token {ttft}")
        if u.prompt_tokens:
            parts.append(f"prompt {u.prompt_tokens} tokens")
        model = getattr(s, "model", None)
        if model:
            parts.append(str(model) + (" (random weights: the output is noise)" if model == "tiny" else ""))
        return " · ".join(parts)

    def html(self, now: float) -> str:
        s = self.stream
        return _reply_html(s.reasoning, s.answer, "".join(self.other), _done(s), self.stats_line(now), self.title)

    def plain(self, now: float) -> str:
        s = self.stream
        lines = [f"== {self.title} =="] if self.title else []
        if s.reasoning:
            lines += ["[reasoning]", s.reasoning]
        if self.other:
            lines += ["[output]", "".join(self.other)]
        if s.answer:
            lines += ["[answer]", s.answer]
        lines.append(self.stats_line(now))
        return "\n".join(lines)


class StreamView:
    """One display output for one or more streams, updated in place and throttled.

    `refresh()` after each event publishes at most once per `min_interval` seconds of `clock`;
    `refresh(final=True)` always publishes. The clock is injectable so throttling is testable.
    """

    def __init__(
        self,
        streams: Iterable[Any],
        titles: Iterable[str | None] | None = None,
        *,
        min_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        streams = list(streams)
        titles = list(titles) if titles is not None else [None] * len(streams)
        self.panels = [_Panel(s, t) for s, t in zip(streams, titles)]
        self.min_interval = MIN_INTERVAL if min_interval is None else min_interval
        self.clock = clock
        self._handle = None
        self._last: float | None = None

    def bundle(self, now: float | None = None) -> dict[str, str]:
        now = self.clock() if now is None else now
        if len(self.panels) == 1:
            body = self.panels[0].html(now)
        else:
            body = "".join(p.html(now) for p in self.panels)
            body = f'<div style="display:flex;gap:1.5em;align-items:flex-start">{body}</div>'
        return {
            "text/html": f'<div class="swallow-stream">{body}</div>',
            "text/plain": "\n\n".join(p.plain(now) for p in self.panels),
        }

    def show(self) -> None:
        from IPython.display import display

        self._last = self.clock()
        self._handle = display(self.bundle(self._last), raw=True, display_id=True)

    def seen(self, panel: int, ev: Any) -> None:
        self.panels[panel].seen(ev, self.clock())

    def refresh(self, final: bool = False) -> None:
        now = self.clock()
        if not final and self._last is not None and now - self._last < self.min_interval:
            return
        self._last = now
        if self._handle is None:
            self.show()
        else:
            self._handle.update(self.bundle(now), raw=True)


def rich_frontend() -> bool:
    """True inside an IPython front end that shows HTML (a Jupyter kernel), not a terminal."""
    ipython = sys.modules.get("IPython")  # never import IPython just to find it is not running
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False
    return "text/html" in getattr(shell.display_formatter, "active_types", ())


def _is_async(s: Any) -> bool:
    return hasattr(s, "__aiter__") and not hasattr(s, "__iter__")


def _cancel(s: Any) -> None:
    cancel = getattr(s, "cancel", None) or getattr(s, "close", None)
    if cancel is not None and not _done(s):
        cancel()


def _consume(view: StreamView, i: int, s: Any) -> None:
    try:
        for ev in s:
            view.seen(i, ev)
            view.refresh()
    except BaseException as e:
        view.panels[i].error = e
        raise
    finally:
        _cancel(s)  # an interrupt or error in this loop leaves the request running otherwise
        view.refresh(final=True)


async def _aconsume(view: StreamView, i: int, s: Any) -> None:
    try:
        async for ev in s:
            view.seen(i, ev)
            view.refresh()
    except BaseException as e:
        view.panels[i].error = e
        raise
    finally:
        _cancel(s)
        view.refresh(final=True)


class _PrintView:
    """Outside a rich front end: the text as it streams, a label when the channel changes."""

    def __init__(self, file=None):
        self.file = file or sys.stdout
        self.channel: object = ()

    def seen(self, ev: Any) -> None:
        if not ev.text:
            return
        if ev.channel != self.channel:
            label = {"analysis": "[reasoning] ", "final": "[answer] "}.get(ev.channel, "")
            self.file.write(("\n" if self.channel != () else "") + label)
            self.channel = ev.channel
        self.file.write(ev.text)
        self.file.flush()

    def end(self, s: Any) -> None:
        panel = _Panel(s, None)
        self.file.write(("\n" if self.channel != () else "") + panel.stats_line(time.monotonic()) + "\n")
        self.file.flush()


def _print_live(s: Any) -> None:
    out = _PrintView()
    try:
        for ev in s:
            out.seen(ev)
    finally:
        _cancel(s)
        out.end(s)


async def _aprint_live(s: Any) -> None:
    out = _PrintView()
    try:
        async for ev in s:
            out.seen(ev)
    finally:
        _cancel(s)
        out.end(s)


def display_stream(s: Any, *, min_interval: float | None = None, clock: Callable[[], float] = time.monotonic):
    """Show a stream live, consuming it (what `Stream.display()` does).

    A sync stream is consumed here and None returned. An async stream returns an asyncio.Task
    on the running loop: `await s.display()` waits for the end; not awaited, the output keeps
    updating in the background while the loop (Jupyter's) runs other cells.
    Outside a front end that shows HTML, the text is printed as it streams.
    """
    rich = rich_frontend()
    if _is_async(s):
        loop = asyncio.get_running_loop()
        if rich:
            view = StreamView([s], min_interval=min_interval, clock=clock)
            view.show()  # the output exists before the cell returns, even when not awaited
            coro = _aconsume(view, 0, s)
        else:
            coro = _aprint_live(s)
        task = loop.create_task(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return task
    if not rich:
        _print_live(s)
        return None
    view = StreamView([s], min_interval=min_interval, clock=clock)
    view.show()
    _consume(view, 0, s)
    return None


def ipython_display_hook(s: Any) -> Callable[[], None] | None:
    """The `_ipython_display_` of a stream: live display in a rich front end, else None so
    IPython falls back to the plain repr (a terminal shows what it always showed)."""
    if not rich_frontend():
        return None

    def show() -> None:
        if s not in _shown:
            display_stream(s)

    return show


async def compare(
    prompt_or_messages: Any,
    reasoning_efforts: Iterable[str] = ("low", "medium", "high"),
    *,
    model: Any = None,
    min_interval: float | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run one prompt at several reasoning efforts at once and show them side by side, live.

    `await compare("…", seed=0, max_tokens=256)` -> {effort: finished AsyncStream}. The requests
    are batched together by the engine. `params` go to `astream()`.
    """
    from .api import astream

    efforts = list(reasoning_efforts)
    streams = [astream(prompt_or_messages, model=model, reasoning_effort=e, **params) for e in efforts]
    if rich_frontend():
        view = StreamView(streams, [f"reasoning_effort={e!r}" for e in efforts], min_interval=min_interval)
        view.show()
        runs = [_aconsume(view, i, s) for i, s in enumerate(streams)]
    else:
        runs = [s.collect() for s in streams]
    try:
        await asyncio.gather(*runs)
    finally:
        for s in streams:
            _cancel(s)
    if not rich_frontend():
        for e, s in zip(efforts, streams):
            print(f"== reasoning_effort={e!r} ==\n{_Panel(s, None).plain(time.monotonic())}\n")
    return dict(zip(efforts, streams))


# ---------------------------------------------------------------------------------------------
# Chat


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs")


class Chat:
    """A multi-turn conversation: `chat("質問")` streams (and shows) the reply and keeps it.

    `history` is a list of OpenAI-style messages (the system message first when there is one);
    assistant turns carry `reasoning` as well, for display. Earlier reasoning never reaches the
    prompt (harmony drops it), so each turn's prompt is `stream()`'s for `prompt_messages()`.

    A reply that ends (finish_reason stop or length) is added with its question, even if cut
    short. A reply interrupted in this call (KeyboardInterrupt, an error) adds nothing: the
    history stays as it was, so the question can simply be asked again; the partial stream is
    `chat.last`.
    """

    def __init__(self, model: Any = None, system: str | None = None, reasoning_effort: str = "medium",
                 *, display: bool = True, **params: Any):
        self.model = model
        self.reasoning_effort = reasoning_effort
        self.params = params
        self.display = display
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []
        self.last: Any = None

    @property
    def system(self) -> str | None:
        if self.history and self.history[0]["role"] == "system":
            return self.history[0]["content"]
        return None

    def prompt_messages(self, user: str | None = None) -> list[dict]:
        """The messages the next prompt is rendered from: the history without reasoning (harmony
        drops earlier turns' analysis anyway), without replies that have no answer (a reply cut
        short inside its reasoning), then `user`."""
        msgs = []
        for m in self.history:
            if m["role"] == "assistant":
                if not m.get("content"):
                    continue
                m = {"role": "assistant", "content": m["content"]}
            msgs.append(dict(m))
        if user is not None:
            msgs.append({"role": "user", "content": user})
        return msgs

    def __call__(self, message: str, **params: Any):
        """Ask; streams the reply (live in Jupyter, printed elsewhere; `display=False`: silent)
        and returns its finished Stream. `params` override the chat's for this turn only.
        The reply is already shown, so evaluating the call in a cell does not show it twice
        (`chat.last.display()` shows it again)."""
        from .api import stream

        s = stream(self.prompt_messages(message), model=self.model, reasoning_effort=self.reasoning_effort,
                   **{**self.params, **params})
        self.last = s
        if self.display:
            display_stream(s)
        else:
            s.collect()
        # Reached only when the reply ended by itself: an interrupt or error propagates above.
        reply: dict[str, Any] = {"role": "assistant", "content": s.answer}
        if s.reasoning:
            reply["reasoning"] = s.reasoning
        self.history += [{"role": "user", "content": message}, reply]
        _shown.add(s)
        return s

    def undo(self) -> list[dict]:
        """Remove the last question and its reply; returns them ([] when there is none)."""
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i]["role"] == "user":
                removed, self.history = self.history[i:], self.history[:i]
                return removed
        return []

    def reset(self) -> None:
        """Forget the conversation; the system message stays."""
        self.history = [m for m in self.history[:1] if m["role"] == "system"]
        self.last = None

    def to_dict(self) -> dict:
        """A chat-completions request body: messages (with `reasoning`), reasoning_effort, params,
        and the model when it was given by name."""
        d: dict[str, Any] = {}
        if isinstance(self.model, str):
            d["model"] = self.model
        d["messages"] = [dict(m) for m in self.history]
        d["reasoning_effort"] = self.reasoning_effort
        d.update(self.params)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict | list, *, model: Any = None, **overrides: Any) -> "Chat":
        if isinstance(d, list):  # a bare messages list
            d = {"messages": d}
        d = dict(d)
        messages = d.pop("messages", [])
        saved_model = d.pop("model", None)
        effort = overrides.pop("reasoning_effort", d.pop("reasoning_effort", "medium"))
        display = overrides.pop("display", True)
        params = {k: v for k, v in d.items() if k in _SAMPLING_KEYS}
        params.update(overrides)
        chat = cls(model if model is not None else saved_model, None, effort, display=display, **params)
        chat.history = [dict(m) for m in messages]
        return chat

    @classmethod
    def load(cls, path: str | Path, *, model: Any = None, **overrides: Any) -> "Chat":
        """A chat saved by `save()` (or any JSON list of OpenAI messages); `model` and params
        given here win over the saved ones."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), model=model, **overrides)

    def _ipython_display_(self) -> None:
        """The conversation so far: questions, reasoning (collapsed) and answers."""
        from IPython.display import display

        parts, plain = [], []
        for m in self.history:
            if m["role"] == "assistant":
                parts.append(_reply_html(m.get("reasoning", ""), m.get("content") or "", "", True, None))
                plain.append(f"assistant: {m.get('content') or ''}")
            else:
                text = _content_text(m.get("content"))
                parts.append(f'<div class="swallow-{html.escape(m["role"])}" style="white-space:pre-wrap;margin-top:0.8em">'
                             f'<b>{html.escape(m["role"])}</b>: {html.escape(text)}</div>')
                plain.append(f"{m['role']}: {text}")
        body = "".join(parts)
        display({"text/html": f'<div class="swallow-chat">{body}</div>', "text/plain": "\n".join(plain) or repr(self)},
                raw=True)

    def __repr__(self) -> str:
        turns = sum(m["role"] == "user" for m in self.history)
        return f"<Chat {turns} turn{'s' if turns != 1 else ''}, reasoning_effort={self.reasoning_effort!r}>"
