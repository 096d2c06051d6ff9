"""Chat: multi-turn history, prompts equal to stream()'s, undo/reset, save/load, interrupts."""

import json

import pytest

from swallow_stream import Chat, notebook, stream
from swallow_stream.harmony import get_tokenizer

from engine_helpers import wait_idle
from notebook_helpers import ANSWER, REASONING, ipython_outputs, scripted_engine  # noqa: F401 (fixtures)


def contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_turns_keep_history_and_prompt_like_stream(scripted_engine):
    chat = Chat(model=scripted_engine, system="Answer briefly.", reasoning_effort="low",
                temperature=0, max_tokens=64, display=False)
    first = chat("東京の一日プランを作って")
    assert first.finish_reason == "stop"
    assert first.prompt_token_ids == stream(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "東京の一日プランを作って"}],
        model=scripted_engine, reasoning_effort="low", max_tokens=1).prompt_token_ids

    second = chat("もっと短く", max_tokens=40)
    assert second.usage.completion_tokens <= 40
    assert chat.history == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "東京の一日プランを作って"},
        {"role": "assistant", "content": ANSWER, "reasoning": REASONING},
        {"role": "user", "content": "もっと短く"},
        {"role": "assistant", "content": second.answer, "reasoning": second.reasoning},
    ]
    # The same messages through stream() (reasoning included) give the same prompt: harmony
    # drops the earlier reasoning, which the history keeps only for display.
    same = stream(chat.history[:4], model=scripted_engine, reasoning_effort="low", max_tokens=1)
    assert second.prompt_token_ids == same.prompt_token_ids
    assert not contains(second.prompt_token_ids, get_tokenizer().encode(REASONING))
    assert contains(second.prompt_token_ids, get_tokenizer().encode("浅草"))  # the earlier answer stays
    other_effort = stream(chat.history[:4], model=scripted_engine, reasoning_effort="high", max_tokens=1)
    assert other_effort.prompt_token_ids != second.prompt_token_ids  # the effort is part of the prompt
    wait_idle(scripted_engine)


def test_undo_and_reset(scripted_engine):
    chat = Chat(model=scripted_engine, system="sys", max_tokens=64, display=False)
    chat("one")
    chat("two")
    removed = chat.undo()
    assert [m["role"] for m in removed] == ["user", "assistant"] and removed[0]["content"] == "two"
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["one"]
    chat.reset()
    assert chat.history == [{"role": "system", "content": "sys"}] and chat.system == "sys"
    assert chat.undo() == [] and chat.history == [{"role": "system", "content": "sys"}]
    assert Chat(display=False).history == []


def test_save_load_round_trip(scripted_engine, tmp_path):
    chat = Chat(model=scripted_engine, system="丁寧に。", reasoning_effort="high", temperature=0.3, seed=7,
                max_tokens=64, display=False)
    chat("一つ目")
    chat("二つ目")
    path = tmp_path / "chat.json"
    chat.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    # A chat-completions request body in OpenAI's messages shape (vLLM's `reasoning` field).
    assert saved["messages"][0] == {"role": "system", "content": "丁寧に。"}
    assert saved["messages"][2] == {"role": "assistant", "content": ANSWER, "reasoning": REASONING}
    assert saved["reasoning_effort"] == "high" and saved["temperature"] == 0.3 and saved["seed"] == 7
    assert "model" not in saved  # an engine object is not a name

    loaded = Chat.load(path, model=scripted_engine, display=False)
    assert loaded.history == chat.history and loaded.system == "丁寧に。"
    assert loaded.reasoning_effort == "high" and loaded.params == chat.params
    assert loaded.to_dict() == chat.to_dict()
    assert loaded("三つ目").prompt_token_ids == chat("三つ目").prompt_token_ids
    assert loaded.history == chat.history

    named = Chat(model="some/model", display=False)
    named.save(path)
    assert Chat.load(path).model == "some/model"
    path.write_text(json.dumps(saved["messages"][:3]), encoding="utf-8")  # a bare messages list loads too
    assert Chat.load(path).history == chat.history[:3]
    wait_idle(scripted_engine)


def test_an_interrupted_reply_leaves_the_history_as_it_was(scripted_engine, monkeypatch, capsys):
    chat = Chat(model=scripted_engine, max_tokens=64)  # displays: printed here, outside Jupyter
    chat("一つ目")
    before = [dict(m) for m in chat.history]
    seen = []

    def interrupt_on_third(self, ev):
        seen.append(ev)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(notebook._PrintView, "seen", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        chat("二つ目")
    assert chat.history == before
    assert chat.last.finish_reason == "cancelled"
    wait_idle(scripted_engine)  # the request was cancelled and its cache freed
    assert f"[reasoning] {REASONING}\n[answer] {ANSWER}\nstop" in capsys.readouterr().out


def test_chat_in_a_notebook_shows_each_reply_once(ipython_outputs, scripted_engine):
    shell, outputs = ipython_outputs
    shell.user_ns["chat"] = Chat(model=scripted_engine, max_tokens=64)
    assert shell.run_cell('chat("東京")').success
    ids = {o["transient"]["display_id"] for o in outputs}
    assert len(ids) == 1  # the live output only: the returned stream is not shown again
    assert "swallow-answer" in outputs[-1]["data"]["text/html"]
    outputs.clear()
    assert shell.run_cell("chat").success  # the conversation as a whole
    (shown,) = outputs
    assert "東京" in shown["data"]["text/html"] and "&lt;script&gt;" in shown["data"]["text/html"]
    assert "<script" not in shown["data"]["text/html"]
