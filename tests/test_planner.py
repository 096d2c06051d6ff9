"""Fit before fetch: the memory planner against hand calculations for the real 120B and 20B
shapes, the preflight that stops before any download, `--dry-run`, and the auto model choice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from swallow_stream.catalog import MODEL_20B, MODEL_120B, TINY, auto_model
from swallow_stream.checkpoint import preset
from swallow_stream.engine import EngineOptions
from swallow_stream.engine.planner import RUNTIME_RESERVE, plan, preflight
from swallow_stream.errors import InsufficientMemoryError

GiB = 2**30
GPUS = {"16GB": 16 * GiB, "24GB": 24 * GiB, "40GB": 40 * GiB, "80GB": 80 * GiB, "141GB": 141 * 10**9}


def by_hand(layers, experts, full_layers, sliding_layers, tokens=32768, seqs=16, chunk=2048):
    """The 120B/20B arithmetic written out: hidden 2880, intermediate 2880, 64 q heads and 8 kv
    heads of 64, vocab 201088, top-4, bf16 everywhere except MXFP4 experts and fp32 norms/biases."""
    h, i, v, q, kv = 2880, 2880, 201088, 64 * 64, 8 * 64
    embeddings = 2 * v * h * 2
    attention = layers * ((h * (q + 2 * kv) + q + 2 * kv) * 2 + (q * h + h) * 2 + (64 + 2 * h) * 4) + h * 4
    router = layers * (experts * h + experts) * 2
    nibbles = experts * (2 * i * h + h * i) // 2
    scales = experts * (2 * i * h + h * i) // 32
    expert_bias = experts * (2 * i + h) * 4
    weights = embeddings + attention + router + layers * (nibbles + scales + expert_bias)
    activations = chunk * ((4 * h + q + 2 * kv + q) * 2 + 4 * (2 * i + i + h) * 4) + 2 * seqs * v * 4
    per_token = 2 * 8 * 64 * 2  # K and V of one layer, bf16
    sliding_pool = seqs * (128 // 16 + 2) * 16  # a window of blocks (+2) per sequence
    kv_needed = per_token * (full_layers * tokens + sliding_layers * sliding_pool)
    return weights, activations, kv_needed


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("shape, layers, experts", [("120b", 36, 128), ("20b", 24, 32)])
def test_plan_matches_hand_calculation(shape, layers, experts, gpu):
    cfg = preset(shape)
    assert cfg.num_hidden_layers == layers and cfg.num_local_experts == experts
    p = plan(cfg, shape, GPUS[gpu])
    weights, activations, kv_needed = by_hand(layers, experts, layers // 2, layers // 2)
    assert p.weights.total == weights
    assert p.activations == activations
    assert p.kv_needed == kv_needed
    budget = int(GPUS[gpu] * 0.9) - weights - activations - RUNTIME_RESERVE
    assert p.kv_budget == budget
    assert p.fits == (budget >= kv_needed)
    expected = {"120b": {"80GB", "141GB"}, "20b": set(GPUS)}[shape]
    assert p.fits == (gpu in expected), p.table()
    if not p.fits:
        assert p.advice and "does NOT fit" in p.table()


def test_resident_sizes_match_the_released_checkpoints():
    # independent facts: the 120B MXFP4 release is ~65 GB (about 61 GiB resident), the 20B ~13 GB
    assert 60 * GiB < plan(preset("120b"), "120b", 80 * GiB).weights.total < 62 * GiB
    assert 12 * GiB < plan(preset("20b"), "20b", 80 * GiB).weights.total < 13.5 * GiB


def test_dense_experts_cost_four_times_unless_quantized_at_load():
    dense = dataclasses.replace(preset("20b"), quant_method=None)
    quantized = plan(dense, "20b-bf16", 24 * GiB)
    kept = plan(dense, "20b-bf16", 24 * GiB, keep_dense=True)
    assert quantized.fits and not kept.fits
    assert kept.weights.experts > 3.5 * (quantized.weights.experts - 24 * 32 * (2 * 2880 + 2880) * 4)
    assert quantized.weights.quantize_peak > 0 and kept.weights.quantize_peak == 0
    assert any("--keep-dense-experts" in a for a in kept.advice)


def test_advice_names_a_context_that_fits():
    p = plan(preset("20b"), "20b", 16 * GiB, max_model_len=131072)
    assert not p.fits
    (hint,) = [a for a in p.advice if "--max-model-len" in a]
    fit_len = int(hint.split("--max-model-len ")[1].rstrip("."))
    assert plan(preset("20b"), "20b", 16 * GiB, max_model_len=fit_len).fits
    assert not plan(preset("20b"), "20b", 16 * GiB, max_model_len=fit_len + 4096).fits
    big = plan(preset("120b"), MODEL_120B, 40 * GiB, smaller_model=MODEL_20B)
    assert any(MODEL_20B in a for a in big.advice) and MODEL_120B in big.error_message()


@pytest.mark.parametrize("gib, model", [(8, TINY), (16, MODEL_20B), (24, MODEL_20B), (40, MODEL_20B),
                                        (80, MODEL_120B), (141e9 / GiB, MODEL_120B)])
def test_auto_model_is_the_largest_that_fits(gib, model):
    assert auto_model((int(gib * GiB), "gpu")) == model


def config_only_checkpoint(tmp_path, shape: str, total_size: int):
    """A checkpoint directory before its weights arrive: config.json and the index, no shards."""
    d = tmp_path / shape
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset(shape).to_hf_dict()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size},
                                                                "weight_map": {}}))
    return d


def test_preflight_stops_before_reading_any_weight(tmp_path):
    d = config_only_checkpoint(tmp_path, "120b", 65_000_000_000)
    with pytest.raises(InsufficientMemoryError, match=r"does not fit a 24 GiB GPU.*needs about 6\d\.\d GiB"):
        preflight(str(d), EngineOptions(), (24 * GiB, "a 24 GiB GPU"))
    p = preflight(str(d), EngineOptions(), (80 * GiB, "H100"))
    assert p.fits and p.download_bytes == 65_000_000_000
    # no GPU to plan for: nothing to check here (the CPU path serves what it can)
    assert preflight(str(d), EngineOptions(device="cpu")) is None


def test_dry_run_prints_the_plan_and_exits(tmp_path):
    d = config_only_checkpoint(tmp_path, "20b", 13_000_000_000)
    run = lambda *a: subprocess.run([sys.executable, "-m", "swallow_stream.server.cli", "--model", str(d),  # noqa: E731
                                     "--dry-run", *a], capture_output=True, text=True, timeout=120)
    ok = run("--gpu-memory", "24GiB")
    assert ok.returncode == 0, ok.stderr
    assert "verdict: fits" in ok.stdout and "weights" in ok.stdout and "download (checkpoint)" in ok.stdout
    no = run("--gpu-memory", "12GiB")
    assert no.returncode == 1 and "does not fit a 12 GiB GPU" in no.stdout
