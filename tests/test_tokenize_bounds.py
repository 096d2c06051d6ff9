"""Tokenizing and rendering hostile prompts: linear time, and the same ids as unsplit encoding
(and as openai_harmony's own rendering) for ordinary text."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

from swallow_stream import harmony as h
from swallow_stream.harmony.tokenizer import CHUNK_CHARS, MAX_RUN_CHARS, split_for_encoding

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return h.get_tokenizer()


def _real_text() -> str:
    files = sorted((ROOT / "swallow_stream").rglob("*.py"))[:40] + [ROOT / "README.md"]
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    assert len(text) > 20 * CHUNK_CHARS
    return text


def _mixed_text(seed: int = 0) -> str:
    rnd = random.Random(seed)
    words = ["東京", "の", "一日", "plan", "isn't", "I'LL", "x=1;", "  indent", "\t", "\r\n", "\n\n  ", "//", "/path/",
             "!!!", "42", "123456", "😀", "e\u0301", " ", "  ", "\n", "-->", "<|end|>", "ﬁ", "Ω"]
    return "".join(rnd.choice(words) for _ in range(60_000))


@pytest.mark.parametrize("source", ["real", "mixed"])
def test_chunked_encoding_equals_unsplit(tok, source):
    text = _real_text() if source == "real" else _mixed_text()
    pieces = split_for_encoding(text)
    assert len(pieces) > 5 and "".join(pieces) == text
    assert all(len(p) <= MAX_RUN_CHARS for p in pieces)
    assert tok.encode(text) == tok._enc.encode_ordinary(text)


def test_split_keeps_small_text_whole():
    assert split_for_encoding("a" * CHUNK_CHARS) == ["a" * CHUNK_CHARS]


@pytest.mark.parametrize("unit", ["a", " ", "\n", "!", "1", "あ", "😀", "ab", "a\n/"])
def test_hostile_runs_encode_in_linear_time(tok, unit):
    text = unit * (200_000 // len(unit))
    t = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t < 2.0
    assert tok.decode(ids) == text


def _harmony_render(msgs, instructions=None):
    conv = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
                                          .with_conversation_start_date("2025-08-01"))]
    if instructions:
        conv.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions)))
    conv += msgs
    return h.get_encoding().render_conversation_for_completion(Conversation.from_messages(conv), Role.ASSISTANT)


def test_render_equals_harmony_on_ordinary_text():
    long = _real_text()[:60_000]
    msgs = [{"role": "system", "content": "Be brief.\n\nAnswer in Japanese. "},
            {"role": "user", "content": long},
            {"role": "assistant", "content": "はい、わかりました。", "reasoning": "dropped"},
            {"role": "user", "content": "  leading and trailing spaces \n"}]
    ours = h.render_prompt(msgs, system="You are Swallow.", date="2025-08-01")
    theirs = _harmony_render([
        Message.from_role_and_content(Role.DEVELOPER,
                                      DeveloperContent.new().with_instructions("Be brief.\n\nAnswer in Japanese. ")),
        Message.from_role_and_content(Role.USER, long),
        Message.from_role_and_content(Role.ASSISTANT, "はい、わかりました。").with_channel("final"),
        Message.from_role_and_content(Role.USER, "  leading and trailing spaces \n"),
    ], instructions="You are Swallow.")
    assert ours == theirs


def test_render_hostile_prompt_is_fast():
    t = time.perf_counter()
    ids = h.render_prompt([{"role": "system", "content": "b" * 200_000}, {"role": "user", "content": "a" * 200_000}])
    assert time.perf_counter() - t < 3.0
    text = h.get_tokenizer().decode(ids)
    assert "a" * 200_000 in text and "b" * 200_000 in text
