"""Prompts equal vLLM's gpt-oss chat rendering, which Swallow was evaluated with.

`vllm_style` below restates vLLM's chat-completions path for harmony models directly on
openai_harmony (system message with effort and today's date; the leading system/developer message
as developer instructions, later ones as developer messages in place; reasoning as analysis,
content as final, assistant turns with neither skipped; analysis before the last final dropped;
harmony's own dropping off). Every front door renders through `stream()`'s path, checked here
through `prompt_token_ids`.
"""

from __future__ import annotations

import datetime

import pytest
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
)

from swallow_stream import harmony as h
from swallow_stream import stream
from swallow_stream.errors import InvalidRequestError


def vllm_style(messages: list[dict], effort: str | None) -> list[int]:
    system = SystemContent.new()
    if effort is not None:
        system = system.with_reasoning_effort({"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM,
                                               "high": ReasoningEffort.HIGH}[effort])
    system = system.with_conversation_start_date(datetime.datetime.now().strftime("%Y-%m-%d"))
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    rest = list(messages)
    if rest and rest[0]["role"] in ("system", "developer"):
        out.append(Message.from_role_and_content(
            Role.DEVELOPER, DeveloperContent.new().with_instructions(rest.pop(0)["content"])))
    for m in rest:
        role, content = m["role"], m.get("content") or ""
        if role in ("system", "developer"):
            out.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(content)))
        elif role == "user":
            out.append(Message.from_role_and_content(Role.USER, content))
        else:
            if m.get("reasoning"):
                out.append(Message.from_role_and_content(Role.ASSISTANT, m["reasoning"]).with_channel("analysis"))
            if content:
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
    last_final = max((i for i, msg in enumerate(out) if msg.author.role == Role.ASSISTANT and msg.channel == "final"),
                     default=-1)
    out = [msg for i, msg in enumerate(out) if not (i < last_final and msg.channel == "analysis")]
    return h.get_encoding().render_conversation_for_completion(
        Conversation.from_messages(out), Role.ASSISTANT, config=RenderConversationConfig(auto_drop_analysis=False))


CONVERSATIONS = {
    "single": [{"role": "user", "content": "東京の一日観光プランを作ってください。"}],
    "system": [{"role": "system", "content": "You are Swallow. Answer in Japanese."},
               {"role": "user", "content": "Hello!"}],
    "developer-later-system": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What is 17 × 23?"},
        {"role": "assistant", "content": "391.", "reasoning": "17*23 = 391"},
        {"role": "system", "content": "From now on, answer in English."},
        {"role": "user", "content": "And 18 × 23?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "東京の人口は?"},
        {"role": "assistant", "content": "約1400万人です。", "reasoning": "THOUGHT-1"},
        {"role": "user", "content": "大阪は?"},
        {"role": "assistant", "content": "", "reasoning": ""},  # an empty turn: skipped
        {"role": "assistant", "content": "約880万人です。", "reasoning": "THOUGHT-2"},
        {"role": "user", "content": "ありがとう"},
    ],
    "trailing-reasoning": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "DROPPED"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": None, "reasoning": "KEPT"},
    ],
}


@pytest.mark.parametrize("effort", [None, "low", "medium", "high"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_equals_vllm_rendering(name, effort, tiny_engine, monkeypatch):
    monkeypatch.delenv("SWALLOW_STREAM_DATE", raising=False)  # today's date, as vLLM
    messages = CONVERSATIONS[name]
    kwargs = {} if effort is None else {"reasoning_effort": effort}
    s = stream(messages, model=tiny_engine, max_tokens=1, temperature=0, **kwargs)
    s.collect()
    assert s.prompt_token_ids == vllm_style(messages, effort)
    text = h.get_tokenizer().decode(s.prompt_token_ids)
    assert f"Current date: {datetime.datetime.now():%Y-%m-%d}" in text
    assert "THOUGHT" not in text and "DROPPED" not in text


def test_pinned_date_for_reproducible_prompts(monkeypatch):
    monkeypatch.setenv("SWALLOW_STREAM_DATE", "2025-08-05")
    assert "Current date: 2025-08-05" in h.get_tokenizer().decode(h.render_prompt("hi"))
    assert h.render_prompt("hi", date=datetime.date(2024, 1, 2)) == h.render_prompt("hi", date="2024-01-02")
    monkeypatch.setenv("SWALLOW_STREAM_DATE", "not a date")
    with pytest.raises(InvalidRequestError, match="date must be"):
        h.render_prompt("hi")
