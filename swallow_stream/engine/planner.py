"""Fit before fetch: weights + KV cache + activations against a GPU, from config.json alone.

The same arithmetic serves three places: the check before any download (`load()` and the server
stop with one message saying what is needed, what is there and what would fit), `--dry-run`
(prints the table), and the engine's KV budget (what is left after the weights).

Resident weights are counted in the layout the engine keeps: MXFP4 experts packed (dense
checkpoints are quantized while loading unless kept dense), everything else in the compute dtype,
norms, sinks and expert biases in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ModelConfig
from ..errors import InsufficientMemoryError
from .config import DTYPES, EngineConfig, EngineOptions

GiB = 2**30
# Within the utilization share, memory no tensor of ours accounts for: cuBLAS workspaces, the
# caching allocator's slack, the CUDA graphs' pools. (The CUDA context lives in the share left
# over by the utilization, as in vLLM.)
RUNTIME_RESERVE = 256 * 2**20


@dataclass(frozen=True)
class WeightBytes:
    embeddings: int  # embed_tokens + lm_head
    attention: int  # qkv/o weights and biases, sinks, norms
    router: int
    experts: int  # as held on the device
    quantize_peak: int  # one dense expert and its fp32 temporaries, while quantizing (0 when packed on disk)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.router + self.experts


def weight_bytes(cfg: ModelConfig, dtype_bytes: int = 2, keep_dense: bool = False) -> WeightBytes:
    h, e, i, n = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.q_size, cfg.kv_size
    attention = n * ((h * (q + 2 * kv) + (q + 2 * kv)) * dtype_bytes  # fused qkv + bias
                     + (q * h + h) * dtype_bytes  # o_proj + bias
                     + (cfg.num_attention_heads + 2 * h) * 4)  # sinks, two norms (fp32)
    attention += h * 4  # final norm
    router = n * (e * h + e) * dtype_bytes
    biases = n * e * (2 * i + h) * 4
    dense_layer = e * 3 * h * i * 2  # bf16 gate_up (2i x h) + down (h x i)
    packed = e * (2 * i * h + h * i) // 2 + e * (2 * i * h + h * i) // 32  # E2M1 nibbles + E8M0 scales
    experts = n * (dense_layer if keep_dense else packed) + biases
    quantizing = cfg.quant_method is None and not keep_dense
    return WeightBytes(
        embeddings=2 * cfg.vocab_size * h * dtype_bytes,
        attention=attention,
        router=router,
        experts=experts,
        quantize_peak=2 * i * h * (2 + 4 * 3) if quantizing else 0,  # bf16 in, three fp32 temporaries
    )


def activation_bytes(cfg: ModelConfig, max_num_seqs: int, max_num_batched_tokens: int, dtype_bytes: int = 2) -> int:
    """Peak scratch of one step: the widest per-token tensors of a full prefill chunk (residual,
    normed input, qkv, attention out, the routed experts' gate_up and activations) plus the
    sampled rows' fp32 logits and probabilities."""
    t, h, k, i = max_num_batched_tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.intermediate_size
    per_token = (4 * h + cfg.q_size + 2 * cfg.kv_size + cfg.q_size) * dtype_bytes + k * (2 * i + i + h) * 4
    return t * per_token + 2 * max_num_seqs * cfg.vocab_size * 4


def kv_bytes(cfg: ModelConfig, tokens: int, max_num_seqs: int, block_size: int = 16, dtype_bytes: int = 2) -> int:
    """KV cache for `tokens` tokens in the full-attention layers, plus the sliding layers' pool
    (each running sequence needs one window of blocks there, whatever its length)."""
    per_layer_token = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    n_sliding = sum(1 for t in cfg.layer_types if t == "sliding_attention")
    n_full = cfg.num_hidden_layers - n_sliding
    sliding_tokens = max_num_seqs * (math.ceil(cfg.sliding_window / block_size) + 2) * block_size if n_sliding else 0
    return per_layer_token * (n_full * tokens + n_sliding * sliding_tokens)


@dataclass
class MemoryPlan:
    model: str
    gpu_name: str
    gpu_bytes: int
    usable_bytes: int  # gpu_bytes x utilization
    weights: WeightBytes
    activations: int
    reserve: int
    max_model_len: int
    max_num_seqs: int
    cfg: ModelConfig = field(repr=False, default=None)
    block_size: int = 16
    dtype_bytes: int = 2
    download_bytes: int | None = None
    advice: list[str] = field(default_factory=list)

    def kv(self, tokens: int) -> int:
        return kv_bytes(self.cfg, tokens, self.max_num_seqs, self.block_size, self.dtype_bytes)

    @property
    def kv_budget(self) -> int:
        return self.usable_bytes - self.weights.total - self.activations - self.reserve

    @property
    def kv_needed(self) -> int:
        """One sequence at the full context length, plus the sliding pool for every sequence."""
        return self.kv(self.max_model_len)

    @property
    def load_peak(self) -> int:
        return self.weights.total + self.weights.quantize_peak + self.reserve

    @property
    def fits(self) -> bool:
        return self.kv_budget >= self.kv_needed and self.load_peak <= self.usable_bytes

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV budget holds in the full-attention layers."""
        per = self.kv(1) - self.kv(0)
        return max(0, (self.kv_budget - self.kv(0)) // per) if per else 0

    def table(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        w = self.weights
        rows = [
            f"memory plan: {self.model} on {self.gpu_name} ({self.gpu_bytes / GiB:.1f} GiB)",
            f"  usable (x utilization)   {g(self.usable_bytes)}",
            f"  weights                  {g(w.total)}",
            f"    experts                {g(w.experts)}",
            f"    attention + norms      {g(w.attention)}",
            f"    embeddings + lm_head   {g(w.embeddings)}",
            f"    router                 {g(w.router)}",
            f"  activations (one step)   {g(self.activations)}",
            f"  CUDA runtime reserve     {g(self.reserve)}",
            f"  KV cache budget          {g(self.kv_budget)}  (~{self.kv_tokens:,} tokens)",
            f"  KV needed                {g(self.kv_needed)}  ({self.max_model_len:,} tokens, {self.max_num_seqs} seqs)",
        ]
        if w.quantize_peak:
            rows.append(f"  load peak (quantizing)   {g(self.load_peak)}")
        if self.download_bytes is not None:
            rows.append(f"  download (checkpoint)    {g(self.download_bytes)}")
        rows.append("  verdict: " + ("fits" if self.fits else "does NOT fit"))
        rows += [f"  - {a}" for a in self.advice]
        return "\n".join(rows)

    def error_message(self) -> str:
        need = self.weights.total + self.activations + self.reserve + self.kv_needed
        return (f"{self.model} does not fit {self.gpu_name}: it needs about {need / GiB:.1f} GiB "
                f"(weights {self.weights.total / GiB:.1f}, KV for {self.max_model_len:,} tokens "
                f"{self.kv_needed / GiB:.1f}, activations and runtime {(self.activations + self.reserve) / GiB:.1f}) "
                f"and {self.usable_bytes / GiB:.1f} GiB are usable. " + " ".join(self.advice))


def plan(cfg: ModelConfig, model: str, gpu_bytes: int, *, gpu_name: str = "the GPU", utilization: float = 0.9,
         max_model_len: int = 32768, max_num_seqs: int = 16, max_num_batched_tokens: int = 2048,
         block_size: int = 16, dtype_bytes: int = 2, keep_dense: bool = False,
         download_bytes: int | None = None, smaller_model: str | None = None) -> MemoryPlan:
    max_model_len = min(max_model_len, cfg.max_position_embeddings)
    p = MemoryPlan(
        model=model, gpu_name=gpu_name, gpu_bytes=gpu_bytes, usable_bytes=int(gpu_bytes * utilization),
        weights=weight_bytes(cfg, dtype_bytes, keep_dense),
        activations=activation_bytes(cfg, max_num_seqs, max_num_batched_tokens, dtype_bytes),
        reserve=RUNTIME_RESERVE, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        cfg=cfg, block_size=block_size, dtype_bytes=dtype_bytes, download_bytes=download_bytes,
    )
    if not p.fits:
        p.advice = _advice(p, smaller_model, keep_dense)
    return p


def _advice(p: MemoryPlan, smaller_model: str | None, keep_dense: bool) -> list[str]:
    out = []
    if p.load_peak > p.usable_bytes or p.kv_budget <= p.kv(0):
        if keep_dense and p.cfg.quant_method is None:
            out.append("Quantize the experts to MXFP4 (drop --keep-dense-experts): a quarter of their memory.")
        if smaller_model:
            out.append(f"Use a smaller model: --model {smaller_model}.")
        out.append("Or use a GPU with more memory.")
        return out
    fit_len = p.kv_tokens
    if fit_len >= 1024:
        out.append(f"Use a shorter context: --max-model-len {fit_len // 1024 * 1024}.")
    if p.max_num_seqs > 1:
        out.append("Run fewer sequences at once (--max-num-seqs) to shrink the sliding-window pool.")
    if smaller_model:
        out.append(f"Or a smaller model: --model {smaller_model}.")
    return out


def plan_engine(cfg: ModelConfig, model: str, opts: EngineOptions, gpu_bytes: int, *, gpu_name: str = "the GPU",
                download_bytes: int | None = None, smaller_model: str | None = None) -> MemoryPlan:
    """`plan` with an engine's options (its defaults for a CUDA device)."""
    return plan(cfg, model, gpu_bytes, gpu_name=gpu_name, utilization=opts.gpu_memory_utilization,
                max_model_len=opts.max_model_len, max_num_seqs=opts.max_num_seqs,
                max_num_batched_tokens=opts.max_num_batched_tokens or 2048, block_size=opts.block_size,
                dtype_bytes=DTYPES[opts.dtype].itemsize if opts.dtype else 2,
                keep_dense=opts.quantize_dense_experts is False, download_bytes=download_bytes,
                smaller_model=smaller_model)


def cuda_memory() -> tuple[int, str] | None:
    """(total bytes, name) of the first CUDA device, or None."""
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
    except Exception:  # a broken driver is no GPU to plan for
        return None
    return props.total_memory, props.name


def preflight(model: str, opts: EngineOptions, gpu: tuple[int, str] | None = None) -> MemoryPlan | None:
    """Before any weight is downloaded: the plan for `model` on the GPU (or `gpu`, for --dry-run),
    raising InsufficientMemoryError when it does not fit. None when there is no GPU to plan for."""
    from ..catalog import smaller_than
    from ..checkpoint.loader import peek

    if gpu is None:
        if opts.device not in (None, "cuda") and not str(opts.device).startswith("cuda"):
            return None
        gpu = cuda_memory()
        if gpu is None:
            return None
    info = peek(model, revision=opts.revision)
    p = plan_engine(info.config, model, opts, gpu[0], gpu_name=gpu[1], download_bytes=info.total_bytes,
                    smaller_model=smaller_than(model))
    if not p.fits:
        raise InsufficientMemoryError(p.error_message())
    return p


def kv_cache_budget(ec: EngineConfig, cfg: ModelConfig) -> tuple[int, int]:
    """-> (bytes for the KV cache once the weights are placed, the longest sequence they hold).

    The budget: the explicit kv_cache_memory, else on CUDA total x utilization minus what is in
    use and one step's activations, else 512 MiB. Too little for even one block per sequence
    raises, with the numbers."""
    import torch

    dtype_bytes = ec.dtype.itemsize
    kv = lambda tokens: kv_bytes(cfg, tokens, ec.max_num_seqs, ec.block_size, dtype_bytes)  # noqa: E731
    if ec.kv_cache_memory is not None:
        budget, how = ec.kv_cache_memory, f"kv_cache_memory = {ec.kv_cache_memory / GiB:.2f} GiB"
    elif ec.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(ec.device)
        act = activation_bytes(cfg, ec.max_num_seqs, ec.max_num_batched_tokens, dtype_bytes)
        budget = int(total * ec.gpu_memory_utilization) - (total - free) - act - RUNTIME_RESERVE
        how = (f"{total / GiB:.2f} GiB x {ec.gpu_memory_utilization} utilization - {(total - free) / GiB:.2f} GiB in use "
               f"(weights, CUDA context) - {act / GiB:.2f} GiB activations - {RUNTIME_RESERVE / GiB:.2f} GiB reserve")
    else:
        budget, how = 512 << 20, "the CPU default of 512 MiB"
    per_token = kv(1) - kv(0)
    longest = (budget - kv(0)) // per_token if per_token else ec.max_model_len
    if longest < ec.block_size:
        raise InsufficientMemoryError(
            f"KV cache budget {budget / GiB:.2f} GiB ({how}) leaves no room: the sliding-window layers of "
            f"{ec.max_num_seqs} sequences alone need {kv(0) / GiB:.2f} GiB and each token "
            f"{per_token / 2**10:.0f} KiB more. Lower --max-num-seqs, raise --gpu-memory-utilization or "
            "--kv-cache-memory, or use a smaller model or a GPU with more memory")
    return budget, int(longest)
