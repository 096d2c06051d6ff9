"""Exiting Python with requests still open (issue #14): each script runs in its own interpreter
and must end with its own exit code, never an abort ("terminate called without an active
exception", SIGABRT) from the engine thread outliving torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

PRELUDE = """
import asyncio, os, sys, time
from swallow_stream import load, stream, astream
load("tiny", max_num_seqs=4)
"""

SCRIPTS = {
    # the script from the issue: a stream opened and never read
    "sync stream never read": ("s = stream('x', max_tokens=60)\n", 0),
    # the engine thread mid-step while the interpreter exits
    "sync stream mid-iteration": ("s = stream('x', max_tokens=400)\nit = iter(s)\nnext(it); next(it)\n", 0),
    "several streams, sys.exit": ("ss = [stream('x', max_tokens=400) for _ in range(3)]\n"
                                  "[next(iter(s)) for s in ss]\nsys.exit(7)\n", 7),
    "exception with a stream open": ("s = stream('x', max_tokens=400)\nnext(iter(s))\nraise RuntimeError('boom')\n", 1),
    "async stream left open": ("async def main():\n"
                               "    s = astream('x', max_tokens=400)\n"
                               "    await s.__anext__()\n"
                               "    return s\n"
                               "keep = asyncio.run(main())\n", 0),
    "async stream, loop closed mid-stream": ("async def main():\n"
                                             "    s = astream('x', max_tokens=400)\n"
                                             "    await s.__anext__()\n"
                                             "    asyncio.get_running_loop().stop()\n"
                                             "    await asyncio.sleep(30)\n"
                                             "loop = asyncio.new_event_loop()\n"
                                             "loop.create_task(main())\nloop.run_forever()\nloop.close()\n"
                                             "time.sleep(0.5)\n", 0),
    "background server with a WebSocket stream": (
        "from swallow_stream.server.background import serve_in_background\n"
        "from swallow_stream.client import ws_stream\n"
        "srv = serve_in_background(ui=False)\n"
        "s = ws_stream(srv.ws, 'x', max_tokens=400)\nnext(iter(s))\nsys.exit(5)\n", 5),
}


def _env(cache: Path) -> dict:
    env = dict(os.environ, SWALLOW_STREAM_CACHE=str(cache), PYTHONPATH=str(ROOT))
    env.pop("SWALLOW_MODEL", None)
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("exit-cache")
    # build the tiny checkpoint once, so each script below only loads it
    subprocess.run([PY, "-c", 'from swallow_stream import load; load("tiny").shutdown()'], env=_env(path),
                   check=True, timeout=300, capture_output=True)
    return path


def _assert_clean(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, code: int) -> None:
    assert "terminate called" not in out and "Fatal Python error" not in out, out[-3000:]
    assert proc.returncode == code, (proc.returncode, out[-3000:])


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_exit_is_clean(cache, name):
    body, code = SCRIPTS[name]
    proc = subprocess.run([PY, "-c", PRELUDE + body], env=_env(cache), timeout=120, capture_output=True, text=True)
    _assert_clean(proc, proc.stdout + proc.stderr, code)


def test_sigterm_to_a_streaming_script_is_not_an_abort(cache):
    body = "s = stream('x', max_tokens=4000)\nprint('streaming', flush=True)\nfor tok in s:\n    pass\n"
    proc = subprocess.Popen([PY, "-c", PRELUDE + body], env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    _assert_clean(proc, out, -signal.SIGTERM)  # Python's default: killed by the signal itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_app_py_with_open_streams_shuts_down_gracefully(cache):
    port = _free_port()
    proc = subprocess.Popen([PY, str(ROOT / "app.py"), "--model", "tiny", "--port", str(port), "--log-level", "info"],
                            env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        import httpx
        from websockets.sync.client import connect

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            for i in range(3):
                ws.send(json.dumps({"type": "generate", "id": i, "prompt": "x", "params": {"max_tokens": 4000}}))
            kinds = set()
            while "token" not in kinds:
                kinds.add(json.loads(ws.recv(timeout=60))["type"])
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees SIGTERM
    _assert_clean(proc, out, -signal.SIGTERM)
    assert "Application shutdown complete" in out and "Traceback" not in out, out[-3000:]
