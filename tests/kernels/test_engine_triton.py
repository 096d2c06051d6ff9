"""The serving engine on the Triton ops (interpreter on CPU): same greedy tokens and logprobs as
the torch ops, through chunked prefill, paged decode, sliding-window block drops and preemption-free
continuous batching."""

import dataclasses

import pytest
import torch

from swallow_stream import stream
from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
from swallow_stream.engine.llm_engine import EngineOptions, LLMEngine


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    # window 16 so a short run crosses it; full vocab for the harmony prompt
    cfg = dataclasses.replace(preset("tiny"), sliding_window=16, num_hidden_layers=2,
                              layer_types=("sliding_attention", "full_attention"))
    return write_checkpoint(tmp_path_factory.mktemp("tri"), cfg, seed=5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter variant; the GPU runs benchmarks/gpu_bench.py")
def test_engine_triton_ops_match_torch_ops(small_path):
    runs = {}
    for ops in ("torch", "triton"):
        engine = LLMEngine(open_checkpoint(small_path),
                           EngineOptions(device="cpu", dtype="float32", ops=ops, block_size=4, max_num_batched_tokens=24), name=ops)
        try:
            assert engine.runner.model.ops.name == ops
            streams = [stream(p, model=engine, temperature=0, max_tokens=6, logprobs=True)
                       for p in ("Tokyo in one day", "富士山")]
            runs[ops] = [[(e.token_id, e.logprob) for e in s if e.token_id is not None] for s in streams]
        finally:
            engine.shutdown()
    for a, b in zip(runs["torch"], runs["triton"]):
        assert len(a) == 6
        assert [t for t, _ in a] == [t for t, _ in b]
        assert torch.allclose(torch.tensor([lp for _, lp in a]), torch.tensor([lp for _, lp in b]), atol=2e-3)
