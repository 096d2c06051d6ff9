"""The Python front door: `load`, `stream`, `astream`.

    from swallow_stream import stream
    for tok in stream("Create a casual one-day Tokyo itinerary in Japanese."):
        print(tok, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from .backends.base import Backend, open_astream, open_stream
from .catalog import MODEL_20B, MODEL_120B, TINY, auto_model
from .registry import Registry
from .request import GenerateOptions, GenerateRequest
from .stream import AsyncStream, Stream

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10 (ZeroGPU)
    from typing_extensions import Unpack

__all__ = ["MODEL_120B", "MODEL_20B", "TINY", "astream", "auto_model", "default_backend", "load", "stream"]

_registry = Registry()


def load(model: str | None = None, *, make_default: bool = True, backend: str = "local", base_url: str | None = None,
         api_key: str | None = None, **options: Any) -> Backend:
    """Load a model and (by default) make it what `stream()` uses when no model is named.

    model: a Hub repo id, a local checkpoint directory, or "tiny" (a small random-weight model
    built on the fly in the real format: its output is noise). None picks by hardware.
    backend="openai" with base_url fronts a remote OpenAI-compatible server instead.
    options: EngineOptions fields (device, dtype, max_num_seqs, max_model_len, kv_cache_memory, ...).
    """
    return _registry.load(model, make_default=make_default, backend=backend, base_url=base_url, api_key=api_key,
                          **options)


def default_backend() -> Backend | None:
    return _registry.default()


def stream(prompt_or_messages: str | list[dict], *, model: Any = None, **options: Unpack[GenerateOptions]) -> Stream:
    """Generate; iterate the result for token events.

    A str is one user message; a list takes OpenAI-style {"role", "content"} messages. Options
    (`GenerateOptions`): reasoning_effort ("medium"), max_tokens, temperature, top_p, top_k,
    min_p, seed, stop, system, logprobs, top_logprobs, request_id. Unset sampling values come
    from the model's generation_config; temperature=0 is greedy."""
    backend = _registry.resolve(model)
    return open_stream(backend, GenerateRequest.create(prompt_or_messages, backend.generation, **options))


def astream(prompt_or_messages: str | list[dict], *, model: Any = None,
            **options: Unpack[GenerateOptions]) -> AsyncStream:
    """`stream()` as an async iterator; call it inside a running event loop (Jupyter's works)."""
    asyncio.get_running_loop()  # fail here, not at the first `async for`
    backend = _registry.resolve(model)
    return open_astream(backend, GenerateRequest.create(prompt_or_messages, backend.generation, **options))
