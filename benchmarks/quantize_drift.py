"""Logprob drift of quantizing dense (bf16) experts to MXFP4 at load, on synthetic checkpoints.

Both sides run in transformers' GptOssForCausalLM (the independent reference): the dense bf16
checkpoint, and the same weights after `checkpoint.quantize.read_quantized` written back as an
MXFP4 checkpoint (transformers dequantizes it). Teacher-forced on the dense model's own greedy
continuation, it reports per position: |delta logprob| of the dense model's token, top-1
agreement, and KL(dense || quantized).

    python benchmarks/quantize_drift.py [--preset mid] [--tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers
    from safetensors.torch import save_file

    from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
    from swallow_stream.checkpoint.quantize import read_quantized
    from swallow_stream.harmony import render_prompt

    tmp = Path(tempfile.mkdtemp(prefix="drift-"))
    cfg = dataclasses.replace(preset(args.preset), quant_method=None)
    dense_dir = write_checkpoint(tmp / "dense", cfg, seed=args.seed)
    ckpt = open_checkpoint(dense_dir)
    sd, qcfg = read_quantized(ckpt, torch.device("cpu"))
    from swallow_stream.ops import dequantize_mxfp4

    name = "model.layers.0.mlp.experts.gate_up_proj"
    dense_w = ckpt.read([name])[name].float().transpose(1, 2)
    back = dequantize_mxfp4(sd[name + "_blocks"], sd[name + "_scales"])
    weight_rel_error = ((back - dense_w).norm() / dense_w.norm()).item()
    quant_dir = write_checkpoint(tmp / "mxfp4", qcfg, seed=args.seed)
    for f in quant_dir.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})

    def hf(path):
        kw = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if path == quant_dir else {}
        return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()

    prompt = render_prompt("Create a casual one-day Tokyo itinerary in Japanese.", date="2026-01-01")
    dense, quant = hf(dense_dir), hf(quant_dir)
    with torch.no_grad():
        ids = dense.generate(torch.tensor([prompt]), max_new_tokens=args.tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        lp_d = torch.log_softmax(dense(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        lp_q = torch.log_softmax(quant(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    tok = ids[0, len(prompt):]
    delta = (lp_d.gather(1, tok[:, None]) - lp_q.gather(1, tok[:, None])).abs()[:, 0]
    kl = (lp_d.exp() * (lp_d - lp_q)).sum(-1)
    out = {
        "preset": args.preset, "tokens": len(tok),
        "expert_weight_rel_error": round(weight_rel_error, 4),
        "mean_abs_delta_logprob": round(delta.mean().item(), 4),
        "max_abs_delta_logprob": round(delta.max().item(), 4),
        "top1_agreement": round((lp_q.argmax(-1) == lp_d.argmax(-1)).float().mean().item(), 4),
        "mean_kl": round(kl.mean().item(), 5),
        "dense_mean_max_prob": round(lp_d.exp().max(-1).values.mean().item(), 4),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
