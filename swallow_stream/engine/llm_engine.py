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
from dataclasses import replace
from typing import Callable

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.quantize import read_quantized
from ..config import GenerationDefaults, ModelConfig
from ..errors import ContextLengthExceededError, InvalidRequestError, OverloadedError, SwallowError
from ..model import ModelWeights
from ..ops import get_ops
from ..sampling import SamplingParams
from .block_manager import KVCacheManager
from .config import EngineConfig, EngineOptions, StopPolicy, cpu_has_native_bf16, resolve
from .model_runner import ModelRunner, plan_kv_cache
from .planner import kv_cache_budget
from .scheduler import Scheduler
from .sequence import PENDING_TOKEN, Sequence, SequenceOutput, SequenceStatus
from .stats import EngineCounters, ThroughputMeter

log = logging.getLogger("swallow_stream.engine")


class LLMEngine:
    """checkpoint: a Checkpoint, or a zero-argument callable producing one (built in the engine
    thread). Weights, KV cache and every other tensor are created in the engine thread, the one
    thread that computes: a second thread of CPU work would get its own OpenMP team, and with
    more OpenMP threads than cores libgomp stops spinning, halving CPU throughput.

    stops: the token ids that end generation besides the checkpoint's eos ids (the chat format's
    business, handed in by the backend)."""

    def __init__(
        self,
        checkpoint: Checkpoint | Callable[[], Checkpoint],
        options: EngineOptions | None = None,
        name: str | None = None,
        stops: StopPolicy | None = None,
    ):
        self.options = options or EngineOptions()
        self._stops = stops or StopPolicy()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _num_unfinished (front doors) against the engine thread
        self._num_unfinished = 0
        self._stopped = False
        self._step_lock = threading.Lock()  # inline mode: one consumer steps at a time
        self._pending = None  # overlapped decoding: (PendingStep, [(sequence, row)]) not read yet
        self._thread: threading.Thread | None = None
        if self.options.inline:
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
        if callable(checkpoint) and not isinstance(checkpoint, Checkpoint):
            checkpoint = checkpoint()
        self.name = name or checkpoint.path.name
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.generation: GenerationDefaults = checkpoint.generation
        cfg: EngineConfig = resolve(self.options, self.config, self.generation, self._stops)
        self.engine_config = cfg

        t0 = time.monotonic()
        if cfg.quantize_experts:
            state, self.config = read_quantized(checkpoint, cfg.device)
        else:
            state = checkpoint.read(device=cfg.device)
        log.info("read %d tensors (%.2f GiB) from %s in %.1f s", len(state), _nbytes(state) / 2**30, checkpoint.path,
                 time.monotonic() - t0)
        weights = ModelWeights.from_state_dict(self.config, state, cfg.device, cfg.dtype)
        del state
        ops = get_ops(cfg.ops, cfg.device.type)
        if cfg.dequantize_experts and ops.name == "torch":
            # bf16 where the CPU computes it natively (half the bytes a step streams); elsewhere a
            # bf16 GEMM is emulated and slower than fp32, so fp32 even when the engine runs in bf16
            native = cfg.dtype == torch.bfloat16 and cpu_has_native_bf16()
            for layer in weights.layers:
                layer.experts.materialize(torch.bfloat16 if native else torch.float32)
        budget, longest = kv_cache_budget(cfg, self.config)
        if longest < cfg.max_model_len:
            log.warning("the KV cache (%.2f GiB) holds %d tokens of one sequence: max_model_len lowered from %d",
                        budget / 2**30, longest, cfg.max_model_len)
            cfg = self.engine_config = replace(cfg, max_model_len=longest)
        plan = plan_kv_cache(self.config, budget, cfg.block_size, cfg.dtype, cfg.max_num_seqs,
                             cfg.max_num_batched_tokens)
        self.kv = KVCacheManager(plan.num_full_blocks, plan.num_sliding_blocks, cfg.block_size,
                                 self.config.sliding_window, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else cfg.device.type == "cuda"

        def make_runner() -> ModelRunner:
            t0 = time.monotonic()
            runner = ModelRunner(self.config, weights, ops, plan, cfg.max_model_len, cfg.max_num_seqs, cfg.cuda_graphs)
            decode = runner.decode
            log.info("model runner ready in %.1f s (weights laid out for the %s ops, kernels compiled): %s on %s; "
                     "decode CUDA graphs %s", time.monotonic() - t0, ops.name, str(cfg.dtype).removeprefix("torch."),
                     cfg.device, f"captured for batch sizes {decode.buckets}" if decode.use_graphs
                     else ("failed to capture: eager decode" if graphs else "off"))
            return runner

        # An inline engine (ZeroGPU) allocates its KV cache in its first step, inside a GPU call:
        # at import, only the weights may go to the device.
        self._make_runner = make_runner
        self.runner: ModelRunner | None = None if self.options.inline else make_runner()
        n_sliding = sum(1 for t in self.config.layer_types if t == "sliding_attention")
        kv_bytes = plan.bytes_per_block * (plan.num_full_blocks * (self.config.num_hidden_layers - n_sliding)
                                           + plan.num_sliding_blocks * n_sliding)
        log.info("KV cache: %d full + %d sliding blocks of %d tokens (%d tokens), %.2f GiB; max_model_len %d",
                 plan.num_full_blocks, plan.num_sliding_blocks, cfg.block_size, plan.num_full_blocks * cfg.block_size,
                 kv_bytes / 2**30, cfg.max_model_len)
        self.counters = EngineCounters()
        self.throughput = ThroughputMeter()
        log.info("%s ready", self.name)

    @property
    def max_model_len(self) -> int:
        return self.engine_config.max_model_len

    @property
    def device(self):
        return self.engine_config.device

    @property
    def dtype(self):
        return self.engine_config.dtype

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self.engine_config.stop_token_ids

    @property
    def closed(self) -> bool:
        return self._stopped

    @classmethod
    def from_pretrained(cls, source: str, options: EngineOptions | None = None, name: str | None = None,
                        stops: StopPolicy | None = None) -> "LLMEngine":
        opts = options or EngineOptions()
        return cls(open_checkpoint(source, revision=opts.revision), opts, name=name or str(source), stops=stops)

    # -- front-door API (any thread) -------------------------------------------------------------
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        emit: Callable[[SequenceOutput], None],
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> Sequence:
        """Queue a request. Raises at once for a too-long prompt, one whose worst case (prompt plus
        max_tokens; unset: what the cache can hold) could never fit the KV cache, or a full queue.
        cache_salt: requests share cached prefix blocks only with requests of the same salt."""
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
        # Admitted only when the longest it may grow fits the cache alone: otherwise it would fail
        # mid-generation. With max_tokens unset, generation stops where the cache is full.
        kv_room = self.kv.max_tokens_alone() - n
        if params.max_tokens is not None and params.max_tokens > kv_room:
            raise ContextLengthExceededError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds what the KV cache can hold "
                f"({self.kv.max_tokens_alone()} tokens)"
            )
        room = min(room, kv_room)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        with self._lock:
            if self._num_unfinished >= self.engine_config.max_num_seqs + self.engine_config.max_queued_requests:
                raise OverloadedError(
                    f"server is at capacity ({self._num_unfinished} requests running or queued); retry shortly"
                )
            self._num_unfinished += 1
        params = _with_stops(params, self.stop_token_ids, room)
        seq = Sequence(prompt_token_ids, params, emit, request_id, cache_salt)
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request: its admission slot is free at once, its blocks before the next step."""
        self._release(seq)
        self._inbox.put(("cancel", seq))
        self._wake.set()

    def _release(self, seq: Sequence) -> None:
        with self._lock:
            if not seq.released:
                seq.released = True
                self._num_unfinished -= 1

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
        self._pending = None
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "cancelled", SwallowError("engine shut down"))

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while not inbox.empty():  # only this thread (or the one holding _step_lock) takes from it
            cmd, seq = inbox.get_nowait()
            if cmd == "add":  # the inbox is FIFO: a request's add always precedes its cancel
                self.scheduler.add(seq)
                self.counters.prompt_tokens_total += seq.num_prompt_tokens
            elif cmd == "cancel":
                self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        if seq.status == SequenceStatus.FINISHED:
            return
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        self._release(seq)
        self.counters.requests_finished_total += 1
        self.counters.prefix_cache_hit_tokens_total += seq.num_cached_prompt_tokens
        if error is not None:
            self.counters.requests_failed_total += 1
        seq.emit(SequenceOutput([], finish_reason=reason, error=error, num_cached_tokens=seq.num_cached_prompt_tokens))

    def step(self) -> None:
        batch, unfittable = self.scheduler.schedule()
        for seq in unfittable:
            self._finish(seq, "error", ContextLengthExceededError(f"sequence of {len(seq)} tokens does not fit in the KV cache"))
        if batch and self.runner is None:
            self.runner = self._make_runner()
        if batch and self.engine_config.overlap and self.runner.can_launch(batch) and self._launch(batch):
            return
        if self._pending is not None:
            self._resolve()  # the tokens of a launched step first: this step's inputs need them
            batch = [(seq, n) for seq, n in batch if seq.status == SequenceStatus.RUNNING]  # some may have stopped
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
        self.counters.steps_total += 1
        self.counters.computed_tokens_total += sum(n for _, n in batch)
        it = iter(sampled)
        produced = 0
        commit = self.kv.commit
        deliver = self._deliver
        for seq, n in batch:
            c = seq.num_computed = seq.num_computed + n
            commit(seq)
            if c < len(seq.token_ids):
                continue  # a prefill chunk with more to come
            token, lp, top = next(it)
            seq.token_ids.append(token)
            produced += 1
            deliver(seq, token, lp, top)
        self.counters.generated_tokens_total += produced
        self.throughput.add(time.monotonic(), produced)

    def _deliver(self, seq: Sequence, token: int, lp: float | None, top) -> None:
        """Hand a sampled token (already in seq.token_ids) to its consumer; finish on a stop."""
        p = seq.params
        seq.emit(SequenceOutput([token], [lp] if lp is not None and p.logprobs else None,
                                [top] if top is not None else None, None, None, seq.num_cached_prompt_tokens))
        if token in p.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.token_ids) >= seq.max_len:
            self._finish(seq, "length")

    @staticmethod
    def _at_length(seq: Sequence) -> bool:
        return len(seq.token_ids) >= seq.max_len

    def _launch(self, batch: list[tuple[Sequence, int]]) -> bool:
        """One-step-late decode: launch this step (inputs that are still placeholders come from
        the previous step's ids on the device), then read the previous step's ids and hand them
        out while this one runs. False: the launch failed; the plain path takes the step."""
        # a sequence whose pending token is its last (max_tokens, context) needs no further step
        go = [(seq, n) for seq, n in batch if not (seq.pending_row >= 0 and self._at_length(seq))]
        pending = None
        if go:
            try:
                pending = self.runner.launch(go, [seq.pending_row for seq, _ in go])
            except Exception:
                log.exception("overlapped decode step of %d request(s) failed; retrying it in step", len(go))
                return False
        self._resolve()
        rows = []
        commit = self.kv.commit
        for row, (seq, _) in enumerate(go):
            if seq.status != SequenceStatus.RUNNING:
                continue  # stopped (or cancelled) by the tokens just read: this row's token is dropped
            seq.num_computed += 1
            commit(seq)
            seq.token_ids.append(PENDING_TOKEN)
            seq.pending_row = row
            rows.append((seq, row))
        if pending is not None:
            self._pending = (pending, rows)
            self.counters.steps_total += 1
            self.counters.computed_tokens_total += len(go)
        return True

    def _resolve(self) -> None:
        """Read the launched step's sampled ids (waits for it) and deliver them."""
        if self._pending is None:
            return
        pending, rows = self._pending
        self._pending = None
        results = pending.result()
        produced = 0
        for seq, row in rows:
            if seq.pending_row != row or seq.status == SequenceStatus.FINISHED:
                continue  # cancelled while its step ran
            token, lp = results[row]
            seq.token_ids[-1] = token
            seq.pending_row = -1
            produced += 1
            self._deliver(seq, token, lp, None)
        self.counters.generated_tokens_total += produced
        self.throughput.add(time.monotonic(), produced)

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

    def snapshot(self) -> dict:
        """Engine-wide figures for /health and /metrics (read from any thread)."""
        c, kv = self.counters, self.kv
        return {
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "unfinished": self._num_unfinished,
            "kv_blocks_used": kv.num_total_blocks - kv.num_free_blocks,
            "kv_blocks_total": kv.num_total_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": c.prompt_tokens_total,
            "generated_tokens_total": c.generated_tokens_total,
            "computed_tokens_total": c.computed_tokens_total,
            "prefix_cache_hit_tokens_total": c.prefix_cache_hit_tokens_total,
            "requests_finished_total": c.requests_finished_total,
            "requests_failed_total": c.requests_failed_total,
            "steps_total": c.steps_total,
            "tokens_per_second": round(self.throughput.rate(), 2),
            "max_model_len": self.max_model_len,
        }


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _with_stops(params: SamplingParams, stop_ids: frozenset[int], room: int) -> SamplingParams:
    return replace(
        params,
        stop_token_ids=params.stop_token_ids | stop_ids,
        max_tokens=min(params.max_tokens, room) if params.max_tokens is not None else room,
    )
