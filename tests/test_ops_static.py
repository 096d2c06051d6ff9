"""The torch ops off the CPU: no read back to the host, so a GPU without usable Triton runs them
without a sync per layer and captures the decode step in a CUDA graph.

Their device paths (`_attention_decode`, `_experts_static`, the -1-safe `store_kv`) are checked
here on CPU against the per-sequence / per-expert paths the CPU takes. The whole decode step is
then run on the "meta" device, whose tensors hold no data: a `.tolist()`, `.item()`, boolean-mask
index or any other data-dependent shape raises there, and a dispatch hook rejects any host tensor
that would be copied to the device inside the step (which CUDA-graph capture forbids).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swallow_stream.checkpoint.synthetic import preset, random_state_dict
from swallow_stream.engine.model_runner import StaticDecode
from swallow_stream.model import BatchMeta, CacheGroupMeta, GptOss, ModelWeights
from swallow_stream.ops import TORCH_OPS, reference
from swallow_stream.ops.reference import ExpertWeights

from attention_cases import CASES, make_batch

DECODE = {"short": [1, 17, 150], "one": [5], "equal": [33, 33, 33, 33]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", list(DECODE))
@pytest.mark.parametrize("window", [0, 24])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1])  # the whole width at once; a block a chunk
def test_decode_attention_without_host_reads_matches_per_sequence(monkeypatch, dtype, lens, window, chunk_elements):
    seq_lens = DECODE[lens]
    q, kc, vc, tables, sl, qsl, sinks = make_batch([1] * len(seq_lens), seq_lens, 8, 2, 16, 4, window, dtype, "cpu")
    monkeypatch.setattr(reference, "_DECODE_CHUNK_ELEMENTS", chunk_elements)
    out = reference._attention_decode(q, kc, vc, tables, sl, sinks, window, 0.25)
    ref = reference.attention(q, kc, vc, tables, sl, qsl, sinks, window, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("score_elements", [1 << 26, 1])  # the whole context at once; one key a chunk
@pytest.mark.parametrize("case", ["prefill", "chunked-prefill", "mixed"])
def test_attention_key_chunks_agree(monkeypatch, score_elements, case):
    """The per-sequence path's key chunks (online softmax) give what one softmax does."""
    q, kc, vc, tables, sl, qsl, sinks = make_batch(*CASES[case], 4, 2, 16, 4, 24, torch.float32, "cpu")
    whole = reference.attention(q, kc, vc, tables, sl, qsl, sinks, 24, 0.25)
    monkeypatch.setattr(reference, "_SCORE_ELEMENTS", score_elements)
    torch.testing.assert_close(reference.attention(q, kc, vc, tables, sl, qsl, sinks, 24, 0.25), whole)


@pytest.mark.parametrize("batch_elements", [3000, 1])  # a few rows a chunk; one row a chunk
@pytest.mark.parametrize("lens", [[1, 17, 150, 40, 33], [60, 3, 9]])
@pytest.mark.parametrize("window", [0, 24])
def test_cpu_decode_chunks_agree(monkeypatch, batch_elements, lens, window):
    """Decode rows attended in chunks (longest first, then put back in their places) give what
    one batch of them gives; the static path is the independent check of the batch itself."""
    q, kc, vc, tables, sl, qsl, sinks = make_batch([1] * len(lens), lens, 4, 2, 16, 4, window, torch.float32, "cpu")
    whole = reference.attention(q, kc, vc, tables, sl, qsl, sinks, window, 0.25)
    torch.testing.assert_close(whole, reference._attention_decode(q, kc, vc, tables, sl, sinks, window, 0.25))
    monkeypatch.setattr(reference, "_DECODE_BATCH_ELEMENTS", batch_elements)
    torch.testing.assert_close(reference.attention(q, kc, vc, tables, sl, qsl, sinks, window, 0.25), whole)


def test_attention_reads_host_lens_when_given():
    """With host_lens the loop takes the caller's lengths, not the tensors' (it never reads them)."""
    q, kc, vc, tables, sl, qsl, sinks = make_batch([3, 1], [10, 20], 4, 2, 16, 4, 0, torch.float32, "cpu")
    ref = reference.attention(q, kc, vc, tables, sl, qsl, sinks, 0, 0.25)
    wrong = torch.zeros_like(sl), torch.zeros_like(qsl)
    out = reference.attention(q, kc, vc, tables, *wrong, sinks, 0, 0.25, host_lens=(qsl.tolist(), sl.tolist()))
    torch.testing.assert_close(out, ref)


def experts_of(quant: str, e: int = 8, h: int = 64, inter: int = 32) -> ExpertWeights:
    cfg = preset("tiny", vocab_size=64, num_hidden_layers=1, layer_types=("full_attention",), num_local_experts=e,
                 hidden_size=h, intermediate_size=inter, quant_method=quant)
    w = ModelWeights.from_state_dict(cfg, random_state_dict(cfg, seed=3, dtype=torch.float32), "cpu", torch.float32)
    return w.layers[0].experts


@pytest.mark.parametrize("quant", ["mxfp4", "dense"])
@pytest.mark.parametrize("t,k", [(1, 4), (3, 2), (9, 4)])  # T*k below, at and above E = 8
@pytest.mark.parametrize("chunk_elements", [1 << 26, 1])  # every chosen expert at once; one a chunk
def test_experts_without_host_reads_match_grouped(monkeypatch, quant, t, k, chunk_elements):
    w = experts_of(quant)
    g = torch.Generator().manual_seed(t * 10 + k)
    x = torch.randn(t, 64, generator=g) * 3  # past the SwiGLU clamp for some gates
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    rw = torch.softmax(torch.randn(t, k, generator=g), -1)
    monkeypatch.setattr(reference, "_STATIC_CHUNK_ELEMENTS", chunk_elements)
    out = reference._experts_static(x, rw, ids, w, 7.0)
    ref = reference.experts_partial(x, rw, ids, w, 7.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_experts_without_host_reads_keep_other_rows_clean():
    """A token's inf in an expert it did not choose must not reach its output (rows are taken by
    selection, not by multiplying with zero)."""
    w = experts_of("dense")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    x[1] = float("inf")  # token 1 only: its rows go inf/NaN in every expert run on all tokens
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    rw = torch.full((2, 2), 0.5)
    out = reference._experts_static(x, rw, ids, w, 7.0)
    assert torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], reference.experts_partial(x[:1], rw[:1], ids[:1], w, 7.0)[0])


@pytest.mark.parametrize("slots", [[-1, 5, -1, 2], [-1, -1], [0, -1, 7], [3], [4, 0, 6]])
def test_store_kv_skips_minus_one_without_masking(slots):
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(4, 2, 1, 3, generator=g), torch.randn(4, 2, 1, 3, generator=g)
    k, v = torch.randn(len(slots), 1, 3, generator=g), torch.randn(len(slots), 1, 3, generator=g)
    want_k, want_v = k_cache.clone().view(8, 1, 3), v_cache.clone().view(8, 1, 3)
    for row, s in enumerate(slots):
        if s >= 0:
            want_k[s], want_v[s] = k[row], v[row]
    reference.store_kv(k, v, k_cache, v_cache, torch.tensor(slots))
    assert torch.equal(k_cache.view(8, 1, 3), want_k) and torch.equal(v_cache.view(8, 1, 3), want_v)


class NoHostTensors(TorchDispatchMode):
    """Fails on any op fed a host tensor of more than one element while the model lives on the
    device: inside a CUDA graph that would be a copy from the host, which capture forbids."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0:
                raise AssertionError(f"{func} read a host tensor {tuple(a.shape)}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=["mxfp4", "dense"])
def meta_model(request):
    cfg = preset("tiny", vocab_size=512, sliding_window=8, quant_method=request.param)
    weights = ModelWeights.from_state_dict(cfg, random_state_dict(cfg, dtype=torch.bfloat16), "meta", torch.bfloat16)
    return GptOss(cfg, weights, TORCH_OPS, max_positions=256)


def meta_caches(model: GptOss, blocks: int = 16):
    shape = (blocks, 4, model.cfg.num_key_value_heads, model.cfg.head_dim)
    return [(torch.empty(shape, dtype=model.dtype, device="meta"), torch.empty(shape, dtype=model.dtype, device="meta"))
            for _ in range(model.cfg.num_hidden_layers)]


def test_torch_decode_step_never_reads_back(meta_model):
    """The decode step the runner captures in a CUDA graph (embedding to sampled ids), on the
    torch ops: runs on data-less tensors without a host tensor crossing over."""
    decode = StaticDecode(meta_model, meta_caches(meta_model), max_num_seqs=4, max_blocks=8, use_graphs=False)
    with NoHostTensors():
        ids, lps, logits = decode._step(4)
    assert ids.shape == (4,) and lps.shape == (4,) and logits.shape == (4, meta_model.cfg.vocab_size)


def test_torch_prefill_never_reads_back(meta_model):
    """A prefill/mixed step reads its lengths from the host lists the batch builder passes."""
    qsl, lens = [0, 5, 6], [5, 9]
    meta = BatchMeta(
        query_start_loc=torch.empty(3, dtype=torch.int32, device="meta"),
        seq_lens=torch.empty(2, dtype=torch.int32, device="meta"),
        full=CacheGroupMeta(torch.empty(6, dtype=torch.int64, device="meta"),
                            torch.empty(2, 3, dtype=torch.int32, device="meta")),
        sliding=CacheGroupMeta(torch.empty(6, dtype=torch.int64, device="meta"),
                               torch.empty(2, 3, dtype=torch.int32, device="meta")),
        host_lens=(qsl, lens),
    )
    ids = torch.empty(6, dtype=torch.int64, device="meta")
    with NoHostTensors():
        hidden = meta_model.forward(ids, torch.empty_like(ids), meta, meta_caches(meta_model))
    assert hidden.shape == (6, meta_model.cfg.hidden_size)


def test_engine_on_device_paths_generates_what_the_cpu_paths_do(monkeypatch, tiny_path, make_engine):
    """The real engine (chunked prefill with host lengths, decode through the static buffers,
    sliding-window layers) with the torch ops' device paths forced on CPU: same greedy tokens."""
    from swallow_stream import stream

    prompts = ["Create a casual one-day Tokyo itinerary in Japanese.", "東京の一日観光プランを作ってください。"]

    def run():
        engine = make_engine(tiny_path, max_num_batched_tokens=32)  # prompts prefill in chunks
        streams = [stream(p, model=engine, temperature=0, max_tokens=32) for p in prompts]
        return [s.collect().token_ids for s in streams]

    on_cpu = run()
    monkeypatch.setattr(reference, "_reads_are_free", lambda t: False)
    calls = {"decode": 0, "experts": 0}
    for name in ("_attention_decode", "_experts_static"):
        real = getattr(reference, name)

        def counted(*a, _real=real, _key=name, **k):
            calls["decode" if _key == "_attention_decode" else "experts"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(reference, name, counted)
    assert run() == on_cpu
    assert calls["decode"] > 0 and calls["experts"] > 0
