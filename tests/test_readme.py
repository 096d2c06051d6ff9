"""The README's two quick-start commands, exactly as written: CI runs the test command
(.ci/run must call it verbatim) and this test runs the other one and talks to the UI it starts."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # runs the README's commands in subprocesses

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = text.split("\n## ", 1)[0]
    return [line.strip() for line in head.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_opens_with_run_and_test_commands():
    run, test = quick_start()[:2]
    assert "app.py" in run and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), "CI must run the README's test command verbatim"


def test_readme_run_command_serves_the_ui():
    run = quick_start()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SWALLOW_PORT=str(port), SWALLOW_LOG_LEVEL="warning")
    env.pop("SWALLOW_MODEL", None)  # no model: picked by hardware (tiny here)
    proc = subprocess.Popen(["bash", "-c", run], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.get(base + "/health", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the README's run command did not bring the server up"
            time.sleep(0.5)
        assert r.json()["model"] == "tiny"
        page = httpx.get(base + "/", follow_redirects=True)
        assert page.status_code == 200 and re.search("gradio", page.text, re.I)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
