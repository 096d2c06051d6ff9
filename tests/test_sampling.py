"""Sampling filters on known distributions, greedy, seeds, parameter validation."""

import math

import pytest
import torch

from swallow_stream.config import GenerationDefaults
from swallow_stream.errors import InvalidRequestError
from swallow_stream.sampling import (
    MAX_CANDIDATES,
    SamplingTensors,
    build_sampling_params,
    candidate_count,
    device_filtered_probs,
    device_sample,
    exponential_noise,
    filtered_probs,
    sample,
)

SWALLOW = GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
P = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
LOGITS = P.log()


def params(**kw):
    kw.setdefault("temperature", 1.0)
    return build_sampling_params(GenerationDefaults(), **kw)


def test_defaults_come_from_generation_config():
    p = build_sampling_params(SWALLOW)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.6, 0.95, 20, 0.0)
    p = build_sampling_params(SWALLOW, temperature=0, top_k=-1)
    assert p.greedy and p.top_k == 0


def test_no_filter_keeps_distribution():
    assert torch.allclose(filtered_probs(LOGITS, [params()]), P, atol=1e-6)


def test_top_k():
    got = filtered_probs(LOGITS, [params(top_k=2)])
    assert torch.allclose(got, torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]), atol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    got = filtered_probs(LOGITS, [params(top_p=0.7)])  # 0.5 < 0.7 -> needs 0.25 as well
    assert torch.allclose(got, torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]), atol=1e-6)
    got = filtered_probs(LOGITS, [params(top_p=0.5)])  # 0.5 alone reaches it
    assert torch.allclose(got, torch.tensor([[1.0, 0, 0, 0, 0]]), atol=1e-6)


def test_min_p_relative_to_top():
    got = filtered_probs(LOGITS, [params(min_p=0.25)])  # keep p >= 0.125
    assert torch.allclose(got, torch.tensor([[4 / 7, 2 / 7, 1 / 7, 0, 0]]), atol=1e-6)


def test_temperature_sharpens():
    got = filtered_probs(LOGITS, [params(temperature=0.5)])
    expect = P**2 / (P**2).sum()
    assert torch.allclose(got, expect, atol=1e-6)


def test_rows_use_their_own_params():
    got = filtered_probs(LOGITS.repeat(2, 1), [params(top_k=1), params()])
    assert torch.allclose(got[0], torch.tensor([1.0, 0, 0, 0, 0]))
    assert torch.allclose(got[1], P[0], atol=1e-6)


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    a = sample(logits, [params(top_k=1)] * 8, [None] * 8)
    b = sample(logits, [params(temperature=0)] * 8, [None] * 8)
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(b, a)


def test_sampling_frequencies_follow_filtered_distribution():
    n = 20000
    logits = LOGITS.repeat(n, 1)
    torch.manual_seed(0)
    got = sample(logits, [params(top_k=3)] * n, [None] * n)
    freq = torch.bincount(got, minlength=5).float() / n
    expect = torch.tensor([4 / 7, 2 / 7, 1 / 7, 0, 0])
    assert torch.allclose(freq, expect, atol=0.02), freq


def test_seed_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2))
    p = params(seed=7)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    alone = [sample(logits[1:2], [p], [gen()]).item()]
    batched = sample(logits, [params(), p, params()], [None, gen(), None])[1].item()
    assert alone[0] == batched


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-5), "max_tokens"),
        (dict(seed="x"), "seed"),
        (dict(stop=[1, 2]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(top_logprobs=50), "top_logprobs"),
    ],
)
def test_bad_params_clear_errors(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        build_sampling_params(SWALLOW, **kw)


def test_top_k_then_top_p_on_renormalized_and_candidate_path_agrees():
    # top_k=3 renormalizes to [4/7, 2/7, 1/7]; top_p=0.8 then keeps 4/7 + 2/7 (mass before 1/7 is 6/7)
    expect = torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]])
    p = params(top_k=3, top_p=0.8)
    assert torch.allclose(filtered_probs(LOGITS, [p]), expect, atol=1e-6)
    # a wide vocab takes the top-k candidate path: same answer
    wide = torch.cat([LOGITS, torch.full((1, 100), -30.0)], dim=1)
    got = filtered_probs(wide, [p])
    assert torch.allclose(got[:, :5], expect, atol=1e-6) and got[:, 5:].sum() == 0


# --- device-side sampler (the decode CUDA graph's): same semantics from per-row tensors ---------


def tensors(ps, seeds=None, positions=None):
    t = SamplingTensors.allocate(len(ps), "cpu")
    t.fill(ps, seeds or list(range(len(ps))), positions or [5] * len(ps))
    return t


MIXED = [params(top_k=5), params(top_p=0.7), params(min_p=0.2, temperature=0.5), params(temperature=0),
         params(top_k=10, top_p=0.5), params(), params(top_k=1), params(top_k=3, top_p=0.8, min_p=0.1, temperature=1.7)]


def test_device_filters_match_host_filters():
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(0)) * 3
    want = filtered_probs(logits, MIXED)
    assert torch.allclose(device_filtered_probs(logits, tensors(MIXED)), want, atol=1e-6)
    small_k = [p for p in MIXED if p.greedy or 0 < p.top_k <= MAX_CANDIDATES]
    rows = [i for i, p in enumerate(MIXED) if p in small_k]
    assert candidate_count(small_k) == MAX_CANDIDATES and candidate_count(MIXED) is None
    got = device_filtered_probs(logits[rows], tensors(small_k), MAX_CANDIDATES)
    assert torch.allclose(got, want[rows], atol=1e-6)


def test_device_sample_known_distributions():
    for p, expect in ((params(top_k=2), [2 / 3, 1 / 3, 0, 0, 0]), (params(min_p=0.25), [4 / 7, 2 / 7, 1 / 7, 0, 0]),
                      (params(top_p=0.5), [1.0, 0, 0, 0, 0])):
        assert torch.allclose(device_filtered_probs(LOGITS, tensors([p])), torch.tensor([expect]), atol=1e-6)


def test_device_sample_greedy_and_logprobs():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    for p in (params(temperature=0), params(top_k=1)):
        ids, lp = device_sample(logits, tensors([p] * 8), MAX_CANDIDATES)
        assert torch.equal(ids, logits.argmax(-1))
        assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0])


def test_device_sample_frequencies_follow_filtered_distribution():
    n = 20000
    logits = LOGITS.repeat(n, 1)
    p = params(top_k=3)
    t = tensors([p] * n, seeds=list(range(n)), positions=[3] * n)
    got, _ = device_sample(logits, t)
    freq = torch.bincount(got, minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor([4 / 7, 2 / 7, 1 / 7, 0, 0]), atol=0.02), freq
    # one sequence over many positions: the same distribution
    t = tensors([p] * n, seeds=[7] * n, positions=list(range(n)))
    freq = torch.bincount(device_sample(logits, t)[0], minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor([4 / 7, 2 / 7, 1 / 7, 0, 0]), atol=0.02), freq


def test_device_sample_depends_on_seed_and_position_only():
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2))
    p = params(seed=7, top_k=50)
    alone = device_sample(logits[1:2], tensors([p], seeds=[7], positions=[11]))[0]
    batched = device_sample(logits, tensors([params(), p, params(top_k=0)], seeds=[1, 7, 3], positions=[4, 11, 9]))[0]
    assert alone.item() == batched[1].item()
    # the candidate path and the full-vocabulary path draw the same token (noise keyed by token id)
    t = tensors([p] * 3, seeds=[7, 8, 9], positions=[1, 2, 3])
    assert torch.equal(device_sample(logits, t, MAX_CANDIDATES)[0], device_sample(logits, t, None)[0])
    draws = {device_sample(logits[1:2], tensors([p], seeds=[7], positions=[q]))[0].item() for q in range(40)}
    assert len(draws) > 5  # a new position, a new draw


def test_exponential_noise_is_exp1():
    q = exponential_noise(torch.tensor([3]), torch.tensor([9]), torch.arange(200000))[0]
    assert (q >= 0).all() and abs(q.mean().item() - 1) < 0.01 and abs(q.var().item() - 1) < 0.03


def test_chunked_candidates_equal_topk_on_a_full_vocabulary():
    from swallow_stream.sampling import _candidates

    v = 201088
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(3))
    logits[1, 640:704] += 50.0  # the whole top 64 in one chunk
    logits[2, torch.arange(0, v, 3142)] += 50.0  # the top 64 each in a different chunk
    logits[3, 5:100] = 9.0  # a tie across chunk borders
    vals, ids = _candidates(logits, MAX_CANDIDATES)
    want_vals, _ = logits.topk(MAX_CANDIDATES, dim=-1)
    assert torch.equal(vals, want_vals)
    assert torch.equal(logits.gather(1, ids), vals)
    assert all(len(set(r)) == MAX_CANDIDATES for r in ids.tolist())


def test_greedy_on_a_full_vocabulary_is_argmax_with_lowest_id_on_ties():
    v = 201088
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(4))
    logits[1, [70000, 9000, 150000]] = 20.0  # argmax returns the first
    logits[2, [3, 4]] = 20.0  # a tie inside one chunk
    for p in (params(temperature=0), params(top_k=1)):
        ids, lp = device_sample(logits, tensors([p] * 3), MAX_CANDIDATES)
        assert torch.equal(ids, logits.argmax(-1)) and ids.tolist()[1:] == [9000, 3]
        assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0])
        ids2, lp2 = device_sample(logits, tensors([p] * 3), MAX_CANDIDATES, logprobs=False)
        assert torch.equal(ids2, ids) and not lp2.any()


def test_candidate_path_samples_like_the_full_vocabulary_on_a_full_vocabulary():
    logits = torch.randn(6, 201088, generator=torch.Generator().manual_seed(5)) * 4
    p = params(top_k=20, top_p=0.95, temperature=0.6)
    t = tensors([p] * 6, seeds=[1, 2, 3, 4, 5, 6], positions=[10, 11, 12, 13, 14, 15])
    assert torch.equal(device_sample(logits, t, MAX_CANDIDATES)[0], device_sample(logits, t, None)[0])
