"""Flags and env vars, `python app.py` as a real process, /health and /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from swallow_stream.server.cli import engine_options, parse_args, parse_size
from swallow_stream.server.doors import model_aliases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_VARS = ["SWALLOW_MODEL", "SWALLOW_HOST", "HOST", "SWALLOW_PORT", "PORT", "SWALLOW_API_KEY", "SWALLOW_BACKEND",
            "SWALLOW_BASE_URL", "SWALLOW_MAX_NUM_SEQS", "SWALLOW_MAX_MODEL_LEN", "SWALLOW_KV_CACHE_MEMORY",
            "SWALLOW_MAX_QUEUED_REQUESTS", "SWALLOW_SERVED_MODEL_NAME", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT",
            "SWALLOW_OPS", "SWALLOW_GPU_MEMORY_UTILIZATION", "SWALLOW_KEEP_DENSE_EXPERTS", "SWALLOW_DTYPE", "SWALLOW_DEVICE"]


@pytest.fixture()
def clean_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_defaults(clean_env):
    a = parse_args([])
    assert (a.model, a.host, a.port, a.api_key, a.backend) == (None, "127.0.0.1", 7860, None, "local")
    assert engine_options(a) == {}
    clean_env.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Spaces sets
    assert parse_args([]).host == "0.0.0.0"


def test_engine_flags(clean_env):
    a = parse_args(["--ops", "torch", "--keep-dense-experts", "--gpu-memory-utilization", "0.8", "--dtype", "bf16"])
    assert engine_options(a) == {"ops": "torch", "quantize_dense_experts": False, "gpu_memory_utilization": 0.8,
                                 "dtype": "bf16"}
    clean_env.setenv("SWALLOW_OPS", "triton")
    clean_env.setenv("SWALLOW_GPU_MEMORY_UTILIZATION", "0.7")
    assert engine_options(parse_args([])) == {"ops": "triton", "gpu_memory_utilization": 0.7}


def test_flags_and_env(clean_env):
    clean_env.setenv("SWALLOW_MODEL", "tiny")
    clean_env.setenv("PORT", "8123")
    clean_env.setenv("SWALLOW_API_KEY", "k")
    clean_env.setenv("SWALLOW_KV_CACHE_MEMORY", "1GiB")
    clean_env.setenv("SWALLOW_MAX_NUM_SEQS", "4")
    a = parse_args([])
    assert (a.model, a.port, a.api_key) == ("tiny", 8123, "k")
    assert engine_options(a) == {"kv_cache_memory": 1 << 30, "max_num_seqs": 4}
    a = parse_args(["--model", "other", "--port", "9000", "--max-model-len", "2048", "--kv-cache-memory", "512MiB",
                    "--max-queued-requests", "3", "--served-model-name", "alias-a", "--host", "0.0.0.0"])
    assert (a.model, a.port, a.host) == ("other", 9000, "0.0.0.0")  # flags beat env vars
    assert engine_options(a) == {"max_num_seqs": 4, "max_queued_requests": 3, "max_model_len": 2048,
                                 "kv_cache_memory": 512 << 20}
    assert a.served_model_name == ["alias-a"]
    with pytest.raises(SystemExit):
        parse_args(["--backend", "openai"])  # needs --base-url
    assert parse_args(["--backend", "openai", "--base-url", "http://x:1/v1"]).base_url == "http://x:1/v1"


def test_parse_size():
    assert parse_size("1024") == 1024 and parse_size("2KiB") == 2048 and parse_size("1.5G") == 3 << 29
    with pytest.raises(Exception):
        parse_size("lots")


def test_model_name_matching():
    names = model_aliases("tokyotech-llm/GPT-OSS-Swallow-20B-RL-v0.1", False, ("my-alias",))
    assert "tokyotech-llm/gpt-oss-swallow-20b-rl-v0.1" in names and "gpt-oss-swallow-20b-rl-v0.1" in names
    assert "my-alias" in names and "tokyotech-llm/gpt-oss-swallow-120b-rl-v0.1-mxfp4" not in names
    tiny = model_aliases("tiny", True)
    assert "tokyotech-llm/gpt-oss-swallow-120b-rl-v0.1-mxfp4" in tiny and "gpt-4o" not in tiny


def test_health_and_metrics(tiny_server):
    h = httpx.get(tiny_server.url + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["ready"] and h["model"] == "tiny" and h["is_tiny"] is True
    assert {"running", "kv_blocks_used", "kv_blocks_total"} <= set(h["engine"])
    httpx.post(tiny_server.url + "/v1/chat/completions", timeout=60,
               json={"messages": [{"role": "user", "content": "m"}], "max_tokens": 3})
    text = httpx.get(tiny_server.url + "/metrics", timeout=30).text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['swallow_info{model="tiny",tiny="true"}'] == 1
    assert lines['swallow_engine_kv_blocks_total{model="tiny"}'] > 0
    assert lines['swallow_requests_total{door="openai"}'] >= 1
    assert lines['swallow_engine_generated_tokens_total{model="tiny"}'] >= 3
    assert "# TYPE swallow_engine_running gauge" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a subprocess boots
def test_python_app_py_picks_a_model_and_serves_everything(tmp_path):
    """`python app.py` with no --model: picks by hardware (tiny here) and says so on the page."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(SWALLOW_STREAM_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="", SWALLOW_MAX_NUM_SEQS="2")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--port", str(port)], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        assert health is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert health["model"] == "tiny" and health["model_source"] == "auto" and health["backend"] == "local"
        assert health["engine"]["kv_blocks_total"] > 0
        cfg = httpx.get(url + "/config", timeout=30).text
        assert "picked for this hardware" in cfg and "random noise" in cfg
        assert httpx.get(url + "/", timeout=30).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
        assert "swallow_engine_kv_blocks_total" in httpx.get(url + "/metrics", timeout=30).text
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
