"""Find, validate and read gpt-oss checkpoints (Hub repo id, local directory, or HF cache offline).

Every check that can fail does so before the long part (reading tensors): config, file list,
safetensors headers against file sizes, tensor names and shapes against the config.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, GenerationDefaults, ModelConfig
from ..errors import CheckpointError

# What the engine needs from a Hub repo. gpt-oss repos also carry `original/` and `metal/`
# copies of the weights (tens of GB) that must not be downloaded.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
]
HUB_IGNORE_PATTERNS = ["original/*", "metal/*"]

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
}


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    generation: GenerationDefaults
    # tensor name -> safetensors file holding it
    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]

    def read(self, names: list[str] | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors (all by default) as stored; dtype conversion is the model's business."""
        wanted = set(self.files) if names is None else set(names)
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for n in ns:
                    out[n] = sf.get_tensor(n)
        return out


def expected_shapes(cfg: ModelConfig, quantized: bool) -> dict[str, tuple[int, ...]]:
    h, inter, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                a + "q_proj.weight": (cfg.q_size, h),
                a + "q_proj.bias": (cfg.q_size,),
                a + "k_proj.weight": (cfg.kv_size, h),
                a + "k_proj.bias": (cfg.kv_size,),
                a + "v_proj.weight": (cfg.kv_size, h),
                a + "v_proj.bias": (cfg.kv_size,),
                a + "o_proj.weight": (h, cfg.q_size),
                a + "o_proj.bias": (h,),
                a + "sinks": (cfg.num_attention_heads,),
                m + "router.weight": (e, h),
                m + "router.bias": (e,),
                m + "experts.gate_up_proj_bias": (e, 2 * inter),
                m + "experts.down_proj_bias": (e, h),
            }
        )
        if quantized:
            shapes.update(
                {
                    m + "experts.gate_up_proj_blocks": (e, 2 * inter, h // 32, 16),
                    m + "experts.gate_up_proj_scales": (e, 2 * inter, h // 32),
                    m + "experts.down_proj_blocks": (e, h, inter // 32, 16),
                    m + "experts.down_proj_scales": (e, h, inter // 32),
                }
            )
        else:
            shapes.update(
                {
                    m + "experts.gate_up_proj": (e, h, 2 * inter),
                    m + "experts.down_proj": (e, inter, h),
                }
            )
    return shapes


def resolve(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory for `source`: itself if it is a directory, else a Hub snapshot.

    With HF_HUB_OFFLINE=1 the Hub path reads only the local HF cache.
    """
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    s = str(source)
    _check_repo_id(s)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                s,
                revision=revision,
                allow_patterns=HUB_ALLOW_PATTERNS,
                ignore_patterns=HUB_IGNORE_PATTERNS,
            )
        )
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{s!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}. Download it where there is "
            "network (`hf download REPO --exclude 'original/*' 'metal/*'`) and copy the cache, or pass a local directory."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hub repo {s!r} not found (or gated without a token)") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"downloading {s!r} failed: {e}") from None


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known of a checkpoint before its weights are fetched."""

    config: ModelConfig
    total_bytes: int | None  # the weight files' size (the index's metadata.total_size)


def peek(source: str | os.PathLike, *, revision: str | None = None) -> CheckpointInfo:
    """config.json and the weights' total size, fetching only those small files from the Hub."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = {n: p / n for n in ("config.json", "model.safetensors.index.json") if (p / n).exists()}
        if "model.safetensors.index.json" not in files and (p / "model.safetensors").exists():
            size: int | None = (p / "model.safetensors").stat().st_size
        else:
            size = None
    else:
        _check_repo_id(str(source))
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        files, size = {}, None
        for n in ("config.json", "model.safetensors.index.json"):
            try:
                files[n] = Path(hf_hub_download(str(source), n, revision=revision))
            except EntryNotFoundError:
                continue
            except LocalEntryNotFoundError as e:
                raise CheckpointError(f"{source!r}: {n} is not in the local Hugging Face cache and the Hub "
                                      f"cannot be reached: {e}") from None
            except HfHubHTTPError as e:
                raise CheckpointError(f"{source!r}: fetching {n} failed: {e}") from None
    if "config.json" not in files:
        raise CheckpointError(f"{source}: no config.json")
    try:
        cfg = ModelConfig.from_file(files["config.json"])
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if "model.safetensors.index.json" in files:
        try:
            size = int(json.loads(files["model.safetensors.index.json"].read_text())["metadata"]["total_size"])
        except (ValueError, KeyError, TypeError):
            size = None
    return CheckpointInfo(cfg, size)


def _check_repo_id(s: str) -> None:
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{s!r} is neither an existing directory nor a Hub repo id of the form 'owner/name'"
        )


def _read_header(f: Path) -> dict[str, dict]:
    """Parse a safetensors header and check the file holds all the bytes it declares."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{f} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{f} is truncated: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{f} is truncated: tensors need {8 + n + end} bytes, file has {size}")
    return header


def open_checkpoint(source: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Resolve, then validate everything short of reading the tensors."""
    path = resolve(source, revision=revision)
    try:
        cfg = ModelConfig.from_file(path / "config.json")
        gen = GenerationDefaults.from_file(path / "generation_config.json")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is malformed (needs a 'weight_map' object)") from None
        shard_names = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        shard_names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")
    missing_files = [s for s in shard_names if not (path / s).exists()]
    if missing_files:
        raise CheckpointError(f"{path} is missing weight files: {', '.join(missing_files)}")

    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for s in shard_names:
        for name, info in _read_header(path / s).items():
            files[name] = path / s
            shapes[name] = tuple(info["shape"])
            dtypes[name] = info["dtype"]

    quantized = cfg.quant_method == "mxfp4"
    want = expected_shapes(cfg, quantized)
    missing = [k for k in want if k not in shapes]
    if missing:
        hint = ""
        if quantized and any(k.endswith("experts.gate_up_proj") for k in shapes):
            hint = " (config says mxfp4 but the experts are stored unquantized)"
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing{hint}, e.g. {', '.join(missing[:4])}"
        )
    wrong = [f"{k}: {shapes[k]} != expected {v}" for k, v in want.items() if shapes[k] != v]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match config.json: " + "; ".join(wrong[:4]))
    bad_dtype = [
        f"{k}: {dtypes[k]}"
        for k in want
        if (dtypes[k] != "U8") == (k.endswith("_blocks") or k.endswith("_scales")) or dtypes[k] not in _ST_DTYPES
    ]
    if bad_dtype:
        raise CheckpointError(f"{path}: unexpected tensor dtypes: " + "; ".join(bad_dtype[:4]))
    return Checkpoint(
        path=path,
        config=cfg,
        generation=gen,
        files={k: files[k] for k in want},
        shapes={k: shapes[k] for k in want},
    )
