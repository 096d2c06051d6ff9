"""The engine: a loop in its own thread that schedules, runs the model and hands out tokens.

Front doors call `submit()` / `cancel()` from any thread (or event loop); those only put a
command in the inbox. Each request's tokens go to the `emit` callback it registered (a queue
put, or a call_soon_threadsafe into an event loop), so nothing waits on the GPU but this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..config import GenerationDefaults, ModelConfig
from ..errors import ContextLengthExceededError, InvalidRequestError, OverloadedError, SwallowError
from ..model import ModelWeights
from ..ops import get_ops
from ..sampling import SamplingParams
from .block_manager import KVCacheManager
from .model_runner import ModelRunner, plan_kv_cache
from .scheduler import Scheduler
from .sequence import Sequence, SequenceOutput, SequenceStatus

log = logging.getLogger("swallow_stream.engine")


@dataclass
class EngineOptions:
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    ops: str = "auto"  # "auto" | "torch" | "triton"
    max_num_seqs: int = 16
    max_queued_requests: int = 64
    max_model_len: int = 32768
    max_num_batched_tokens: int | None = None  # None: 2048 on cuda, 512 on cpu
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: 0.9 of free GPU memory, 512 MiB on cpu
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None  # None: on when the device is CUDA
    # No engine thread: consumers drive the steps (`pump`). For hosts where the GPU exists only
    # inside request handlers (Hugging Face ZeroGPU).
    inline: bool = False
    # CPU + torch ops: unpack MXFP4 experts once at load when they fit in this many bytes
    cpu_dequantized_experts_max_bytes: int = 8 << 30
    revision: str | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    generated_tokens_total: int = 0
    computed_tokens_total: int = 0  # tokens run through the model (prefill chunks + decodes)
    requests_finished_total: int = 0
    requests_failed_total: int = 0
    steps_total: int = 0
    tokens_per_second: float = 0.0  # generated, over the last few seconds
    _recent: list[tuple[float, int]] = field(default_factory=list, repr=False)


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


class LLMEngine:
    """checkpoint: a Checkpoint, or a zero-argument callable producing one (built in the engine
    thread). Weights, KV cache and every other tensor are created in the engine thread, the one
    thread that computes: a second thread of CPU work would get its own OpenMP team, and with
    more OpenMP threads than cores libgomp stops spinning, halving CPU throughput."""

    def __init__(
        self,
        checkpoint: Checkpoint | Callable[[], Checkpoint],
        options: EngineOptions | None = None,
        name: str | None = None,
    ):
        opts = options or EngineOptions()
        self.options = opts
        if opts.dtype is not None and opts.dtype not in _DTYPES:
            raise InvalidRequestError(f"unknown dtype {opts.dtype!r}; use one of {', '.join(_DTYPES)}")
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._num_unfinished = 0
        self._stopped = False
        self._step_lock = threading.Lock()  # inline mode: one consumer steps at a time
        self._thread = None
        if opts.inline:
            self._build(checkpoint, name)
            return
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                self._build(checkpoint, name)
            except BaseException as e:  # reported to the constructor's caller
                failed.append(e)
                return
            finally:
                ready.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="swallow-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    def _build(self, checkpoint: Checkpoint | Callable[[], Checkpoint], name: str | None) -> None:
        opts = self.options
        if callable(checkpoint) and not isinstance(checkpoint, Checkpoint):
            checkpoint = checkpoint()
        self.name = name or checkpoint.path.name
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.generation: GenerationDefaults = checkpoint.generation
        device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.device, self.dtype = device, dtype
        self.max_model_len = min(opts.max_model_len, self.config.max_position_embeddings)
        self.stop_token_ids = frozenset(self.config.eos_token_ids) | frozenset(self.generation.eos_token_ids) | {200002, 200012}
        self.stop_token_ids -= {200007}  # <|end|> closes the analysis message; never a stop

        weights = ModelWeights.from_state_dict(self.config, checkpoint.read(device=device), device, dtype)
        ops = get_ops(opts.ops, device.type)
        if device.type == "cpu" and ops.name == "torch":
            cfg = self.config
            dense_bytes = 3 * cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size * 4
            if self.config.quant_method == "mxfp4" and dense_bytes <= opts.cpu_dequantized_experts_max_bytes:
                for layer in weights.layers:
                    layer.experts.materialize(torch.float32)
        max_batched = opts.max_num_batched_tokens or (2048 if device.type == "cuda" else 512)
        budget = opts.kv_cache_memory
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * opts.gpu_memory_utilization) - (2 << 30)  # activations headroom
            else:
                budget = 512 << 20
        plan = plan_kv_cache(self.config, budget, opts.block_size, dtype, opts.max_num_seqs, max_batched)
        window = self.config.sliding_window
        self.kv = KVCacheManager(
            plan.num_full_blocks, plan.num_sliding_blocks, opts.block_size, window, opts.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.kv, opts.max_num_seqs, max_batched)
        self.runner = ModelRunner(
            self.config, weights, ops, plan, self.max_model_len, opts.max_num_seqs, opts.cuda_graphs
        )
        self.stats = EngineStats(kv_blocks_total=self.kv.num_total_blocks)

    @classmethod
    def from_pretrained(cls, source: str, options: EngineOptions | None = None, name: str | None = None) -> "LLMEngine":
        opts = options or EngineOptions()
        return cls(open_checkpoint(source, revision=opts.revision), opts, name=name or str(source))

    # -- front-door API (any thread) -------------------------------------------------------------
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        emit: Callable[[SequenceOutput], None],
        request_id: str | None = None,
    ) -> Sequence:
        """Queue a request. Raises at once for a too-long prompt or a full queue."""
        if self._stopped:
            raise SwallowError("engine is shut down")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("empty prompt")
        if n >= self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt has {n} tokens; the maximum context length is {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        room = self.max_model_len - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceededError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum context length "
                f"{self.max_model_len}"
            )
        if not self.kv.fits_alone(n + 1):
            raise ContextLengthExceededError(f"prompt has {n} tokens, more than the KV cache can hold")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        with self._lock:
            if self._num_unfinished >= self.options.max_num_seqs + self.options.max_queued_requests:
                raise OverloadedError(
                    f"server is at capacity ({self._num_unfinished} requests running or queued); retry shortly"
                )
            self._num_unfinished += 1
        params = _with_stops(params, self.stop_token_ids, room)
        seq = Sequence(prompt_token_ids, params, emit, request_id)
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request; its blocks are freed before the next step."""
        self._inbox.put(("cancel", seq))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            with self._step_lock:
                self._drain_inbox()
                self._cancel_all()

    @property
    def num_unfinished(self) -> int:
        return self._num_unfinished

    # -- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self.step()
        self._cancel_all()

    @property
    def inline(self) -> bool:
        return self._thread is None

    def pump(self) -> None:
        """Inline mode: run one step for everyone (the calling consumer waits for its tokens)."""
        with self._step_lock:
            self._drain_inbox()
            if self.scheduler.has_work():
                self.step()

    def _cancel_all(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "cancelled", SwallowError("engine shut down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":  # the inbox is FIFO: a request's add always precedes its cancel
                self.scheduler.add(seq)
                self.stats.prompt_tokens_total += seq.num_prompt_tokens
            elif cmd == "cancel":
                self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        if seq.status == SequenceStatus.FINISHED:
            return
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        with self._lock:
            self._num_unfinished -= 1
        self.stats.requests_finished_total += 1
        self.stats.prefix_cache_hit_tokens_total += seq.num_cached_prompt_tokens
        if error is not None:
            self.stats.requests_failed_total += 1
        seq.emit(SequenceOutput([], finish_reason=reason, error=error, num_cached_tokens=seq.num_cached_prompt_tokens))

    def step(self) -> None:
        batch, unfittable = self.scheduler.schedule()
        for seq in unfittable:
            self._finish(seq, "error", ContextLengthExceededError(f"sequence of {len(seq)} tokens does not fit in the KV cache"))
        if not batch:
            return
        try:
            sampled = self.runner.run(batch)
        except Exception:
            # Find the request(s) at fault by running each alone; only those fail. Re-running
            # rewrites the same cache slots, so the others' state stays exact.
            log.exception("engine step of %d request(s) failed; isolating", len(batch))
            batch, sampled = self._run_isolated(batch)
            if not batch:
                return
        self.stats.steps_total += 1
        self.stats.computed_tokens_total += sum(n for _, n in batch)
        it = iter(sampled)
        now = time.monotonic()
        produced = 0
        for seq, n in batch:
            seq.num_computed += n
            self.kv.commit(seq)
            if seq.num_computed < len(seq.token_ids):
                continue  # a prefill chunk with more to come
            token, lp, top = next(it)
            seq.token_ids.append(token)
            produced += 1
            p = seq.params
            reason = None
            if token in p.stop_token_ids:
                reason = "stop"
            elif (p.max_tokens is not None and seq.num_generated >= p.max_tokens) or len(seq.token_ids) >= self.max_model_len:
                reason = "length"
            seq.emit(
                SequenceOutput(
                    [token],
                    [lp] if lp is not None else None,
                    [top] if top is not None else None,
                    num_cached_tokens=seq.num_cached_prompt_tokens,
                )
            )
            if reason:
                self._finish(seq, reason)
        self._update_stats(now, produced)

    def _run_isolated(self, batch):
        ok, sampled = [], []
        for seq, n in batch:
            try:
                out = self.runner.run([(seq, n)])
            except Exception as e:
                self._finish(seq, "error", e)
                continue
            ok.append((seq, n))
            sampled.extend(out)
        return ok, sampled

    def _update_stats(self, now: float, produced: int) -> None:
        s = self.stats
        s.generated_tokens_total += produced
        s._recent.append((now, produced))
        while s._recent and now - s._recent[0][0] > 5.0:
            s._recent.pop(0)
        span = now - s._recent[0][0] if len(s._recent) > 1 else 0.0
        s.tokens_per_second = sum(c for _, c in s._recent[1:]) / span if span > 0 else 0.0
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.kv.num_total_blocks - self.kv.num_free_blocks
        s.num_preemptions = self.scheduler.num_preemptions

    def snapshot(self) -> dict:
        """Engine-wide counters for /health and metrics (read from any thread)."""
        s = self.stats
        return {
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "unfinished": self._num_unfinished,
            "kv_blocks_used": self.kv.num_total_blocks - self.kv.num_free_blocks,
            "kv_blocks_total": self.kv.num_total_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": s.prompt_tokens_total,
            "generated_tokens_total": s.generated_tokens_total,
            "computed_tokens_total": s.computed_tokens_total,
            "prefix_cache_hit_tokens_total": s.prefix_cache_hit_tokens_total,
            "requests_finished_total": s.requests_finished_total,
            "requests_failed_total": s.requests_failed_total,
            "tokens_per_second": round(s.tokens_per_second, 2),
            "max_model_len": self.max_model_len,
        }


def _with_stops(params: SamplingParams, stop_ids: frozenset[int], room: int) -> SamplingParams:
    from dataclasses import replace

    return replace(
        params,
        stop_token_ids=params.stop_token_ids | stop_ids,
        max_tokens=min(params.max_tokens, room) if params.max_tokens is not None else room,
    )
