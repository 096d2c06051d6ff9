"""Config parsing and checkpoint loading: every bad input fails early with a message naming it."""

import fnmatch
import json
import shutil

import pytest
import torch

from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
from swallow_stream.checkpoint import loader
from swallow_stream.config import ConfigError, GenerationDefaults, ModelConfig
from swallow_stream.errors import CheckpointError

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_local_experts=4)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("small"), preset("tiny", **SMALL), seed=3)


def copy(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


# -- config ----------------------------------------------------------------------------------------
def test_real_config_keys_parse():
    d = preset("120b").to_hf_dict()
    cfg = ModelConfig.from_dict(d)
    assert cfg == preset("120b")
    assert cfg.rope_scaling.truncate is False and cfg.rope_scaling.factor == 32
    assert cfg.window_of(0) == 128 and cfg.window_of(1) == 0
    assert cfg.attention_scale == pytest.approx(1 / 8)


def test_newer_rope_parameters_spelling():
    d = preset("tiny").to_hf_dict()
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = dict(rs, rope_theta=d.pop("rope_theta"))
    assert ModelConfig.from_dict(d) == preset("tiny")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("model_type", "llama", "model_type"),
        ("num_attention_heads", 5, "num_key_value_heads"),
        ("hidden_size", "big", "hidden_size"),
        ("layer_types", ["sliding_attention"], "layer_types"),
        ("layer_types", ["sliding_attention", "dense", "x", "y"], "layer_types"),
        ("num_experts_per_tok", 99, "num_experts_per_tok"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2}, "rope_type"),
        ("quantization_config", {"quant_method": "gptq"}, "quant_method"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("vocab_size", None, "vocab_size"),
    ],
)
def test_bad_config_names_the_key(key, value, match):
    d = preset("tiny").to_hf_dict()
    if value is None:
        del d[key]
        d.pop("architectures")
        d["architectures"] = ["GptOssForCausalLM"]
    else:
        d[key] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d)


def test_generation_config_defaults(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [200002, 199999]}))
    g = GenerationDefaults.from_file(tmp_path / "g.json")
    assert (g.temperature, g.top_p, g.top_k, g.min_p) == (0.6, 0.95, 20, 0.0)
    assert g.eos_token_ids == (200002, 199999)
    (tmp_path / "g.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ConfigError, match="temperature"):
        GenerationDefaults.from_file(tmp_path / "g.json")


# -- loading ---------------------------------------------------------------------------------------
def test_loads_single_file(small_ckpt):
    ck = open_checkpoint(small_ckpt)
    assert ck.config.num_local_experts == 4
    assert ck.generation.temperature == 0.6 and ck.generation.top_k == 20
    sd = ck.read()
    b = sd["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert b.dtype == torch.uint8 and b.shape == (4, 64, 2, 16)  # stays packed


def test_loads_sharded_with_index(tmp_path):
    cfg = preset("tiny", **SMALL)
    path = write_checkpoint(tmp_path / "sharded", cfg, seed=3, max_shard_bytes=100_000)
    shards = list(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    ck = open_checkpoint(path)
    one = open_checkpoint(write_checkpoint(tmp_path / "one", cfg, seed=3))
    a, b = ck.read(), one.read()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_checkpoint_loads_and_runs(tmp_path, make_engine):
    from swallow_stream import stream

    cfg = preset("tiny", quant_method=None)
    path = write_checkpoint(tmp_path / "bf16", cfg, seed=2)
    ck = open_checkpoint(path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in ck.files
    s = stream("hi", model=make_engine(path), temperature=0, max_tokens=4).collect()
    assert s.usage.completion_tokens == 4


def test_missing_weight_file(small_ckpt, tmp_path):
    p = copy(small_ckpt, tmp_path)
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(p)


def test_missing_shard_named(tmp_path):
    path = write_checkpoint(tmp_path / "s", preset("tiny", **SMALL), seed=3, max_shard_bytes=100_000)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(path)


def test_missing_config(small_ckpt, tmp_path):
    p = copy(small_ckpt, tmp_path)
    (p / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        open_checkpoint(p)


def test_truncated_file(small_ckpt, tmp_path):
    p = copy(small_ckpt, tmp_path)
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(p)


def test_wrong_shapes(small_ckpt, tmp_path):
    p = copy(small_ckpt, tmp_path)
    d = json.loads((p / "config.json").read_text())
    d["intermediate_size"] = 64
    (p / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        open_checkpoint(p)


def test_different_architecture(small_ckpt, tmp_path):
    p = copy(small_ckpt, tmp_path)
    d = json.loads((p / "config.json").read_text())
    d["model_type"], d["architectures"] = "llama", ["LlamaForCausalLM"]
    (p / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="only gpt-oss"):
        open_checkpoint(p)


def test_not_a_repo_id():
    with pytest.raises(CheckpointError, match="neither an existing directory"):
        open_checkpoint("/no/such/dir")


def test_hub_download_skips_original_and_metal(monkeypatch, small_ckpt):
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow=allow_patterns, ignore=ignore_patterns)
        return str(small_ckpt)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    open_checkpoint("tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4")
    assert seen["repo_id"] == "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4"

    def fetched(path):
        return any(fnmatch.fnmatch(path, a) for a in seen["allow"]) and not any(
            fnmatch.fnmatch(path, i) for i in seen["ignore"]
        )

    for needed in ["config.json", "generation_config.json", "model.safetensors.index.json",
                   "model-00000-of-00014.safetensors"]:
        assert fetched(needed), needed
    for skipped in ["original/model--00001-of-00007.safetensors", "metal/model.bin", "original/config.json",
                    "README.md"]:
        assert not fetched(skipped), skipped


def test_offline_from_hf_cache(monkeypatch, tmp_path, small_ckpt):
    """HF_HUB_OFFLINE=1 resolves a repo id from the standard HF cache layout, no network."""
    cache = tmp_path / "hub"
    snap = cache / "models--tokyotech-llm--Tiny-Swallow" / "snapshots" / ("0" * 40)
    shutil.copytree(small_ckpt, snap)
    (cache / "models--tokyotech-llm--Tiny-Swallow" / "refs").mkdir()
    (cache / "models--tokyotech-llm--Tiny-Swallow" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    ck = open_checkpoint("tokyotech-llm/Tiny-Swallow")
    assert ck.path == snap
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        open_checkpoint("tokyotech-llm/Not-Cached")
    assert loader.HUB_IGNORE_PATTERNS == ["original/*", "metal/*"]
