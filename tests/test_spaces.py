"""The Hugging Face Space: front matter, requirements, and the prepared folder booting on tiny."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "spaces"


def front_matter() -> dict:
    text = (SPACES / "README.md").read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "spaces/README.md must start with a --- YAML block ---"
    return yaml.safe_load(m.group(1))


def pinned_gradio() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("gradio==")]
    return pin.split("==")[1]


def test_front_matter_keys_and_values():
    import gradio
    from huggingface_hub import SpaceHardware

    fm = front_matter()
    for key in ("sdk", "sdk_version", "app_file", "python_version", "suggested_hardware", "models",
                "preload_from_hub", "startup_duration_timeout", "short_description"):
        assert key in fm, key
    assert fm["sdk"] == "gradio"
    assert fm["sdk_version"] == pinned_gradio() == gradio.__version__
    assert (SPACES / fm["app_file"]).is_file()
    assert re.fullmatch(r"3\.\d+(\.\d+)?", str(fm["python_version"]))
    assert fm["suggested_hardware"] in {h.value for h in SpaceHardware}
    assert fm["suggested_hardware"] in ("a100-large", "h100", "a100x4", "a100x8")  # 80 GB for the 120B MXFP4 model
    assert "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4" in fm["models"]
    for entry in fm["preload_from_hub"]:
        repo, files = entry.split()  # a file list, never a whole repo (120B: ~65 GB)
        assert repo in fm["models"]
        assert set(files.split(",")) == {"config.json", "generation_config.json", "model.safetensors.index.json"}
    # ZeroGPU offers Python 3.10 and 3.12 only
    assert str(fm["python_version"]) in ("3.10", "3.12")
    assert re.fullmatch(r"\d+[mh]", str(fm["startup_duration_timeout"]))
    assert 0 < len(fm["short_description"]) <= 60


def test_requirements_cover_runtime_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    name = lambda d: re.split(r"[<>=;\s\[]", d, 1)[0].lower()  # noqa: E731
    req = [line for line in (SPACES / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    have = {name(r) for r in req}
    assert {name(d) for d in deps} - {"gradio"} <= have
    assert "gradio" not in have  # the Space's sdk_version decides it


def test_prepare_adds_the_shards_named_by_the_index(tmp_path):
    """A GPU Space preloads the weights: their names come from the repo's index, never `original/`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_space", ROOT / "scripts" / "prepare_space.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    repo = "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4"
    shards = [f"model-{i:05d}-of-00014.safetensors" for i in range(15)]
    weight_map = {f"model.layers.{i}.w": shards[i % 15] for i in range(60)}
    weight_map["extra"] = "original/model--00001-of-00007.safetensors"
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    out = prep.prepare(tmp_path / "space", {repo: index})
    text = (out / "README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    entries = dict(e.split() for e in yaml.safe_load(m.group(1))["preload_from_hub"])
    assert entries[repo].split(",") == ["config.json", "generation_config.json", "model.safetensors.index.json",
                                        *shards]
    assert "original/" not in text
    other = "tokyotech-llm/GPT-OSS-Swallow-20B-RL-v0.1"
    assert entries[other] == "config.json,generation_config.json,model.safetensors.index.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "app"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_space.py"), str(out)], check=True)
    assert (out / "swallow_kernels" / "ops.py").is_file() and (out / "swallow_stream" / "api.py").is_file()
    where = subprocess.run([sys.executable, "-c", "import swallow_stream, swallow_kernels as k; print(swallow_stream.__file__, k.__file__)"],
                           cwd=out, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(w).is_relative_to(out) for w in where), where  # the Space runs its own copy
    port = free_port()
    env = dict(os.environ, SWALLOW_MODEL="tiny", SWALLOW_HOST="127.0.0.1", SWALLOW_PORT=str(port),
               PYTHONPATH="", SWALLOW_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=out, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Space app exited: {proc.stdout.read()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Space app did not come up"
            time.sleep(0.5)
        yield base, out
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow  # a subprocess boots
def test_space_boots_on_tiny_and_serves_health_ui_ws(space_server):
    base, out = space_server
    health = httpx.get(base + "/health").json()
    assert "tiny" in json.dumps(health)
    page = httpx.get(base + "/", follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()

    from websockets.sync.client import connect

    with connect(base.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "generate", "id": "s1", "prompt": "hello", "params": {"max_tokens": 4, "temperature": 0}}))
        kinds = []
        while True:
            msg = json.loads(ws.recv(timeout=60))
            kinds.append(msg["type"])
            if msg["type"] in ("done", "error"):
                break
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    assert "token" in kinds
