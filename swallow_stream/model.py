"""The gpt-oss model: one definition over a flat batch of tokens and a paged KV cache.

    x = embed(ids)
    per layer:  x += o_proj(attn(rope(qkv(norm(x)))))      # sinks, sliding or full window
                x += experts(route(norm(x)))               # MXFP4 top-k MoE, clamped SwiGLU
    logits = lm_head(norm(x))

as four ops a layer from an `OpSet` (Triton kernels on CUDA, plain torch on CPU):
    q, residual = attn_in(x, residual, ...)    # residual add + norm + qkv + RoPE + KV-cache write
    o = attention(q, ...)
    residual = attn_out(o, residual, ...)      # o_proj + residual add
    x, ids = moe(residual, ...)                # norm + router + experts: [T, k, H] fp32, unreduced
The MoE output is summed into the residual stream by the next layer's attn_in (or the final
rms_norm): no combine step of its own. On the Triton set a decode layer is 6 launches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .ops import ExpertWeights, OpSet
from .ops.reference import linear


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H] fp32
    post_norm: torch.Tensor  # [H] fp32
    qkv_weight: torch.Tensor  # [Hq*D + 2*Hk*D, H]
    qkv_bias: torch.Tensor  # [Hq*D + 2*Hk*D]
    o_weight: torch.Tensor  # [H, Hq*D]
    o_bias: torch.Tensor  # [H]
    sinks: torch.Tensor  # [Hq] fp32
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor  # [E]
    experts: ExpertWeights
    window: int  # 0 = full attention


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H] fp32
    lm_head: torch.Tensor  # [V, H]
    layers: list[LayerWeights]

    @classmethod
    def from_state_dict(
        cls, cfg: ModelConfig, sd: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
    ) -> "ModelWeights":
        """HF-named tensors -> engine layout. q/k/v fuse into one projection; MXFP4 experts stay
        packed; norms, sinks and biases the fp32 math reads are kept in fp32."""

        def t(name: str, dt: torch.dtype | None = dtype) -> torch.Tensor:
            x = sd[name]
            return x.to(device=device, dtype=dt) if dt is not None else x.to(device=device)

        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a, x = p + "self_attn.", p + "mlp.experts."
            if cfg.quant_method == "mxfp4":
                ew = ExpertWeights(
                    gate_up_bias=t(x + "gate_up_proj_bias", torch.float32),
                    down_bias=t(x + "down_proj_bias", torch.float32),
                    gate_up_blocks=t(x + "gate_up_proj_blocks", None).contiguous(),
                    gate_up_scales=t(x + "gate_up_proj_scales", None).contiguous(),
                    down_blocks=t(x + "down_proj_blocks", None).contiguous(),
                    down_scales=t(x + "down_proj_scales", None).contiguous(),
                )
            else:
                ew = ExpertWeights(
                    gate_up_bias=t(x + "gate_up_proj_bias", torch.float32),
                    down_bias=t(x + "down_proj_bias", torch.float32),
                    gate_up=t(x + "gate_up_proj"),
                    down=t(x + "down_proj"),
                )
            layers.append(
                LayerWeights(
                    input_norm=t(p + "input_layernorm.weight", torch.float32),
                    post_norm=t(p + "post_attention_layernorm.weight", torch.float32),
                    qkv_weight=torch.cat([t(a + f"{n}_proj.weight") for n in "qkv"]).contiguous(),
                    qkv_bias=torch.cat([t(a + f"{n}_proj.bias") for n in "qkv"]).contiguous(),
                    o_weight=t(a + "o_proj.weight"),
                    o_bias=t(a + "o_proj.bias"),
                    sinks=t(a + "sinks", torch.float32),
                    router_weight=t(p + "mlp.router.weight"),
                    router_bias=t(p + "mlp.router.bias"),
                    experts=ew,
                    window=cfg.window_of(i),
                )
            )
        return cls(
            embed=t("model.embed_tokens.weight"),
            norm=t("model.norm.weight", torch.float32),
            lm_head=t("lm_head.weight"),
            layers=layers,
        )


def yarn_rope_tables(cfg: ModelConfig, max_positions: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, D/2] fp32 for NeoX RoPE with YaRN.

    Frequencies below the correction range are interpolated (divided by `factor`), above it
    extrapolated, with a linear ramp between (range not rounded when truncate is false).
    Both cos and sin carry the concentration 0.1*ln(factor) + 1.
    """
    d = cfg.head_dim
    base = cfg.rope_theta
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    inv_freq = 1.0 / freq
    concentration = 1.0
    ys = cfg.rope_scaling
    if ys is not None and ys.factor > 1.0:
        concentration = 0.1 * math.log(ys.factor) + 1.0

        def correction_dim(rotations: float) -> float:
            return d * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(ys.beta_fast), correction_dim(ys.beta_slow)
        if ys.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0.0), min(high, d - 1.0)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp
        inv_freq = inv_freq / ys.factor * (1.0 - extrapolate) + inv_freq * extrapolate
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return (angles.cos() * concentration).to(device), (angles.sin() * concentration).to(device)


@dataclass
class CacheGroupMeta:
    """Paged-cache addressing for the layers of one attention kind (full or sliding)."""

    slot_mapping: torch.Tensor  # [T] int64 flat slot per new token, -1 = not stored
    block_tables: torch.Tensor  # [B, max_blocks] int32


@dataclass
class BatchMeta:
    """One step's batch: B sequences, T new tokens in sequence order."""

    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    full: CacheGroupMeta
    sliding: CacheGroupMeta | None
    # (query_start_loc, seq_lens) as host integers when the batch builder has them (prefill and
    # mixed steps): the torch attention reads these instead of syncing. None in captured decode.
    host_lens: tuple[list[int], list[int]] | None = None


class GptOss:
    """Forward over a flat token batch. KV caches per layer: (k, v) [num_blocks, block_size, Hk, D]."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops: OpSet, max_positions: int):
        self.cfg = cfg
        self.w = weights
        self.ops = ops
        for layer in weights.layers:
            ops.prepare_experts(layer.experts)  # kernel weight layouts, made once
        self.rope_cos, self.rope_sin = yarn_rope_tables(cfg, max_positions, weights.embed.device)

    @property
    def device(self) -> torch.device:
        return self.w.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.embed.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: BatchMeta,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """-> final-normed hidden states [T, H]."""
        cfg, ops = self.cfg, self.ops
        hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
        x = F.embedding(input_ids, self.w.embed)
        residual = None  # x is the residual stream's first term (later: the MoE's unreduced output)
        for layer, (k_cache, v_cache) in zip(self.w.layers, kv_caches):
            group = meta.sliding if layer.window else meta.full
            q, residual = ops.attn_in(x, residual, layer.input_norm, cfg.rms_norm_eps, layer.qkv_weight, layer.qkv_bias,
                                      positions, self.rope_cos, self.rope_sin, k_cache, v_cache, group.slot_mapping, hq, hk)
            o = ops.attention(
                q,
                k_cache,
                v_cache,
                group.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                layer.sinks,
                layer.window,
                cfg.attention_scale,
                host_lens=meta.host_lens,
            )
            residual = ops.attn_out(o, layer.o_weight, layer.o_bias, residual)
            x, _ = ops.moe(residual, layer.post_norm, cfg.rms_norm_eps, layer.router_weight, layer.router_bias,
                           cfg.num_experts_per_tok, layer.experts, cfg.swiglu_limit)  # [T, k, H] fp32
        x, _ = ops.rms_norm(x, self.w.norm, cfg.rms_norm_eps, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] fp32."""
        w = self.w.lm_head
        if hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            if hidden.shape[0] > 1:
                # MKL's fp32 GEMM streams the 201k-row unembedding 2-3x faster as W @ h^T than as
                # h @ W^T (F.linear) for a few rows (measured on AVX2: 8 rows 72 vs 251 ms)
                return (w @ hidden.t()).t().contiguous()
            return linear(hidden, w)
        return F.linear(hidden, w).float()
