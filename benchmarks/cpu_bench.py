"""CPU benchmark: swallow-stream's engine against what a user would pick instead, at its defaults.

Both sides load the same synthetic checkpoint (default `mid`: hidden 512, 4 layers, 16 experts
top-4, the full 201k vocabulary, MXFP4 experts) and each runs in its own process, so each has the
cores and their OpenMP threads to itself. Greedy decoding throughout.

- swallow-stream at its defaults: the dtype it picks for this CPU (bf16 where the CPU computes it
  natively, fp32 elsewhere), continuous batching.
- transformers at its defaults for this model: `GptOssForCausalLM` in bf16 (MXFP4 dequantized, as
  it does on CPU); several prompts at once go through one batched, left-padded `generate`.

Measured: one stream's decode rate; time to first token and decode rate at a ~2k-token prompt
against a ~100-token one; 8 and 16 concurrent streams against transformers' batched `generate` and
against the same prompts one after another.

Each side runs --rounds times (default 3), alternating which goes first; every figure is the median
over the rounds, with the spread of the rounds' own ratios (a shared VM's memory bandwidth drifts
by tens of percent from one minute to the next).

    .venv/bin/python benchmarks/cpu_bench.py [--rounds 3] [--json benchmarks/cpu_bench_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

PROMPT_WORDS = "Create a casual one-day Tokyo itinerary in Japanese, with times and train lines. "


def prompts_of(n: int, repeat: int = 1) -> list[str]:
    return [f"Request {i}: " + PROMPT_WORDS * repeat for i in range(n)]


# -- swallow-stream side ---------------------------------------------------------------------------

def run_engine(path: str, args) -> dict:
    from swallow_stream import stream
    from swallow_stream.engine import EngineOptions, LLMEngine
    from swallow_stream.checkpoint import open_checkpoint

    engine = LLMEngine(lambda: open_checkpoint(path), EngineOptions(device="cpu", max_num_seqs=16, dtype=args.dtype),
                       name="bench")
    stream("warm up", model=engine, temperature=0, max_tokens=4).collect()

    def one(prompt: str, n: int):
        s = stream(prompt, model=engine, temperature=0, max_tokens=n)
        s.collect()
        return s

    out: dict = {"dtype": str(engine.dtype).removeprefix("torch.")}
    shorts = [one(prompts_of(1)[0] + "(short)", args.new_tokens) for _ in range(args.repeats)]
    out["short_prompt_tokens"] = len(shorts[0].prompt_token_ids)
    out["decode_tok_s"] = statistics.median(s.stats.tokens_per_second for s in shorts)
    long = one(prompts_of(1, args.long_repeat)[0], args.new_tokens)  # once: a repeat would hit the prefix cache
    out["long_prompt_tokens"] = len(long.prompt_token_ids)
    out["long_ttft_s"] = long.stats.time_to_first_token
    out["long_decode_tok_s"] = long.stats.tokens_per_second
    out["concurrent"] = {}
    for n in args.streams:
        results = []
        threads = [threading.Thread(target=lambda p=p: results.append(one(p, args.new_tokens))) for p in prompts_of(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["concurrent"][n] = sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - t0)
    engine.shutdown()
    return out


# -- transformers side -----------------------------------------------------------------------------

def run_hf(path: str, args) -> dict:
    from transformers import GptOssForCausalLM, Mxfp4Config

    from swallow_stream.harmony import render_prompt

    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    gen_kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(prompt_ids: list[list[int]], n: int) -> float:
        width = max(map(len, prompt_ids))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **gen_kw)
        return time.perf_counter() - t0

    def rates(prompt: str) -> tuple[float, float]:
        """(time to first token, decode tokens/s after it): generate(1) and generate(N)."""
        ids = [render_prompt(prompt)]
        t1 = generate(ids, 1)
        tn = generate(ids, args.new_tokens)
        return t1, (args.new_tokens - 1) / (tn - t1)

    generate([render_prompt("warm up")], 4)
    out: dict = {"dtype": "bfloat16"}
    out["decode_tok_s"] = statistics.median(rates(prompts_of(1)[0] + "(short)")[1] for _ in range(args.repeats))
    out["long_ttft_s"], out["long_decode_tok_s"] = rates(prompts_of(1, args.long_repeat)[0])  # once, as the engine
    out["batched"], out["sequential"] = {}, {}
    for n in args.streams:
        ids = [render_prompt(p) for p in prompts_of(n)]
        out["batched"][n] = n * args.new_tokens / generate(ids, args.new_tokens)
        k = min(n, 4)  # one after another: the per-request rate does not depend on n
        out["sequential"][n] = k * args.new_tokens / sum(generate([i], args.new_tokens) for i in ids[:k])
    return out


def median_of(runs: list[dict]) -> dict:
    """The rounds' results of one side, each number the median over the rounds."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    if isinstance(first, int):  # token counts: the same every round
        return statistics.median_low(runs)
    return statistics.median(runs) if isinstance(first, float) else first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--long-repeat", type=int, default=120, help="prompt repeats for the ~2k-token prompt")
    ap.add_argument("--streams", default="8,16")
    ap.add_argument("--repeats", type=int, default=3, help="one stream on the short prompt: the median of this many requests")
    ap.add_argument("--rounds", type=int, default=3, help="each side this many times, alternating; medians reported")
    ap.add_argument("--dtype", default=None, help="force the engine's dtype (default: its own per-device choice); "
                    "transformers stays at its default, bf16")
    ap.add_argument("--part", choices=["engine", "hf"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.streams = [int(x) for x in str(args.streams).split(",")]

    if args.part:  # one side, in its own process
        print(json.dumps((run_engine if args.part == "engine" else run_hf)(args.checkpoint, args)))
        return

    os.environ.setdefault("SWALLOW_STREAM_CACHE", tempfile.mkdtemp(prefix="swallow-bench-"))
    from swallow_stream.checkpoint import preset, write_checkpoint

    path = write_checkpoint(tempfile.mkdtemp(prefix="bench-"), preset(args.preset), seed=0)
    rounds = []
    for r in range(args.rounds):
        sides = {}
        # the sides alternate which goes first: a shared VM's slow minutes fall on both alike
        for part in ("engine", "hf") if r % 2 == 0 else ("hf", "engine"):
            cmd = [sys.executable, __file__, "--part", part, "--checkpoint", str(path), "--new-tokens",
                   str(args.new_tokens), "--long-repeat", str(args.long_repeat), "--streams",
                   ",".join(map(str, args.streams)), "--repeats", str(args.repeats)]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            sides[part] = json.loads(out.splitlines()[-1])
        rounds.append({"engine": sides["engine"], "transformers": sides["hf"]})
    e = median_of([r["engine"] for r in rounds])
    h = median_of([r["transformers"] for r in rounds])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "engine_dtype": "forced " + args.dtype if args.dtype else "default",
        "new_tokens": args.new_tokens,
        "engine": e,
        "transformers": h,
        "rounds": rounds,
    }

    def spread(ratio, form: str = " (rounds {})") -> str:  # each round's own ratio, lowest to highest
        each = [ratio(r["engine"], r["transformers"]) for r in rounds]
        return form.format(f"{min(each):.2f}-{max(each):.2f}") if len(each) > 1 else ""

    print(f"machine: {result['machine']}  date: {result['date']}  preset {args.preset}, greedy, "
          f"{args.new_tokens} new tokens; engine {e['dtype']}, transformers {h['dtype']}; medians of {args.rounds} "
          f"round(s)")
    print(f"one stream decode       engine {e['decode_tok_s']:7.1f} tok/s   transformers {h['decode_tok_s']:7.1f}   "
          f"{e['decode_tok_s'] / h['decode_tok_s']:.2f}x{spread(lambda a, b: a['decode_tok_s'] / b['decode_tok_s'])}")
    print(f"{e['long_prompt_tokens']}-token prompt TTFT   engine {e['long_ttft_s'] * 1e3:7.0f} ms     transformers "
          f"{h['long_ttft_s'] * 1e3:7.0f}    {h['long_ttft_s'] / e['long_ttft_s']:.2f}x faster"
          f"{spread(lambda a, b: b['long_ttft_s'] / a['long_ttft_s'])}")
    print(f"decode at that context  engine {e['long_decode_tok_s']:7.1f} tok/s   transformers "
          f"{h['long_decode_tok_s']:7.1f}   {e['long_decode_tok_s'] / h['long_decode_tok_s']:.2f}x"
          f"{spread(lambda a, b: a['long_decode_tok_s'] / b['long_decode_tok_s'])}")
    for n in map(str, args.streams):
        a, b, c = e["concurrent"][n], h["batched"][n], h["sequential"][n]
        print(f"{n:>2} streams aggregate    engine {a:7.1f} tok/s   transformers batched {b:7.1f} ({a / b:.2f}x"
              f"{spread(lambda x, y: x['concurrent'][n] / y['batched'][n], ', rounds {}')}), one after another "
              f"{c:7.1f} ({a / c:.2f}x{spread(lambda x, y: x['concurrent'][n] / y['sequential'][n], ', rounds {}')})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
