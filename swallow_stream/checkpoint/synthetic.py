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

from ..config import SWALLOW_GENERATION_DEFAULTS, GenerationDefaults, ModelConfig, RopeScaling
from ..harmony.tokens import TOKEN_CHANNEL, TOKEN_END, TOKEN_MESSAGE, TOKEN_RETURN, TOKEN_START
from ..harmony.tokens import VOCAB_SIZE as HARMONY_VOCAB_SIZE
from ..paths import cache_dir


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


DEMO_REASONING = "The tiny model has random weights, so this is noise shaped like reasoning."
DEMO_ANSWER = "これはランダムな重みの小さなモデルの出力です。"


def imprint_harmony_demo(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Make a random model babble in harmony's shape: reasoning first, then an answer. In place.

    A machine with no weights then still shows the reasoning and the answer streaming apart.
    Attention and expert outputs are scaled down so the last token's embedding dominates the
    final hidden state, and lm_head rows get each imprinted successor's source direction: a
    first-order chain `assistant -> <|channel|> -> analysis|final -> <|message|> -> a fixed
    sentence -> <|end|> | <|return|>`. Two attention heads of a full-attention layer remember
    whether "analysis" / "final" were already emitted (queries constant, keys firing on that one
    token, the sink absorbing the rest) and write a marker into the residual stream that tips
    the two branch points: analysis first, then final, then the answer sentence.
    """
    from ..harmony import get_tokenizer

    full_layers = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    if cfg.vocab_size < HARMONY_VOCAB_SIZE or not full_layers or cfg.num_key_value_heads < 2:
        raise ValueError("the harmony demo needs the harmony vocabulary, a full-attention layer and 2 kv heads")
    tok = get_tokenizer()
    g = torch.Generator().manual_seed(1234)
    for i in range(cfg.num_hidden_layers):
        a, x = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.experts."
        sd[a + "o_proj.weight"] *= 0.02
        sd[a + "o_proj.bias"] *= 0.02
        sd[x + "down_proj_bias"] *= 0.02
        if x + "down_proj_scales" in sd:
            sd[x + "down_proj_scales"] -= 6  # x 2**-6
        else:
            sd[x + "down_proj"] *= 0.02

    (assistant,), (analysis,), (final,) = tok.encode("assistant"), tok.encode("analysis"), tok.encode("final")
    channel, message, end, start, ret = TOKEN_CHANNEL, TOKEN_MESSAGE, TOKEN_END, TOKEN_START, TOKEN_RETURN
    reasoning, answer = tok.encode(DEMO_REASONING), tok.encode(DEMO_ANSWER)
    emb = sd["model.embed_tokens.weight"].float()
    unit = lambda t: emb[t] / emb[t].norm()  # noqa: E731
    h, d = cfg.hidden_size, cfg.head_dim

    # Markers written by the memory heads: orthogonal to each other and to the branch points.
    basis = [unit(channel), unit(message)]
    markers = []
    for _ in range(2):
        m = torch.randn(h, generator=g)
        for b in basis:
            m -= (m @ b) * b
        m /= m.norm()
        basis.append(m)
        markers.append(m)
    seen_analysis, seen_final = markers

    # Memory heads: q head 0 (kv head 0) keys on "analysis", the first q head of kv head 1 on
    # "final". Signals ride the lowest-frequency RoPE pair (dim d/2-1), which barely rotates.
    layer = f"model.layers.{full_layers[0]}.self_attn."
    q_w, q_b = sd[layer + "q_proj.weight"].float(), sd[layer + "q_proj.bias"].float()
    k_w, k_b = sd[layer + "k_proj.weight"].float(), sd[layer + "k_proj.bias"].float()
    v_w, v_b = sd[layer + "v_proj.weight"].float(), sd[layer + "v_proj.bias"].float()
    o_w, sinks = sd[layer + "o_proj.weight"].float(), sd[layer + "sinks"].float()
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    j = d // 2 - 1
    for kv, key_token, marker in ((0, analysis, seen_analysis), (1, final, seen_final)):
        qh = kv * group
        q_w[qh * d : (qh + 1) * d] = 0.0
        q_b[qh * d : (qh + 1) * d] = 0.0
        q_b[qh * d + j] = 2.6
        k_w[kv * d : (kv + 1) * d] = 0.0
        k_b[kv * d : (kv + 1) * d] = 0.0
        k_w[kv * d + j] = 2.6 * unit(key_token)  # score ~24 on the key token, ~N(0, 3) elsewhere
        v_w[kv * d : (kv + 1) * d] = 0.0
        v_b[kv * d : (kv + 1) * d] = 0.0
        v_w[kv * d] = unit(key_token) / 8.0  # value ~1 on the key token
        o_w[:, qh * d : (qh + 1) * d] = 0.0
        o_w[:, qh * d] = 4.0 * marker  # the marker, |4| against an embedding of norm ~8
        sinks[qh] = 14.0  # without the key token, the sink takes ~98% of the attention
    for name, t in ((q_w, "q_proj.weight"), (q_b, "q_proj.bias"), (k_w, "k_proj.weight"), (k_b, "k_proj.bias"),
                    (v_w, "v_proj.weight"), (v_b, "v_proj.bias"), (o_w, "o_proj.weight"), (sinks, "sinks")):
        sd[layer + t] = name.to(sd[layer + t].dtype)

    # lm_head: logit(b | a) ~ 4 * |e_a| ~ 32 for each chain edge a -> b, far above the random rows.
    edges = [(assistant, channel), (channel, analysis), (channel, final), (analysis, message), (final, message),
             (message, reasoning[0]), (message, answer[0]), (reasoning[-1], end), (answer[-1], ret),
             (end, start), (start, assistant)]
    edges += list(zip(reasoning, reasoning[1:])) + list(zip(answer, answer[1:]))
    head = sd["lm_head.weight"].float()
    head[list({b for _, b in edges})] = 0.0
    for a, b in edges:
        head[b] += 4.0 * unit(a)
    # Branch points: the first choice by default (+4 logits), the second once its marker is on (+7).
    for first, second, marker in ((analysis, final, seen_analysis), (reasoning[0], answer[0], seen_final)):
        src = channel if first == analysis else message
        head[first] += 0.5 * unit(src) - 1.5 * marker
        head[second] += 1.5 * marker
    sd["lm_head.weight"] = head.to(sd["lm_head.weight"].dtype)


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    *,
    generation: GenerationDefaults | None = SWALLOW_GENERATION_DEFAULTS,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
    harmony_demo: bool = False,
) -> Path:
    """Write config.json, generation_config.json and (sharded) safetensors to `path`.
    harmony_demo: imprint the harmony-shaped babble of `imprint_harmony_demo`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(cfg, seed, dtype=dtype)
    if harmony_demo:
        imprint_harmony_demo(sd, cfg)
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


def materialize_preset(name: str = "tiny", seed: int = 0, harmony_demo: bool = True) -> Path:
    """The preset's checkpoint in the local cache, written once (atomically) and reused.
    `load("tiny")` uses this with the harmony demo imprint."""
    cfg = preset(name)
    harmony_demo = harmony_demo and cfg.vocab_size >= HARMONY_VOCAB_SIZE
    key = hashlib.sha256(json.dumps([cfg.to_hf_dict(), seed, harmony_demo, 2]).encode()).hexdigest()[:12]
    target = cache_dir() / "synthetic" / f"{name}-seed{seed}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_checkpoint(tmp, cfg, seed, harmony_demo=harmony_demo)
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
