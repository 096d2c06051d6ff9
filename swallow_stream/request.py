"""One generation request, validated once: what every front door builds and every backend runs.

`GenerateOptions` is the one list of the keyword options `stream()`, `astream()`, the WebSocket
`params` and the clients accept; `GenerateRequest.create` checks them all and fills unset
sampling values from the serving model's generation_config.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

from .config import GenerationDefaults
from .errors import InvalidRequestError
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


OPTION_NAMES: tuple[str, ...] = tuple(GenerateOptions.__annotations__)
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

    @classmethod
    def create(cls, prompt_or_messages: Any, generation: GenerationDefaults, **options: Any) -> "GenerateRequest":
        options = check_options(options)
        system = options.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError(f"'system' must be a string, got {type(system).__name__}")
        rid = options.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise InvalidRequestError(f"'request_id' must be a string, got {type(rid).__name__}")
        effort = options.get("reasoning_effort")
        params = build_sampling_params(generation, **{k: options[k] for k in _SAMPLING_OPTIONS if k in options
                                                      and not (k == "logprobs" and options[k] is None)})
        return cls(
            messages=normalize_messages(prompt_or_messages),
            reasoning_effort=normalize_reasoning_effort("medium" if effort is None else effort),
            system=system or None,
            params=params,
            id=rid or uuid.uuid4().hex,
        )
