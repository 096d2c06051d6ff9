"""Synthetic gpt-oss checkpoints in the exact Hugging Face layout (MXFP4 experts or bf16).

Random weights, deterministic by seed, scaled so activations and logits stay in a useful range
(logit std of a few units, routing that varies by token). Tests, benchmarks and `load("tiny")`
write these and read them back through the real loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import GenerationDefaults, ModelConfig, RopeScaling

HARMONY_VOCAB_SIZE = 201088


def _alternating(n: int) -> tuple[str, ...]:
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


# The real shapes of the released models, and a tiny model for machines with no GPU / no weights.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=HARMONY_VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        layer_types=_alternating(4),
    ),
    # Mid-size config of the benchmarks: full vocab, CPU-runnable.
    "mid": ModelConfig(
        vocab_size=HARMONY_VOCAB_SIZE,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        num_local_experts=16,
        num_experts_per_tok=4,
        layer_types=_alternating(4),
    ),
    "20b": ModelConfig(
        vocab_size=HARMONY_VOCAB_SIZE,
        hidden_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        layer_types=_alternating(24),
    ),
    "120b": ModelConfig(
        vocab_size=HARMONY_VOCAB_SIZE,
        hidden_size=2880,
        num_hidden_layers=36,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=2880,
        num_local_experts=128,
        num_experts_per_tok=4,
        layer_types=_alternating(36),
    ),
}

SWALLOW_GENERATION_DEFAULTS = GenerationDefaults(
    temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, eos_token_ids=(200002, 199999, 200012)
)

# E2M1 magnitudes by nibble; the mean square over uniform random nibbles is 8.5625.
_FP4_MEAN_SQUARE = 8.5625


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown synthetic preset {name!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        overrides["layer_types"] = _alternating(overrides["num_hidden_layers"])
    return dataclasses.replace(cfg, **overrides)


def _mxfp4_random(
    g: torch.Generator, e: int, out: int, inp: int, target_std: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 tensor: blocks uint8 [e, out, inp/32, 16], scales uint8 [e, out, inp/32]."""
    if inp % 32:
        raise ValueError(f"MXFP4 input dim must be a multiple of 32, got {inp}")
    blocks = torch.randint(0, 256, (e, out, inp // 32, 16), generator=g, dtype=torch.int32)
    # E8M0 exponent so that the dequantized std is ~target_std, jittered by +-1 per block.
    base = round(math.log2(target_std / math.sqrt(_FP4_MEAN_SQUARE))) + 127
    jitter = torch.randint(-1, 2, (e, out, inp // 32), generator=g, dtype=torch.int32)
    scales = (base + jitter).clamp(0, 254)
    return blocks.to(torch.uint8).to(device), scales.to(torch.uint8).to(device)


def random_state_dict(
    cfg: ModelConfig,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """All tensors of a gpt-oss checkpoint, HF names and layout, random but well-scaled."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

    h, inter, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(cfg.vocab_size, h, std=1.0),
        "model.norm.weight": (1.0 + torch.randn(h, generator=g) * 0.1).to(dtype=dtype, device=device),
        # std 3/sqrt(h) on unit-rms inputs -> logits of std ~3: peaked but not one-hot.
        "lm_head.weight": randn(cfg.vocab_size, h, std=3.0 / math.sqrt(h)),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1.0 + torch.randn(h, generator=g) * 0.1).to(dtype=dtype, device=device)
        sd[p + "post_attention_layernorm.weight"] = (1.0 + torch.randn(h, generator=g) * 0.1).to(
            dtype=dtype, device=device
        )
        a = p + "self_attn."
        # q/k std 2/sqrt(h): attention scores of std ~1, so softmax is neither flat nor one-hot.
        sd[a + "q_proj.weight"] = randn(cfg.q_size, h, std=2.0 / math.sqrt(h))
        sd[a + "q_proj.bias"] = randn(cfg.q_size, std=0.1)
        sd[a + "k_proj.weight"] = randn(cfg.kv_size, h, std=2.0 / math.sqrt(h))
        sd[a + "k_proj.bias"] = randn(cfg.kv_size, std=0.1)
        sd[a + "v_proj.weight"] = randn(cfg.kv_size, h, std=1.0 / math.sqrt(h))
        sd[a + "v_proj.bias"] = randn(cfg.kv_size, std=0.1)
        sd[a + "o_proj.weight"] = randn(h, cfg.q_size, std=1.0 / math.sqrt(cfg.q_size))
        sd[a + "o_proj.bias"] = randn(h, std=0.1)
        sd[a + "sinks"] = randn(cfg.num_attention_heads, std=1.0)
        m = p + "mlp."
        sd[m + "router.weight"] = randn(e, h, std=2.0 / math.sqrt(h))
        sd[m + "router.bias"] = randn(e, std=0.5)
        x = m + "experts."
        # gate_up std 3/sqrt(h) puts a share of gates past the swiglu clamp (7).
        if cfg.quant_method == "mxfp4":
            b, s = _mxfp4_random(g, e, 2 * inter, h, 3.0 / math.sqrt(h), device)
            sd[x + "gate_up_proj_blocks"], sd[x + "gate_up_proj_scales"] = b, s
            b, s = _mxfp4_random(g, e, h, inter, 1.0 / math.sqrt(inter), device)
            sd[x + "down_proj_blocks"], sd[x + "down_proj_scales"] = b, s
        else:
            sd[x + "gate_up_proj"] = randn(e, h, 2 * inter, std=3.0 / math.sqrt(h))
            sd[x + "down_proj"] = randn(e, inter, h, std=1.0 / math.sqrt(inter))
        sd[x + "gate_up_proj_bias"] = randn(e, 2 * inter, std=0.5)
        sd[x + "down_proj_bias"] = randn(e, h, std=0.1)
    return sd


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    *,
    generation: GenerationDefaults | None = SWALLOW_GENERATION_DEFAULTS,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, generation_config.json and (sharded) safetensors to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(cfg, seed, dtype=dtype)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation.to_hf_dict(), indent=2))

    if max_shard_bytes is None:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("SWALLOW_STREAM_CACHE", Path.home() / ".cache" / "swallow-stream"))


def materialize_preset(name: str = "tiny", seed: int = 0) -> Path:
    """The preset's checkpoint in the local cache, written once (atomically) and reused."""
    cfg = preset(name)
    key = hashlib.sha256(json.dumps([cfg.to_hf_dict(), seed, 1]).encode()).hexdigest()[:12]
    target = cache_dir() / "synthetic" / f"{name}-seed{seed}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_checkpoint(tmp, cfg, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = [
    "PRESETS",
    "RopeScaling",
    "SWALLOW_GENERATION_DEFAULTS",
    "materialize_preset",
    "preset",
    "random_state_dict",
    "write_checkpoint",
]
