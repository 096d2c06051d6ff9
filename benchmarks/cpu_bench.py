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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-repeat", type=int, default=12)
    ap.add_argument("--streams", default="1,4,16")
    args = ap.parse_args()

    cfg = preset("mid")
    path = write_checkpoint(tempfile.mkdtemp(prefix="mid-"), cfg, seed=0)
    engine = LLMEngine(open_checkpoint(path), EngineOptions(device="cpu", max_num_seqs=16), name="mid")
    hf = hf_model(path)
    prompt = PROMPT_WORDS * args.prompt_repeat
    prompt_ids = render_prompt(prompt)
    n_prompt = len(prompt_ids)

    stream("warm up", model=engine, temperature=0, max_tokens=4).collect()
    e_prefill, e_decode = time_engine_single(engine, prompt, args.new_tokens)
    h_prefill, h_decode = time_hf(hf, prompt_ids, args.new_tokens)
    rows = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "config": "mid: hidden 512, 4 layers, 16 experts top-4, vocab 201088, MXFP4 experts, fp32 compute",
        "prompt_tokens": n_prompt,
        "single": {
            "engine_prefill_tok_s": n_prompt / e_prefill,
            "hf_prefill_tok_s": n_prompt / h_prefill,
            "engine_decode_tok_s": e_decode,
            "hf_decode_tok_s": h_decode,
        },
        "serving": {},
    }
    for n in [int(x) for x in args.streams.split(",")]:
        prompts = [f"Request {i}: " + PROMPT_WORDS for i in range(n)]
        agg = engine_aggregate(engine, prompts, args.new_tokens)
        hf_seq = hf_sequential(hf, prompts[: min(n, 4)], args.new_tokens)
        rows["serving"][n] = {"engine_tok_s": agg, "hf_sequential_tok_s": hf_seq, "ratio": agg / hf_seq}
    engine.shutdown()

    s = rows["single"]
    print(f"machine: {rows['machine']}  date: {rows['date']}")
    print(f"config: {rows['config']}; prompt {n_prompt} tokens, {args.new_tokens} new tokens")
    print(f"prefill tok/s   engine {s['engine_prefill_tok_s']:8.1f}   transformers {s['hf_prefill_tok_s']:8.1f}"
          f"   ratio {s['engine_prefill_tok_s'] / s['hf_prefill_tok_s']:.2f}x")
    print(f"decode  tok/s   engine {s['engine_decode_tok_s']:8.1f}   transformers {s['hf_decode_tok_s']:8.1f}"
          f"   ratio {s['engine_decode_tok_s'] / s['hf_decode_tok_s']:.2f}x")
    for n, r in rows["serving"].items():
        print(f"{n:3d} streams: engine {r['engine_tok_s']:8.1f} tok/s aggregate   transformers sequential "
              f"{r['hf_sequential_tok_s']:8.1f}   ratio {r['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
