"""CPU benchmark: swallow-stream's engine against transformers on the same synthetic checkpoint.

Measures, in one run, on the mid-size config (hidden 512, 4 layers, 16 experts top-4, the full
201k vocab, MXFP4 experts):
  - single stream: prefill tokens/s and decode tokens/s of `stream()` vs `generate()`;
  - serving: aggregate decode tokens/s with 1, 4 and 16 concurrent streams vs transformers
    serving the same requests one after another.

    .venv/bin/python benchmarks/cpu_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import torch

os.environ.setdefault("SWALLOW_STREAM_CACHE", tempfile.mkdtemp(prefix="swallow-bench-"))

from swallow_stream import stream  # noqa: E402
from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint  # noqa: E402
from swallow_stream.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from swallow_stream.harmony import render_prompt  # noqa: E402

PROMPT_WORDS = "Create a casual one-day Tokyo itinerary in Japanese, with times and train lines. "


def hf_model(path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager"
    ).eval()


def time_hf(model, prompt_ids, new_tokens):
    """(prefill seconds, decode tokens/s): decode from generate(N) minus generate(1)."""
    ids = torch.tensor([prompt_ids])

    def gen(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - t0

    with torch.no_grad():
        t_one = gen(1)
        t_n = gen(new_tokens)
    return t_one, (new_tokens - 1) / (t_n - t_one)


def time_engine_single(engine, prompt, new_tokens):
    # prefill: a 1-token generation is all prefill plus one sample
    t0 = time.perf_counter()
    stream(prompt, model=engine, temperature=0, max_tokens=1).collect()
    t_prefill = time.perf_counter() - t0
    s = stream(prompt + " (again)", model=engine, temperature=0, max_tokens=new_tokens).collect()
    return t_prefill, s.stats.tokens_per_second


def engine_aggregate(engine, prompts, new_tokens):
    results = []

    def run(p):
        results.append(stream(p, model=engine, temperature=0, max_tokens=new_tokens).collect())

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return sum(r.usage.completion_tokens for r in results) / dt


def hf_sequential(model, prompts, new_tokens):
    t0 = time.perf_counter()
    total = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([render_prompt(p)])
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            total += out.shape[1] - ids.shape[1]
    return total / (time.perf_counter() - t0)


def run_engine(path, prompt, prompt_ids, new_tokens, stream_counts):
    engine = LLMEngine(lambda: open_checkpoint(path), EngineOptions(device="cpu", max_num_seqs=16), name="mid")
    stream("warm up", model=engine, temperature=0, max_tokens=4).collect()
    prefill_s, decode = time_engine_single(engine, prompt, new_tokens)
    out = {"prefill_tok_s": len(prompt_ids) / prefill_s, "decode_tok_s": decode, "serving": {}}
    for n in stream_counts:
        prompts = [f"Request {i}: " + PROMPT_WORDS for i in range(n)]
        out["serving"][n] = engine_aggregate(engine, prompts, new_tokens)
    engine.shutdown()
    return out


def run_hf(path, prompt_ids, new_tokens, stream_counts):
    hf = hf_model(path)
    prefill_s, decode = time_hf(hf, prompt_ids, new_tokens)
    out = {"prefill_tok_s": len(prompt_ids) / prefill_s, "decode_tok_s": decode, "serving": {}}
    for n in stream_counts:
        prompts = [f"Request {i}: " + PROMPT_WORDS for i in range(n)]
        out["serving"][n] = hf_sequential(hf, prompts[: min(n, 4)], new_tokens)  # rate is per request
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-repeat", type=int, default=12)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--part", choices=["engine", "hf"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    prompt = PROMPT_WORDS * args.prompt_repeat
    prompt_ids = render_prompt(prompt)

    if args.part:  # one side, in its own process: each gets the CPU's OpenMP threads to itself
        fn = run_engine(args.checkpoint, prompt, prompt_ids, args.new_tokens, counts) if args.part == "engine" \
            else run_hf(args.checkpoint, prompt_ids, args.new_tokens, counts)
        print(json.dumps(fn))
        return

    path = write_checkpoint(tempfile.mkdtemp(prefix="mid-"), preset("mid"), seed=0)
    sides = {}
    for part in ("engine", "hf"):
        cmd = [sys.executable, __file__, "--part", part, "--checkpoint", str(path), "--new-tokens", str(args.new_tokens),
               "--prompt-repeat", str(args.prompt_repeat), "--streams", args.streams]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        sides[part] = json.loads(out.strip().splitlines()[-1])
    e, h = sides["engine"], sides["hf"]
    rows = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "config": "mid: hidden 512, 4 layers, 16 experts top-4, vocab 201088, MXFP4 experts, fp32 compute",
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "engine": e,
        "transformers": h,
    }
    print(f"machine: {rows['machine']}  date: {rows['date']}")
    print(f"config: {rows['config']}; prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens")
    for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode ")):
        print(f"{label} tok/s   engine {e[key]:8.1f}   transformers {h[key]:8.1f}   ratio {e[key] / h[key]:.2f}x")
    for n in counts:
        a, b = e["serving"][str(n)], h["serving"][str(n)]
        print(f"{n:3d} streams: engine {a:8.1f} tok/s aggregate   transformers one after another {b:8.1f}   "
              f"ratio {a / b:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
