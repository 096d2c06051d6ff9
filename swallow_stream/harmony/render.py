"""Messages in, harmony prompt token ids out (the rendering vLLM's gpt-oss chat path uses)."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from ..errors import InvalidRequestError
from .vocab import get_encoding

REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant")


def normalize_reasoning_effort(value: Any) -> str:
    """"low" | "medium" | "high" (case-insensitive input), else InvalidRequestError."""
    if isinstance(value, str) and value.strip().lower() in REASONING_EFFORTS:
        return value.strip().lower()
    raise InvalidRequestError(
        f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {value!r}"
    )


def _text_of(content: Any, where: str, *, allow_none: bool = False) -> str | None:
    # A str, or OpenAI content parts [{"type": "text", "text": ...}, ...] joined with "\n".
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequestError(
                    f"{where}.content[{j}] must be an object like "
                    f'{{"type": "text", "text": "..."}}, got {type(part).__name__}'
                )
            kind = part.get("type")
            if kind != "text":
                raise InvalidRequestError(
                    f"{where}.content[{j}] has type {kind!r}; only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(f"{where}.content[{j}].text must be a string")
            texts.append(text)
        return "\n".join(texts)
    if content is None:
        raise InvalidRequestError(f"{where} has no content")
    raise InvalidRequestError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def normalize_messages(prompt_or_messages: Any) -> list[dict[str, str]]:
    """Validate a prompt (str: one user message) or OpenAI-style messages.

    Returns `[{"role", "content"[, "reasoning"]}]` with every content a str, roles from ROLES and
    "reasoning" only on assistant messages; raises InvalidRequestError naming the first problem.
    """
    if isinstance(prompt_or_messages, str):
        if not prompt_or_messages.strip():
            raise InvalidRequestError("prompt is empty")
        return [{"role": "user", "content": prompt_or_messages}]
    if not isinstance(prompt_or_messages, (list, tuple)):
        raise InvalidRequestError(
            "expected a prompt string or a list of messages, got "
            f"{type(prompt_or_messages).__name__}"
        )
    if not prompt_or_messages:
        raise InvalidRequestError("messages is empty")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(prompt_or_messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(
                f'{where} must be an object with "role" and "content", got {type(msg).__name__}'
            )
        role = msg.get("role")
        if role not in ROLES:
            if role in ("tool", "function"):
                raise InvalidRequestError(
                    f"{where}: role {role!r} is not supported (no tool calling); "
                    f"allowed roles: {', '.join(ROLES)}"
                )
            raise InvalidRequestError(
                f"{where}: unknown role {role!r}; allowed roles: {', '.join(ROLES)}"
            )
        if role == "assistant":
            if msg.get("tool_calls") or msg.get("function_call"):
                raise InvalidRequestError(f"{where}: assistant tool calls are not supported")
            reasoning = msg.get("reasoning")
            if reasoning is None:
                reasoning = msg.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise InvalidRequestError(f"{where}.reasoning must be a string")
            content = _text_of(msg.get("content"), where, allow_none=bool(reasoning))
            item = {"role": role, "content": content or ""}
            if reasoning:
                item["reasoning"] = reasoning
            out.append(item)
        else:
            if "content" not in msg:
                raise InvalidRequestError(f"{where} has no content")
            out.append({"role": role, "content": _text_of(msg["content"], where)})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRequestError("messages contain no user message")
    return out


ENV_DATE = "SWALLOW_STREAM_DATE"


def conversation_date(date: Any = None) -> str:
    """The system message's `Current date:` YYYY-MM-DD: `date`, else $SWALLOW_STREAM_DATE (pin it
    for reproducible prompts), else today (local time, as vLLM renders it)."""
    if date is None:
        date = os.environ.get(ENV_DATE) or _dt.datetime.now()
    if isinstance(date, (_dt.date, _dt.datetime)):
        return date.strftime("%Y-%m-%d")
    if isinstance(date, str):
        try:
            return _dt.date.fromisoformat(date.strip()).strftime("%Y-%m-%d")
        except ValueError:
            pass
    raise InvalidRequestError(f"date must be a YYYY-MM-DD string or a datetime.date, got {date!r}")


def render_prompt(
    messages: Any,
    *,
    reasoning_effort: str = "medium",
    system: str | None = None,
    date: str | _dt.date | None = None,
) -> list[int]:
    """Harmony prompt token ids for a prompt string or OpenAI-style messages (validated here),
    ending with `<|start|>assistant` (generation starts in its header). See `render_messages`."""
    return render_messages(normalize_messages(messages), reasoning_effort=reasoning_effort, system=system, date=date)


def render_messages(
    msgs: list[dict[str, str]],
    *,
    reasoning_effort: str = "medium",
    system: str | None = None,
    date: str | _dt.date | None = None,
) -> list[int]:
    """Harmony prompt token ids for messages already through `normalize_messages`, rendered as
    vLLM's gpt-oss chat path renders them (the path Swallow was evaluated with):

    - the system message: reasoning effort and `Current date:` (`date`, else $SWALLOW_STREAM_DATE,
      else today);
    - the first message, when it is system or developer (or the `system` argument, which comes
      first), becomes the developer message's instructions; later system/developer messages
      become developer messages where they stand;
    - an assistant turn's reasoning is an analysis message, its content a final one; a turn with
      neither is skipped; analysis before the last final message is dropped (earlier turns'
      reasoning never reaches the prompt).
    """
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        RenderConversationConfig,
        Role,
        SystemContent,
    )

    effort = normalize_reasoning_effort(reasoning_effort)
    if system is not None and not isinstance(system, str):
        raise InvalidRequestError(f"system must be a string, got {type(system).__name__}")
    if system:
        msgs = [{"role": "system", "content": system}, *msgs]

    def developer(instructions: str) -> Any:
        return Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions))

    sys_content = (SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
                   .with_conversation_start_date(conversation_date(date)))
    conv: list[Any] = [Message.from_role_and_content(Role.SYSTEM, sys_content)]
    # The text of each message after the system one, in order. openai_harmony renders the
    # skeleton with every text empty and our tokenizer encodes the texts: harmony's own BPE is
    # quadratic on long runs of one character and holds the GIL while it works, so a hostile
    # prompt rendered by it would freeze every thread (an event loop included) for seconds.
    bodies: list[str] = []

    def add(role: Any, text: str, channel: str | None = None) -> None:
        msg = Message.from_role_and_content(role, "")
        conv.append(msg.with_channel(channel) if channel else msg)
        bodies.append(text)

    def developer(instructions: str) -> None:
        conv.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("")))
        bodies.append(DEVELOPER_HEADING + instructions)

    if msgs and msgs[0]["role"] in ("system", "developer"):
        if msgs[0]["content"]:
            developer(msgs[0]["content"])
        msgs = msgs[1:]
    for m in msgs:
        if m["role"] in ("system", "developer"):
            developer(m["content"])
        elif m["role"] == "user":
            add(Role.USER, m["content"])
        else:
            if m.get("reasoning"):
                add(Role.ASSISTANT, m["reasoning"], "analysis")
            if m["content"]:
                add(Role.ASSISTANT, m["content"], "final")
    # Harmony's own auto_drop_analysis (0.0.8) only drops analysis before the *first* final
    # message; with several earlier turns their reasoning would leak into the prompt.
    finals = [i for i, msg in enumerate(conv) if msg.channel == "final"]
    if finals:
        keep = [i for i, msg in enumerate(conv) if not (msg.channel == "analysis" and i < finals[-1])]
        conv, bodies = [conv[i] for i in keep], [bodies[i - 1] for i in keep if i > 0]
    skeleton = get_encoding().render_conversation_for_completion(
        Conversation.from_messages(conv), Role.ASSISTANT, config=RenderConversationConfig(auto_drop_analysis=False)
    )
    return _fill(skeleton, bodies)


# How harmony opens a developer message's text (checked against harmony by the tests).
DEVELOPER_HEADING = "# Instructions\n\n"


def _fill(skeleton: list[int], bodies: list[str]) -> list[int]:
    """The skeleton with message k+1's text (between its <|message|> and <|end|>) replaced by
    the encoding of bodies[k]; the system message (k = 0) is kept as harmony wrote it."""
    from .tokenizer import get_tokenizer
    from .tokens import TOKEN_END, TOKEN_MESSAGE

    tok = get_tokenizer()
    out: list[int] = []
    k = -1
    i, n = 0, len(skeleton)
    while i < n:
        t = skeleton[i]
        out.append(t)
        i += 1
        if t != TOKEN_MESSAGE:
            continue
        if k >= 0:
            if k >= len(bodies):
                raise AssertionError("harmony rendered more messages than were given")
            out.extend(tok.encode(bodies[k]))
            while i < n and skeleton[i] != TOKEN_END:
                i += 1
        k += 1
    if k != len(bodies):
        raise AssertionError(f"harmony rendered {k} messages after the system one; expected {len(bodies)}")
    return out
