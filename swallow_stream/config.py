"""Model and generation config, read from a checkpoint's `config.json` / `generation_config.json`.

Keys are Hugging Face `GptOssConfig`'s. Anything the engine does not support fails here, naming
the key, before any weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .harmony.tokens import TOKEN_CALL, TOKEN_ENDOFTEXT, TOKEN_RETURN

__all__ = ["ConfigError", "GenerationDefaults", "ModelConfig", "RopeScaling", "SWALLOW_GENERATION_DEFAULTS"]


@dataclass(frozen=True)
class RopeScaling:
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    # "mxfp4" when the expert weights are stored packed, None for bf16/fp32 checkpoints.
    quant_method: str | None = "mxfp4"
    eos_token_ids: tuple[int, ...] = (TOKEN_RETURN,)
    torch_dtype: str = "bfloat16"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def window_of(self, layer: int) -> int:
        """Sliding window of a layer in tokens (current token included); 0 for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _parse_model_config(d)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(_read_json(Path(path)))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a Hugging Face gpt-oss checkpoint of this shape carries."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": (
                self.rope_scaling.original_max_position_embeddings if self.rope_scaling else 4096
            ),
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "use_cache": True,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": TOKEN_ENDOFTEXT if TOKEN_ENDOFTEXT < self.vocab_size else None,
            "torch_dtype": self.torch_dtype,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {
                "rope_type": "yarn",
                "factor": self.rope_scaling.factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
                "beta_fast": self.rope_scaling.beta_fast,
                "beta_slow": self.rope_scaling.beta_slow,
                "truncate": self.rope_scaling.truncate,
            }
        if self.quant_method == "mxfp4":
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            }
        return d


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json (Swallow: 0.6 / 0.95 / 20 / 0)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationDefaults":
        def num(key: str, default: float, kind: type = float) -> Any:
            v = d.get(key, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"generation_config.json: '{key}' must be a number, got {v!r}")
            return kind(v)

        eos = d.get("eos_token_id", [])
        eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        if not all(isinstance(t, int) for t in eos_ids):
            raise ConfigError(f"generation_config.json: 'eos_token_id' must be ints, got {eos!r}")
        mnt = d.get("max_new_tokens")
        return cls(
            temperature=num("temperature", 1.0),
            top_p=num("top_p", 1.0),
            top_k=num("top_k", 0, int),
            min_p=num("min_p", 0.0),
            eos_token_ids=eos_ids,
            max_new_tokens=int(mnt) if isinstance(mnt, int) and mnt > 0 else None,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationDefaults":
        p = Path(path)
        return cls.from_dict(_read_json(p)) if p.exists() else cls()

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(d.pop("eos_token_ids"))
        d.pop("max_new_tokens")
        d["do_sample"] = True
        d["bos_token_id"] = TOKEN_ENDOFTEXT
        d["pad_token_id"] = TOKEN_ENDOFTEXT
        return d


# GPT-OSS-Swallow's generation_config.json: the defaults when a model (or a remote server) gives none.
SWALLOW_GENERATION_DEFAULTS = GenerationDefaults(
    temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, eos_token_ids=(TOKEN_RETURN, TOKEN_ENDOFTEXT, TOKEN_CALL)
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path.name} not found at {path}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return d


def _parse_model_config(d: dict[str, Any]) -> ModelConfig:
    arch = d.get("architectures") or []
    model_type = d.get("model_type")
    if (model_type is not None and model_type != "gpt_oss") or (arch and "GptOssForCausalLM" not in arch):
        raise ConfigError(
            f"config.json: 'model_type' is {model_type!r} (architectures {arch!r}); "
            "only gpt-oss checkpoints ('gpt_oss' / GptOssForCausalLM) are supported"
        )

    def req_int(key: str, *alts: str, minimum: int = 1) -> int:
        for k in (key, *alts):
            if k in d:
                v = d[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                    raise ConfigError(f"config.json: '{k}' must be an integer >= {minimum}, got {v!r}")
                return v
        raise ConfigError(f"config.json: missing required key '{key}'")

    def opt_num(key: str, default: float) -> float:
        v = d.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"config.json: '{key}' must be a positive number, got {v!r}")
        return float(v)

    hidden = req_int("hidden_size")
    n_layers = req_int("num_hidden_layers")
    n_heads = req_int("num_attention_heads")
    n_kv = req_int("num_key_value_heads")
    head_dim = req_int("head_dim") if "head_dim" in d else hidden // n_heads
    if n_heads % n_kv:
        raise ConfigError(
            f"config.json: 'num_attention_heads' ({n_heads}) must be a multiple of 'num_key_value_heads' ({n_kv})"
        )
    if head_dim % 2:
        raise ConfigError(f"config.json: 'head_dim' must be even for RoPE, got {head_dim}")
    n_experts = req_int("num_local_experts")
    top_k = req_int("num_experts_per_tok", "experts_per_token")
    if top_k > n_experts:
        raise ConfigError(
            f"config.json: 'num_experts_per_tok' ({top_k}) exceeds 'num_local_experts' ({n_experts})"
        )
    intermediate = req_int("intermediate_size")

    sliding_window = d.get("sliding_window", 128)
    if sliding_window is None:
        sliding_window = 0
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 0:
        raise ConfigError(f"config.json: 'sliding_window' must be a non-negative integer, got {sliding_window!r}")

    layer_types = d.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ConfigError(
            f"config.json: 'layer_types' must be a list of {n_layers} entries (num_hidden_layers), got {layer_types!r}"
        )
    for t in layer_types:
        if t not in ("sliding_attention", "full_attention"):
            raise ConfigError(
                f"config.json: 'layer_types' entry {t!r} is not 'sliding_attention' or 'full_attention'"
            )
    if "sliding_attention" in layer_types and sliding_window <= 0:
        raise ConfigError("config.json: 'layer_types' has sliding layers but 'sliding_window' is not set")

    rope_raw = d.get("rope_scaling")
    if rope_raw is None and isinstance(d.get("rope_parameters"), dict):
        rope_raw = d["rope_parameters"]  # newer transformers spelling
    rope_theta = opt_num("rope_theta", 150000.0)
    if isinstance(rope_raw, dict) and "rope_theta" in rope_raw and "rope_theta" not in d:
        rope_theta = float(rope_raw["rope_theta"])
    rope: RopeScaling | None
    if rope_raw is None or (isinstance(rope_raw, dict) and rope_raw.get("rope_type", "default") == "default"):
        rope = None
    elif isinstance(rope_raw, dict):
        rtype = rope_raw.get("rope_type", rope_raw.get("type"))
        if rtype != "yarn":
            raise ConfigError(f"config.json: 'rope_scaling.rope_type' {rtype!r} is not supported (only 'yarn')")
        try:
            rope = RopeScaling(
                factor=float(rope_raw.get("factor", 32.0)),
                original_max_position_embeddings=int(
                    rope_raw.get("original_max_position_embeddings", d.get("initial_context_length", 4096))
                ),
                beta_fast=float(rope_raw.get("beta_fast", 32.0)),
                beta_slow=float(rope_raw.get("beta_slow", 1.0)),
                truncate=bool(rope_raw.get("truncate", True)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: 'rope_scaling' has a malformed value: {e}") from None
        if rope.factor < 1.0:
            raise ConfigError(f"config.json: 'rope_scaling.factor' must be >= 1, got {rope.factor}")
    else:
        raise ConfigError(f"config.json: 'rope_scaling' must be an object, got {rope_raw!r}")

    q = d.get("quantization_config")
    quant: str | None = None
    if q is not None:
        if not isinstance(q, dict):
            raise ConfigError("config.json: 'quantization_config' must be an object")
        quant = q.get("quant_method")
        if quant != "mxfp4":
            raise ConfigError(
                f"config.json: 'quantization_config.quant_method' {quant!r} is not supported (only 'mxfp4')"
            )
    if d.get("tie_word_embeddings"):
        raise ConfigError("config.json: 'tie_word_embeddings' true is not supported (gpt-oss has an untied lm_head)")
    if d.get("attention_bias", True) is not True:
        raise ConfigError("config.json: 'attention_bias' must be true for gpt-oss")

    eos = d.get("eos_token_id", TOKEN_RETURN)
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    return ModelConfig(
        vocab_size=req_int("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        layer_types=tuple(layer_types),
        sliding_window=sliding_window,
        rms_norm_eps=opt_num("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope,
        max_position_embeddings=req_int("max_position_embeddings") if "max_position_embeddings" in d else 131072,
        swiglu_limit=opt_num("swiglu_limit", 7.0),
        quant_method=quant,
        eos_token_ids=eos_ids,
        torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))),
    )
