"""The whole tiny model on the Triton ops (interpreter on CPU) against the torch ops.

An engine-free driver: two sequences prefilled together (one longer than the sliding window),
then decode steps for both, over a hand-made paged cache. Sliding layers get block tables whose
blocks behind the window are -1, as a block manager that frees them would leave them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swallow_stream.checkpoint.synthetic import preset, random_state_dict
from swallow_stream.model import BatchMeta, CacheGroupMeta, GptOss, ModelWeights
from swallow_stream.ops import get_ops

BLOCK_SIZE = 4
WINDOW = 8


class PagedDriver:
    """Fixed block assignment: sequence b owns blocks [b * per_seq, (b + 1) * per_seq)."""

    def __init__(self, model: GptOss, num_seqs: int, max_len: int):
        cfg = model.cfg
        self.model = model
        self.per_seq = -(-max_len // BLOCK_SIZE)
        nb = num_seqs * self.per_seq
        shape = (nb, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        dev, dt = model.device, model.dtype
        self.caches = [(torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev))
                       for _ in range(cfg.num_hidden_layers)]
        self.lens = [0] * num_seqs

    def step(self, tokens: list[list[int]]) -> torch.Tensor:
        """Append tokens[b] to sequence b; -> log-probs [T, V] of every new position."""
        dev = self.model.device
        ids, pos, slots, qsl = [], [], [], [0]
        for b, toks in enumerate(tokens):
            for j, tok in enumerate(toks):
                p = self.lens[b] + j
                ids.append(tok)
                pos.append(p)
                slots.append((b * self.per_seq + p // BLOCK_SIZE) * BLOCK_SIZE + p % BLOCK_SIZE)
            qsl.append(qsl[-1] + len(toks))
        new_lens = [n + len(t) for n, t in zip(self.lens, tokens)]
        full = torch.tensor([[b * self.per_seq + j for j in range(self.per_seq)] for b in range(len(tokens))], dtype=torch.int32)
        sliding = full.clone()
        for b, toks in enumerate(tokens):
            first_q = self.lens[b]
            for j in range(self.per_seq):
                if (j + 1) * BLOCK_SIZE <= first_q - WINDOW + 1:
                    sliding[b, j] = -1
        slot_t = torch.tensor(slots, dtype=torch.int64, device=dev)
        meta = BatchMeta(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(new_lens, dtype=torch.int32, device=dev),
            full=CacheGroupMeta(slot_t, full.to(dev)),
            sliding=CacheGroupMeta(slot_t, sliding.to(dev)),
        )
        hidden = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, self.caches)
        self.lens = new_lens
        return torch.log_softmax(self.model.logits(hidden), dim=-1)


@pytest.fixture(scope="module")
def tiny_cfg():
    return preset("tiny", vocab_size=512, sliding_window=WINDOW)


def run(cfg, weights, ops, prompts, decode):
    """Prefill `prompts`, then one token per sequence per decode step. -> (log-probs per step,
    per step a [T] bool of tokens whose expert choice differs from `ids_ref` in some layer)."""
    chosen: list[torch.Tensor] = []

    def moe(*args):
        y, ids = ops.moe(*args)
        chosen.append(ids.sort(-1).values.cpu())
        return y, ids

    model = GptOss(cfg, weights, dataclasses.replace(ops, moe=moe), max_positions=64)
    drv = PagedDriver(model, len(prompts), 32)
    logprobs = [drv.step(prompts)] + [drv.step([[tok] for tok in step]) for step in decode]
    n = cfg.num_hidden_layers
    return logprobs, [torch.stack(chosen[i * n : (i + 1) * n]) for i in range(len(logprobs))]


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 19)]
    decode = [torch.randint(0, 512, (2,), generator=g).tolist() for _ in range(3)]
    return prompts, decode


def test_model_fp32_logprobs_match_torch_ops(tiny_cfg, device, inputs):
    weights = ModelWeights.from_state_dict(tiny_cfg, random_state_dict(tiny_cfg, seed=0), device, torch.float32)
    ref, ref_ids = run(tiny_cfg, weights, get_ops("torch", device.type), *inputs)
    got, got_ids = run(tiny_cfg, weights, get_ops("triton", device.type), *inputs)
    for step, (r, g_) in enumerate(zip(ref, got)):
        assert torch.equal(ref_ids[step], got_ids[step]), f"step {step}: expert choice differs"
        err = (r - g_).abs().max().item()
        assert err < 2e-3, f"step {step} ({'prefill' if step == 0 else 'decode'}): max |dlogprob| {err:.3g}"


def test_model_bf16_logprobs_match_torch_ops(tiny_cfg, device, inputs):
    """bf16: both paths are compared with the fp32 torch model, and the Triton path's error must be
    of the size of the torch path's own bf16 error. Top-k routing is discontinuous: a token whose
    expert choice flips (rounding noise at a near-tie) gets an unrelated distribution from this
    random model, so tokens whose routing differs from the fp32 run in any layer are excluded;
    such flips must be rare. (The interpreter also truncates fp32 -> bf16 where GPUs round.)"""
    sd = random_state_dict(tiny_cfg, seed=0)
    gold, gold_ids = run(tiny_cfg, ModelWeights.from_state_dict(tiny_cfg, sd, device, torch.float32), get_ops("torch", device.type), *inputs)
    w16 = ModelWeights.from_state_dict(tiny_cfg, sd, device, torch.bfloat16)
    errs, flips, total = {}, 0, 0
    for backend in ("torch", "triton"):
        lp, ids = run(tiny_cfg, w16, get_ops(backend, device.type), *inputs)
        step_errs = []
        for step in range(len(gold)):
            same = (ids[step] == gold_ids[step]).all(-1).all(0)  # [T]: no layer flipped
            if backend == "triton":
                flips += int((~same).sum())
                total += same.numel()
            step_errs.append((lp[step] - gold[step]).abs().amax(-1)[same])
        errs[backend] = torch.cat(step_errs)
    assert flips <= 0.2 * total, f"{flips}/{total} tokens changed experts"
    torch_err, triton_err = errs["torch"], errs["triton"]
    assert triton_err.numel() >= 0.8 * total
    assert triton_err.median() <= 2 * torch_err.median() + 0.05, (triton_err, torch_err)
    assert triton_err.max() <= 2 * torch_err.max() + 0.1, (triton_err, torch_err)


def test_get_ops_triton_is_the_kernel_opset():
    ops = get_ops("triton", "cpu")
    assert ops.name == "triton"
    from swallow_kernels import ops as kernel_ops

    for name in ("rms_norm", "rope", "store_kv", "route"):  # attention is wrapped: it drops host_lens
        assert getattr(ops, name) is getattr(kernel_ops, name)
    assert get_ops("triton", "cpu") is ops


def test_kernels_package_does_not_import_swallow_stream():
    """swallow_kernels is self-contained: importing it in a fresh interpreter loads no swallow_stream."""
    import subprocess
    import sys

    code = "import sys, swallow_kernels.ops, swallow_kernels.aot; print(any(m.startswith('swallow_stream') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
