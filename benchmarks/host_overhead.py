"""Host cost of one decode step: the real engine with the model's forward replaced by fixed logits.

Everything but the model runs as in serving: the engine thread (scheduler, block manager, batch
building, the sampler over the full 201,088-token vocabulary, stop checks, event delivery) and one
consumer thread per stream doing what `stream()` does (harmony parsing, detokenization). The
forward returns a zero hidden state and the LM head a fixed logits tensor (a plain text token on
top, so nothing stops), so what is left per step is what a GPU would wait for, plus the sampler.

On CPU the sampler is device work too (on CUDA it runs inside the step's graph): it is timed where
it runs, in the engine thread, and reported apart; "host" is the step minus the sampler.

`--consumers async`: every request is an `astream()` on one event loop in one thread, as the
servers (WebSocket, OpenAI API, UI) read them. `--consumers none` (or `--no-consumers`): the
requests' tokens go to a callback that parses them (harmony, detokenization) on the engine thread
and drops them, so the engine thread runs alone: what the engine and the parsing cost, without
thread hand-offs or other threads' Python sharing the GIL with it.

    .venv/bin/python benchmarks/host_overhead.py [--batches 1,16,64] [--repeats 5] [--consumers threads|async|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import torch

TOKEN = 1000  # an ordinary text token: never a stop, never a harmony control token


def fake_model(engine) -> None:
    runner = engine.runner
    model = runner.model
    h = engine.config.hidden_size
    rows = engine.engine_config.max_num_batched_tokens + engine.engine_config.max_num_seqs
    hidden = torch.zeros(rows, h, dtype=model.dtype)
    logits = torch.randn(engine.engine_config.max_num_seqs, engine.config.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[:, TOKEN] = logits.max() + 5.0

    def forward(input_ids, positions, meta, kv_caches):
        return hidden[: input_ids.shape[0]]

    def lm_head(x):
        return logits[: x.shape[0]]

    model.forward = forward
    model.logits = lm_head


def consume_async(engine, prompts: list[str], max_tokens: int, sampling: dict, stop: threading.Event,
                  started: list) -> threading.Thread:
    """Every stream read by `astream` on one event loop in one thread, as the servers read them."""
    from swallow_stream import astream

    async def consume(prompt: str):
        s = astream(prompt, model=engine, max_tokens=max_tokens, **sampling)
        first = True
        async for _ in s:
            if first:
                started.append(1)
                first = False
            if stop.is_set():
                await s.aclose()
                return

    async def main():
        await asyncio.gather(*(consume(p) for p in prompts))

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return thread


def measure(engine, clock, n: int, repeats: int, window: float, sampling: dict, consumers: str = "threads"
            ) -> list[tuple[float, float]]:
    """-> [(seconds per step, of which in the sampler)] per repeat."""
    from swallow_stream import stream
    from swallow_stream.harmony import HarmonyStreamParser, get_tokenizer, render_messages
    from swallow_stream.request import GenerateRequest

    prompts = [f"Request {i}: say something." for i in range(n)]
    max_tokens = engine.max_model_len - 200
    stop = threading.Event()
    threads, seqs = [], []
    if consumers == "async":
        first_tokens: list = []
        threads = [consume_async(engine, prompts, max_tokens, sampling, stop, first_tokens)]
        started = lambda: len(first_tokens)  # noqa: E731
    elif consumers == "threads":
        streams = [stream(p, model=engine, max_tokens=max_tokens, **sampling) for p in prompts]

        def consume(s):
            for _ in s:
                if stop.is_set():
                    s.close()
                    return

        threads = [threading.Thread(target=consume, args=(s,), daemon=True) for s in streams]
        for t in threads:
            t.start()
        started = lambda: sum(1 for s in streams if len(s.token_ids) > 0)  # noqa: E731
    else:  # each token parsed (harmony, detokenized) on the engine thread, then dropped
        for p in prompts:
            req = GenerateRequest.create(p, engine.generation, max_tokens=max_tokens, **sampling)
            feed = HarmonyStreamParser(get_tokenizer()).feed
            seqs.append(engine.submit(render_messages(req.messages), req.params,
                                      lambda out, feed=feed: [feed(t) for t in out.token_ids]))
        started = lambda: sum(1 for s in seqs if s.num_generated > 0)  # noqa: E731
    while started() < n:  # every prefill done
        time.sleep(0.01)
    time.sleep(window / 4)
    per_step = []
    for _ in range(repeats):
        s0, c0, t0 = engine.counters.steps_total, clock.total, time.perf_counter()
        time.sleep(window)
        s1, c1, t1 = engine.counters.steps_total, clock.total, time.perf_counter()
        steps = max(s1 - s0, 1)
        per_step.append(((t1 - t0) / steps, (c1 - c0) / steps))
    stop.set()
    for t in threads:
        t.join(30)
    for seq in seqs:
        engine.cancel(seq)
    while engine.num_unfinished:
        time.sleep(0.01)
    return per_step


class SamplerClock:
    """Wraps the runner's sampler to time it where it runs (the engine thread)."""

    def __init__(self):
        from swallow_stream.engine import model_runner

        self.total = 0.0
        inner = model_runner.device_sample

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            self.total += time.perf_counter() - t0
            return out

        model_runner.device_sample = timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window", type=float, default=1.0, help="seconds per repeat")
    ap.add_argument("--greedy", action="store_true", help="temperature 0 instead of Swallow's defaults")
    ap.add_argument("--overlap", choices=["on", "off"], default=None, help="one-step-late decoding (default: the engine's)")
    ap.add_argument("--consumers", choices=["threads", "async", "none"], default="threads",
                    help="threads: one stream() thread per request; async: every request an astream() on one "
                    "event loop (as the servers); none: tokens dropped by a callback")
    ap.add_argument("--no-consumers", action="store_const", const="none", dest="consumers", help="--consumers none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]

    os.environ.setdefault("SWALLOW_STREAM_CACHE", tempfile.mkdtemp(prefix="swallow-host-"))
    from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
    from swallow_stream.engine import EngineOptions, LLMEngine

    path = write_checkpoint(tempfile.mkdtemp(prefix="host-"), preset("tiny"), seed=0)
    # long enough that no stream ends inside the measured windows (~4,000 steps a second at batch 1)
    opts = dict(device="cpu", max_num_seqs=max(batches), max_model_len=65536, kv_cache_memory=1 << 30)
    if args.overlap:
        opts["overlap"] = args.overlap == "on"
    engine = LLMEngine(open_checkpoint(path), EngineOptions(**opts), name="host")
    sampling = {"temperature": 0} if args.greedy else {}  # else generation_config: 0.6 / 0.95 / top_k 20
    # the runner is only touched by the engine thread; patching it before any request is safe
    fake_model(engine)
    clock = SamplerClock()
    results = {}
    for n in batches:
        results[n] = measure(engine, clock, n, args.repeats, args.window, sampling, args.consumers)
    vocab = engine.config.vocab_size
    overlap = engine.engine_config.overlap
    engine.shutdown()
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sampling": "greedy" if args.greedy else "temperature 0.6, top_p 0.95, top_k 20",
        "overlap": overlap,
        "consumers": args.consumers,
        "vocab": vocab,
        "batches": {},
    }
    print(f"{out['machine']}  {out['date']}  sampling: {out['sampling']}  overlap: {overlap}  "
          f"consumers: {out['consumers']}  vocab {vocab}")
    for n in batches:
        step = statistics.median(x for x, _ in results[n])
        samp = statistics.median(y for _, y in results[n])
        host = statistics.median(x - y for x, y in results[n])
        out["batches"][n] = {"step_us": step * 1e6, "sampler_us": samp * 1e6, "host_us": host * 1e6,
                             "repeats_us": [[x * 1e6, y * 1e6] for x, y in results[n]]}
        print(f"batch {n:3d}: step {step * 1e6:8.0f} us, of which the sampler over the vocabulary {samp * 1e6:7.0f} us, "
              f"the rest (host) {host * 1e6:7.0f} us  (medians of {args.repeats}; steps "
              f"{min(x for x, _ in results[n]) * 1e6:.0f}-{max(x for x, _ in results[n]) * 1e6:.0f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
