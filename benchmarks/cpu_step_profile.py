"""Where a CPU decode step's time goes: wall time per op of the model (the OpSet's four ops a
layer, the final norm, the unembedding) and the whole runner step, per decode step.

Runs the real engine on a synthetic checkpoint (default `mid`: hidden 512, 4 layers, 16 experts
top-4, the full 201k vocabulary, MXFP4) at its default dtype, with N concurrent greedy streams,
and wraps each op where the engine thread calls it. Only decode steps (every row one token) count.
What the step spends outside the listed ops is the sampler and batch building.

    .venv/bin/python benchmarks/cpu_step_profile.py [--preset mid] [--streams 1] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import tempfile
import threading
import time


def timed(name: str, fn, sink: list):
    """fn, adding its wall time to the dict in sink[0] (swapped per step: decode steps or not)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sink[0][name] += time.perf_counter() - t0
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default=None, help="force the engine's dtype (default: its own per-device choice)")
    args = ap.parse_args()

    os.environ.setdefault("SWALLOW_STREAM_CACHE", tempfile.mkdtemp(prefix="swallow-prof-"))
    from swallow_stream import stream
    from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
    from swallow_stream.engine import EngineOptions, LLMEngine

    path = write_checkpoint(tempfile.mkdtemp(prefix="prof-"), preset(args.preset), seed=0)
    engine = LLMEngine(lambda: open_checkpoint(path), EngineOptions(device="cpu", max_num_seqs=max(16, args.streams),
                                                                    dtype=args.dtype), name="prof")
    stream("warm up", model=engine, temperature=0, max_tokens=4).collect()
    runner = engine.runner  # made by the warm-up; only the engine thread calls it, and it is idle now
    totals: dict = collections.defaultdict(float)  # decode steps (every row one token)
    other: dict = collections.defaultdict(float)  # steps that prefill
    sink = [totals]
    model = runner.model
    names = ("attn_in", "attention", "attn_out", "moe", "rms_norm")
    model.ops = dataclasses.replace(model.ops, **{n: timed(n, getattr(model.ops, n), sink) for n in names})
    model.logits = timed("logits (unembedding)", model.logits, sink)
    calls = collections.Counter()
    run = timed("runner step", runner.run, sink)

    def counted(batch):
        decode = all(n == 1 for _, n in batch)
        calls["steps" if decode else "prefill steps"] += 1
        sink[0] = totals if decode else other
        return run(batch)

    runner.run = counted
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        stream(f"Request {i}: a one-day Tokyo itinerary, please.", model=engine, temperature=0,
               max_tokens=args.new_tokens).collect())) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = calls["steps"]
    print(f"{args.preset}, {args.streams} stream(s), dtype {engine.dtype}, {steps} decode steps "
          f"({calls['prefill steps']} steps that prefill, not counted); per decode step:")
    for name, total in totals.items():
        print(f"  {name:22s} {total / steps * 1e3:8.2f} ms")
    print(f"  one stream's decode: {results[0].stats.tokens_per_second:.1f} tok/s")
    engine.shutdown()


if __name__ == "__main__":
    main()
