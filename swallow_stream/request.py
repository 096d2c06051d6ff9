"""One generation request, validated once: what every front door builds and every backend runs.

`GenerateOptions` is the one list of the keyword options `stream()`, `astream()`, the WebSocket
`params` and the clients accept; `GenerateRequest.create` checks them all and fills unset
sampling values from the serving model's generation_config.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

from .config import GenerationDefaults
from .errors import ContextLengthExceededError, InvalidRequestError
from .harmony.render import normalize_messages, normalize_reasoning_effort
from .sampling import SamplingParams, build_sampling_params


class GenerateOptions(TypedDict, total=False):
    reasoning_effort: str  # "low" | "medium" | "high" (default "medium")
    max_tokens: int | None
    temperature: float | None  # 0 = greedy; unset values come from generation_config
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    stop: str | list[str] | None
    system: str | None
    logprobs: bool
    top_logprobs: int | None
    request_id: str | None
    # Prefix-cache tenant (as in vLLM): requests share cached prompt blocks, and so learn from
    # `cached_tokens` or timing what another sent, only within one salt.
    cache_salt: str | None


OPTION_NAMES: tuple[str, ...] = tuple(GenerateOptions.__annotations__)
SEED_LIMIT = 1 << 64  # seeds are 64-bit: a bigger one would fail a whole engine step
# Characters per token a prompt may average before it is refused untokenized: o200k averages
# about 4 characters per token of English (fewer for Japanese), so this refuses only prompts
# that cannot fit, except runs of repeated characters, at a cost linear in their size.
MAX_CHARS_PER_TOKEN = 8
_SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs")


def check_options(options: Any) -> dict[str, Any]:
    """A dict of known options (the values are checked by `GenerateRequest.create`)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidRequestError(f"'params' must be an object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise InvalidRequestError(f"unknown parameter(s) {', '.join(map(str, unknown))}; known: {', '.join(OPTION_NAMES)}")
    return dict(options)


@dataclass(frozen=True)
class GenerateRequest:
    messages: list[dict[str, str]]  # through normalize_messages: roles checked, content a str
    reasoning_effort: str
    system: str | None
    params: SamplingParams
    id: str
    cache_salt: str | None = None  # the tenant's salt (see `tenant_salt`)

    @classmethod
    def create(cls, prompt_or_messages: Any, generation: GenerationDefaults, *, max_model_len: int | None = None,
               tenant: str | None = None, **options: Any) -> "GenerateRequest":
        """max_model_len: refuse, before tokenizing, text too long to fit it (see MAX_CHARS_PER_TOKEN).
        tenant: who is asking (a front door's API key or UI session); with the `cache_salt`
        option it names the prefix-cache partition."""
        options = check_options(options)
        system = options.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError(f"'system' must be a string, got {type(system).__name__}")
        rid = options.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise InvalidRequestError(f"'request_id' must be a string, got {type(rid).__name__}")
        seed = options.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < SEED_LIMIT:
            raise InvalidRequestError(f"'seed' must be in [0, 2**64), got {seed}")
        salt = options.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise InvalidRequestError("'cache_salt' must be a non-empty string")
        messages = normalize_messages(prompt_or_messages)
        for i, m in enumerate(messages):
            if m["role"] == "user" and not m["content"].strip():
                raise InvalidRequestError(f"messages[{i}] (user) has empty content")
        if max_model_len is not None:
            chars = sum(len(m["content"]) + len(m.get("reasoning") or "") for m in messages) + len(system or "")
            if chars > max_model_len * MAX_CHARS_PER_TOKEN:
                raise ContextLengthExceededError(
                    f"the prompt has {chars} characters, more than can fit the maximum context length of "
                    f"{max_model_len} tokens")
        effort = options.get("reasoning_effort")
        params = build_sampling_params(generation, **{k: options[k] for k in _SAMPLING_OPTIONS if k in options
                                                      and not (k == "logprobs" and options[k] is None)})
        return cls(
            messages=messages,
            reasoning_effort=normalize_reasoning_effort("medium" if effort is None else effort),
            system=system or None,
            params=params,
            id=rid or uuid.uuid4().hex,
            cache_salt=tenant_salt(tenant, salt),
        )


def tenant_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The prefix-cache salt for a tenant and an optional request `cache_salt`; None (the one
    shared cache) when neither is given. Hashed, so no key is ever kept with a request."""
    if tenant is None and cache_salt is None:
        return None
    return hashlib.sha256(f"{tenant or ''}\0{cache_salt or ''}".encode()).hexdigest()
