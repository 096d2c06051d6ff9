"""ZeroGPU, as far as it runs without one, under the real `spaces` package.

On ZeroGPU (checked against the `spaces` source): tensors placed on CUDA while the app starts are
packed and moved into a forked worker that holds the GPU; a function decorated with `spaces.GPU`
runs in that worker and, when it is a generator, sends each value it yields back pickled; the
startup hangs on Gradio's `Blocks.launch`. Without SPACES_ZERO_GPU the real decorator returns the
function itself, so here the worker is a forked process of our own: the chat handler must be a
synchronous generator, step the engine where it runs, yield picklable values, and the server
process must never step (nor allocate the KV cache) outside such a call.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import pickle

import httpx
import pytest
import spaces
from websockets.sync.client import connect

from server_helpers import serve

ARGS = ["--model", "tiny", "--device", "cpu"]


@pytest.fixture
def zero_gpu_app(monkeypatch):
    from swallow_stream.server.cli import create_app

    monkeypatch.setenv("SWALLOW_ZERO_GPU", "1")
    monkeypatch.setenv("SWALLOW_ZERO_GPU_DURATION", "90")
    app, settings, backend = create_app(ARGS)
    yield app, settings, backend
    backend.shutdown()


def chat_fn(app):
    (fn,) = [f.fn for f in app.state.demo.fns.values() if f.api_name == "chat"]
    return fn


def _run_in_worker(fn, args, out):
    """ZeroGPU's worker, played by a forked process: run the GPU function, pickle what it yields."""
    try:
        for value in fn(*args):
            out.put(pickle.dumps(value))
    except BaseException as e:  # reported to the parent, like ZeroGPU's ExceptionResult
        out.put(pickle.dumps(("error", repr(e))))
    out.put(None)


def test_the_chat_is_a_sync_generator_under_the_real_decorator(zero_gpu_app):
    app, settings, backend = zero_gpu_app
    fn = chat_fn(app)
    from spaces.zero.decorator import _GPU

    # spaces.GPU(duration=90): the real decorator, applied to the chat handler
    assert settings.gpu_decorator.func is _GPU and settings.gpu_decorator.keywords["duration"] == 90
    assert fn.__name__ == "respond_on_gpu"
    assert inspect.isgeneratorfunction(fn) and not inspect.isasyncgenfunction(fn)
    # the engine runs inline and has not touched the device for anything but its weights
    assert backend.engine.inline and backend.engine.runner is None
    assert backend.engine.engine_config.cuda_graphs is False


def test_the_engine_steps_in_the_worker_and_the_server_process_never_does(zero_gpu_app):
    app, _, backend = zero_gpu_app
    fn = chat_fn(app)
    out = multiprocessing.get_context("fork").Queue()
    args = ("Create a casual one-day Tokyo itinerary in Japanese.", [], "", "medium", 0.0, 1.0, 0, 0.0, 64)
    worker = multiprocessing.get_context("fork").Process(target=_run_in_worker, args=(fn, args, out))
    worker.start()
    values = []
    while (item := out.get(timeout=120)) is not None:
        values.append(pickle.loads(item))
    worker.join(30)
    assert worker.exitcode == 0
    assert not any(v[0] == "error" for v in values if isinstance(v, tuple) and len(v) == 2), values
    views = [v for v in values if isinstance(v, tuple) and len(v) == 3]
    hist, prompt, stats = views[-1]
    assert prompt == "" and hist[0] == {"role": "user", "content": args[0]}
    thought = [m for m in hist if (m.get("metadata") or {}).get("title") == "Reasoning"]
    answer = [m for m in hist[1:] if m["role"] == "assistant" and not m.get("metadata")]
    assert thought and thought[0]["metadata"]["status"] == "done" and thought[0]["content"]
    assert answer and answer[0]["content"]
    assert "tokens/s" in stats and ("stop" in stats or "length" in stats)
    assert len(views) >= 3  # it streamed: the user's message first, then growing replies
    # the steps ran in the worker's copy of the engine: this process never built its runner
    assert backend.engine.runner is None and backend.stats()["steps_total"] == 0


def test_ws_and_v1_say_why_they_cannot_generate(zero_gpu_app):
    app, _, backend = zero_gpu_app
    with serve(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "ZeroGPU" in r.json()["error"]["message"]
        with connect(srv.ws, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "generate", "id": "g", "prompt": "hi"}))
            frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and frame["id"] == "g" and "ZeroGPU" in frame["message"]
        assert httpx.get(srv.url + "/health", timeout=30).json()["ready"]
    assert backend.engine.runner is None


def test_startup_is_a_no_op_off_zerogpu():
    from swallow_stream.server.cli import zero_gpu_startup

    zero_gpu_startup()  # `spaces.zero.startup` exists only with SPACES_ZERO_GPU set
    assert not hasattr(spaces.zero, "startup")
