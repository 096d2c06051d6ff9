"""Sampling parameters and the batched sampler (each row its own parameters and seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import GenerationDefaults
from .errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None = up to the context limit
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def build_sampling_params(
    defaults: GenerationDefaults,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | tuple[str, ...] | None = None,
    stop_token_ids: frozenset[int] = frozenset(),
    logprobs: bool = False,
    top_logprobs: int | None = None,
) -> SamplingParams:
    """Unset values come from generation_config; every value is checked with a clear error."""

    def number(name: str, v, lo: float, hi: float, default: float) -> float:
        if v is None:
            return float(default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidRequestError(f"'{name}' must be a number, got {v!r}")
        if not lo <= v <= hi:
            raise InvalidRequestError(f"'{name}' must be in [{lo}, {hi}], got {v}")
        return float(v)

    def integer(name: str, v, lo: int, default: int | None) -> int | None:
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequestError(f"'{name}' must be an integer, got {v!r}")
        if v < lo:
            raise InvalidRequestError(f"'{name}' must be >= {lo}, got {v}")
        return v

    t = number("temperature", temperature, 0.0, 100.0, defaults.temperature)
    p = number("top_p", top_p, 0.0, 1.0, defaults.top_p)
    if p == 0.0:
        raise InvalidRequestError("'top_p' must be > 0")
    mp = number("min_p", min_p, 0.0, 1.0, defaults.min_p)
    k = integer("top_k", top_k, -1, defaults.top_k)
    k = 0 if k == -1 else k  # vLLM / OpenAI-compatible servers use -1 for "off"
    s = integer("seed", seed, 0, None)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise InvalidRequestError(f"'max_tokens' must be an integer, got {max_tokens!r}")
        if max_tokens <= 0:
            raise InvalidRequestError(f"'max_tokens' must be > 0, got {max_tokens}")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequestError(f"'stop' must be a string or a list of strings, got {stop!r}")
    if len(stops) > MAX_STOP_STRINGS or any(x == "" for x in stops):
        raise InvalidRequestError(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings")
    if not isinstance(logprobs, bool):
        raise InvalidRequestError(f"'logprobs' must be a boolean, got {logprobs!r}")
    tl = integer("top_logprobs", top_logprobs, 0, 0)
    if tl > MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'top_logprobs' must be <= {MAX_TOP_LOGPROBS}, got {tl}")
    return SamplingParams(
        temperature=t,
        top_p=p,
        top_k=k,
        min_p=mp,
        seed=s,
        max_tokens=max_tokens,
        stop=stops,
        stop_token_ids=frozenset(stop_token_ids),
        logprobs=logprobs or tl > 0,
        top_logprobs=tl,
    )


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top_k, top_p and min_p, row by row.
    logits [B, V] fp32 -> probs [B, V] fp32 (greedy rows: one-hot at the argmax)."""
    b, v = logits.shape
    dev = logits.device
    max_k = max(p.top_k for p in params)
    if all(0 < p.top_k for p in params) and max_k < v // 4:
        # Every row keeps at most max_k tokens: filter among those candidates, not the vocab.
        top_vals, top_idx = logits.topk(max_k, dim=-1)
        sub = filtered_probs(top_vals, params)
        return torch.zeros_like(logits).scatter_(1, top_idx, sub)
    temp = torch.tensor([max(p.temperature, 1e-6) for p in params], device=dev).unsqueeze(1)
    probs = torch.softmax(logits / temp, dim=-1)

    top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    # conditions decided on the host from the params: no device syncs
    if any(0 < p.top_k < v or p.top_p < 1.0 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(v, device=dev).unsqueeze(0)
        # top-k first; then, on the renormalized top-k, keep a token while the mass strictly
        # before it is < top_p (the first token always stays)
        in_k = rank < top_k.unsqueeze(1)
        sorted_p = sorted_p * in_k
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = in_k & (before < top_p.unsqueeze(1))
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        probs = probs * keep
    if any(p.min_p > 0 for p in params):
        probs = probs * (probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    if any(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        one_hot = torch.zeros_like(probs).scatter(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[B, V] fp32 -> token ids [B] int64.

    Exponential race: argmax(p / q) with q ~ Exp(1) draws from p. Seeded rows draw q from their
    own generator, so a seeded request samples the same tokens whatever else is in the batch.
    """
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    q = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        q[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
    return (probs / q.clamp_(min=1e-30)).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Device-side sampling: per-row parameters in tensors, no host syncs, static shapes (it runs
# inside the decode step's CUDA graph). Same filters as `filtered_probs`; the exponential race
# draws its noise from a counter-based hash of (seed, position, token id), so a row's draw
# depends on nothing else in the batch and needs no generator state.

MAX_CANDIDATES = 64  # the in-graph path: every sampled row has 0 < top_k <= this, or is greedy


def _u64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _u64(0x9E3779B97F4A7C15)
_MIX1 = _u64(0xBF58476D1CE4E5B9)
_MIX2 = _u64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def exponential_noise(seed: torch.Tensor, position: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws [B, N] float64, a pure function of seed [B], position [B] and token ids [B, N]
    (or [N]) int64."""
    key = _mix64(_mix64(seed) ^ position).unsqueeze(-1)
    h = _mix64(key ^ (token * _GOLDEN))
    u = (_shr(h, 11) + 1).double() * 2.0**-53  # (0, 1]
    return -torch.log(u)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device. temperature 0 (or top_k 1) = greedy;
    top_k 0 = off; seed and position key each row's noise (position: the sampled token's)."""

    temperature: torch.Tensor  # [B] fp32
    top_p: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64
    min_p: torch.Tensor  # [B] fp32
    seed: torch.Tensor  # [B] int64
    position: torch.Tensor  # [B] int64

    @staticmethod
    def allocate(n: int, device: torch.device | str) -> "SamplingTensors":
        return SamplingTensors(
            torch.zeros(n, device=device), torch.ones(n, device=device), torch.zeros(n, dtype=torch.int64, device=device),
            torch.zeros(n, device=device), torch.zeros(n, dtype=torch.int64, device=device),
            torch.zeros(n, dtype=torch.int64, device=device),
        )

    def rows(self, n: int) -> "SamplingTensors":
        return SamplingTensors(*(getattr(self, f)[:n] for f in self.__dataclass_fields__))

    def fill(self, params: list[SamplingParams], seeds: list[int], positions: list[int]) -> None:
        """Host -> device, one non-blocking copy a field; rows past len(params) are left as they are."""
        n = len(params)
        vals = {
            "temperature": ([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            "top_p": ([p.top_p for p in params], torch.float32),
            "top_k": ([p.top_k for p in params], torch.int64),
            "min_p": ([p.min_p for p in params], torch.float32),
            "seed": ([_u64(s & (2**64 - 1)) for s in seeds], torch.int64),
            "position": (positions, torch.int64),
        }
        for name, (v, dt) in vals.items():
            getattr(self, name)[:n].copy_(torch.tensor(v, dtype=dt), non_blocking=True)


def candidate_count(params: list[SamplingParams]) -> int | None:
    """MAX_CANDIDATES when the top-k candidate path is exact for every row, else None (full vocab)."""
    if all(p.greedy or 0 < p.top_k <= MAX_CANDIDATES for p in params):
        return MAX_CANDIDATES
    return None


def _filter_sorted(sorted_logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Logits sorted descending [B, N] -> probabilities [B, N] after temperature, top-k, top-p
    and min-p (renormalized), each row by its own tensors."""
    n = sorted_logits.shape[1]
    temp = torch.where(t.temperature > 0, t.temperature, 1.0).unsqueeze(1)
    probs = torch.softmax(sorted_logits / temp, dim=-1)
    rank = torch.arange(n, device=sorted_logits.device).unsqueeze(0)
    k = torch.where((t.top_k > 0) & (t.top_k < n), t.top_k, n).unsqueeze(1)
    in_k = rank < k
    probs = probs * in_k
    probs = probs / probs.sum(-1, keepdim=True)
    before = probs.cumsum(-1) - probs
    keep = in_k & (before < t.top_p.unsqueeze(1))
    probs = probs * keep
    probs = probs * (probs >= t.min_p.unsqueeze(1) * probs[:, :1])
    return probs / probs.sum(-1, keepdim=True)


def device_filtered_probs(logits: torch.Tensor, t: SamplingTensors, num_candidates: int | None = None) -> torch.Tensor:
    """`filtered_probs` from tensors: [B, V] fp32 -> [B, V] (greedy rows one-hot at the argmax)."""
    vals, order = _candidates(logits, num_candidates)
    probs = torch.zeros_like(logits).scatter_(1, order, _filter_sorted(vals, t))
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where((t.temperature > 0).unsqueeze(1), probs, one_hot)


def _candidates(logits: torch.Tensor, num_candidates: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top num_candidates logits, sorted descending, with their token ids (None: all of them).

    Two stages where the vocabulary splits into rows of CHUNK: the max of each chunk (a
    vectorized reduction), the top chunks by their max, then top-k among their elements. Exact:
    a token in the top k sits in a chunk whose max is at least its value, and fewer than k chunks
    have a larger max. On CPU `topk` over 201k logits costs ~10x a max-reduction."""
    if num_candidates is None or num_candidates >= logits.shape[1]:
        return logits.sort(dim=-1, descending=True)
    b, v = logits.shape
    k = num_candidates
    if v % CHUNK or v // CHUNK < 4 * k:
        return logits.topk(k, dim=-1)
    chunks = logits.view(b, v // CHUNK, CHUNK)
    best = chunks.amax(-1).topk(k, dim=-1).indices  # [B, k] chunk ids
    cand = chunks.gather(1, best.unsqueeze(-1).expand(b, k, CHUNK)).view(b, k * CHUNK)
    vals, pos = cand.topk(k, dim=-1)
    ids = best.gather(1, pos // CHUNK) * CHUNK + pos % CHUNK
    return vals, ids


CHUNK = 64  # divides the harmony vocabulary (201,088 = 3,142 x 64)


def _argmax(vals: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """argmax of the full row from its sorted candidates: the lowest token id among those equal to
    the max (what `argmax` returns), without another pass over the vocabulary."""
    top = torch.where(vals == vals[:, :1], order, torch.iinfo(order.dtype).max)
    return top.min(-1).values


def device_sample(
    logits: torch.Tensor, t: SamplingTensors, num_candidates: int | None = None, logprobs: bool = True,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] fp32 -> (token ids [B] int64, their log-probabilities under the raw logits [B] fp32).

    num_candidates=K restricts sampling to the top K logits (exact when every non-greedy row has
    0 < top_k <= K: `candidate_count`); None sorts the vocabulary. No host sync, static shapes.
    logprobs=False skips the log-softmax over the vocabulary (a full pass of exp) and returns
    zeros: for callers that know no row asked for them. greedy=True: the caller knows every row
    is greedy (the filters and the noise are skipped; same ids)."""
    vals, order = _candidates(logits, MAX_CANDIDATES if greedy else num_candidates)
    if greedy:
        ids = _argmax(vals, order)
    else:
        probs = _filter_sorted(vals, t)
        q = exponential_noise(t.seed, t.position, order)
        score = torch.where(probs > 0, probs.double().log() - q.log(), float("-inf"))
        pick = order.gather(1, score.argmax(-1, keepdim=True)).squeeze(1)
        ids = torch.where(t.temperature > 0, pick, _argmax(vals, order))
    if not logprobs:
        return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    logprob = torch.log_softmax(logits, dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)
    return ids, logprob
