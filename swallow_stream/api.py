"""The Python front door: `load`, `stream`, `astream`.

    from swallow_stream import stream
    for tok in stream("Create a casual one-day Tokyo itinerary in Japanese."):
        print(tok, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import fields
from typing import Any, Protocol

from .config import GenerationDefaults
from .engine.llm_engine import EngineOptions, LLMEngine
from .engine.sequence import SequenceOutput
from .errors import InvalidRequestError
from .harmony import HarmonyStreamParser, get_tokenizer, normalize_messages, render_prompt
from .sampling import SamplingParams, build_sampling_params
from .stream import AsyncStream, EventSource, Finished, QueueChannel, Stream, TokenEvent

log = logging.getLogger("swallow_stream")

MODEL_120B = "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4"
MODEL_20B = "tokyotech-llm/GPT-OSS-Swallow-20B-RL-v0.1"
TINY = "tiny"


class Backend(Protocol):
    """What `stream()` runs on: the local engine, or a remote OpenAI-compatible server."""

    name: str
    generation: GenerationDefaults
    max_model_len: int
    is_tiny: bool

    def open_source(
        self,
        messages: list[dict],
        *,
        reasoning_effort: str,
        system: str | None,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        request_id: str | None,
    ) -> EventSource: ...


class LocalSource:
    """Events of one request on the local engine: token ids split into harmony channels."""

    def __init__(
        self,
        engine: LLMEngine,
        prompt_token_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        request_id: str | None,
    ):
        self.model = engine.name
        self.prompt_token_ids = prompt_token_ids
        self._engine = engine
        self._channel = QueueChannel(loop)
        self._parser = HarmonyStreamParser(get_tokenizer())
        self._seq = engine.submit(prompt_token_ids, params, self._channel.put, request_id)

    def _convert(self, outs: list[SequenceOutput]) -> list[TokenEvent | Finished]:
        items: list[TokenEvent | Finished] = []
        for out in outs:
            for i, tid in enumerate(out.token_ids):
                piece = self._parser.feed(tid)
                items.append(
                    TokenEvent(
                        piece.text,
                        piece.channel,
                        tid,
                        piece.special,
                        out.logprobs[i] if out.logprobs else None,
                        out.top_logprobs[i] if out.top_logprobs else None,
                    )
                )
            if out.finish_reason is not None:
                tail = self._parser.flush()
                if tail:
                    items.append(TokenEvent(tail, self._parser.channel, None))
                items.append(Finished(out.finish_reason, out.error, out.num_cached_tokens))
        return items

    def get(self, block: bool = True) -> list[TokenEvent | Finished]:
        if self._engine.inline:
            items = self._channel.get_all(False)
            while block and not items:
                self._engine.pump()
                items = self._channel.get_all(False)
            return self._convert(items)
        return self._convert(self._channel.get_all(block))

    async def aget(self) -> list[TokenEvent | Finished]:
        if self._engine.inline:
            items = self._channel.get_all(False)
            while not items:
                await asyncio.to_thread(self._engine.pump)
                items = self._channel.get_all(False)
            return self._convert(items)
        return self._convert(await self._channel.aget_all())

    def cancel(self) -> None:
        self._engine.cancel(self._seq)


class LocalBackend:
    """The in-process engine as a Backend."""

    def __init__(self, engine: LLMEngine, is_tiny: bool = False):
        self.engine = engine
        self.name = engine.name
        self.generation = engine.generation
        self.max_model_len = engine.max_model_len
        self.is_tiny = is_tiny

    def open_source(self, messages, *, reasoning_effort, system, params, loop, request_id) -> LocalSource:
        ids = render_prompt(messages, reasoning_effort=reasoning_effort, system=system)
        return LocalSource(self.engine, ids, params, loop, request_id)

    def stats(self) -> dict:
        return self.engine.snapshot()

    def shutdown(self) -> None:
        """Stop the engine; `stream()` no longer picks this backend."""
        unregister(self)
        self.engine.shutdown()


class _Registry:
    """Loaded backends by name, and the default one. Guarded by a lock: front doors call from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._backends: dict[str, Backend] = {}
        self._default: Backend | None = None

    def get(self, model: Any) -> Backend:
        if model is None:
            with self._lock:
                if self._default is not None:
                    return self._default
            return load()
        if isinstance(model, LLMEngine):
            return LocalBackend(model)
        if not isinstance(model, str):
            if hasattr(model, "open_source"):
                return model
            raise InvalidRequestError(f"model must be a name, a path, an engine or a backend, got {type(model).__name__}")
        with self._lock:
            b = self._backends.get(model)
        return b if b is not None else load(model, make_default=False)

    def put(self, key: str, backend: Backend, make_default: bool) -> None:
        with self._lock:
            self._backends[key] = backend
            if make_default or self._default is None:
                self._default = backend

    def default(self) -> Backend | None:
        with self._lock:
            return self._default

    def forget(self, backend: Backend) -> None:
        with self._lock:
            self._backends = {k: b for k, b in self._backends.items() if b is not backend}
            if self._default is backend:
                self._default = next(iter(self._backends.values()), None)


_registry = _Registry()


def auto_model() -> str:
    """The model this hardware can serve: 120B MXFP4 on an 80 GB-class GPU, 20B on 16 GB+, else tiny."""
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            if total >= 75 * 2**30:
                return MODEL_120B
            if total >= 15 * 2**30:
                return MODEL_20B
    except Exception:  # no usable CUDA: fall through to tiny
        pass
    return TINY


def load(model: str | None = None, *, make_default: bool = True, backend: str = "local", base_url: str | None = None,
         api_key: str | None = None, **options: Any) -> Backend:
    """Load a model and (by default) make it what `stream()` uses when no model is named.

    model: a Hub repo id, a local checkpoint directory, or "tiny" (a small random-weight model
    built on the fly in the real format: its output is noise). None picks by hardware.
    backend="openai" with base_url fronts a remote OpenAI-compatible server instead.
    options: EngineOptions fields (device, dtype, max_num_seqs, max_model_len, kv_cache_memory, ...).
    """
    if backend == "openai":
        if not base_url:
            raise InvalidRequestError("backend='openai' needs base_url")
        from .backends.remote import RemoteBackend

        b: Backend = RemoteBackend(base_url, model=model, api_key=api_key, **options)
        _registry.put(model or b.name, b, make_default)
        return b
    if backend != "local":
        raise InvalidRequestError(f"unknown backend {backend!r}: use 'local' or 'openai'")
    name = model or os.environ.get("SWALLOW_MODEL") or auto_model()
    known = {f.name for f in fields(EngineOptions)}
    unknown = set(options) - known
    if unknown:
        raise InvalidRequestError(f"unknown engine option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    opts = EngineOptions(**options)
    if name == TINY:
        from .checkpoint import materialize_preset, open_checkpoint

        # written and read in the engine thread: all CPU tensor work stays in one thread
        engine = LLMEngine(lambda: open_checkpoint(materialize_preset("tiny")), opts, name=TINY)
        b = LocalBackend(engine, is_tiny=True)
    else:
        b = LocalBackend(LLMEngine.from_pretrained(name, opts, name=name))
    _registry.put(name, b, make_default)
    return b


def default_backend() -> Backend | None:
    return _registry.default()


def unregister(backend: Backend) -> None:
    """Forget a backend (on shutdown): `stream()` no longer picks it by name or as the default."""
    _registry.forget(backend)


def _prepare(prompt_or_messages, model, params_kw, max_tokens, reasoning_effort, system):
    messages = normalize_messages(prompt_or_messages)
    backend = _registry.get(model)
    params = build_sampling_params(backend.generation, max_tokens=max_tokens, **params_kw)
    return backend, messages, params


def stream(
    prompt_or_messages: str | list[dict],
    *,
    model: Any = None,
    reasoning_effort: str = "medium",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    system: str | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    request_id: str | None = None,
) -> Stream:
    """Generate; iterate the result for token events. Unset sampling values come from the
    model's generation_config; temperature=0 is greedy."""
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, stop=stop,
              logprobs=logprobs, top_logprobs=top_logprobs)
    backend, messages, params = _prepare(prompt_or_messages, model, kw, max_tokens, reasoning_effort, system)
    src = backend.open_source(messages, reasoning_effort=reasoning_effort, system=system, params=params, loop=None,
                              request_id=request_id)
    return Stream(src, params.stop)


def astream(
    prompt_or_messages: str | list[dict],
    *,
    model: Any = None,
    reasoning_effort: str = "medium",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    system: str | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    request_id: str | None = None,
) -> AsyncStream:
    """`stream()` as an async iterator; call it inside a running event loop (Jupyter's works)."""
    loop = asyncio.get_running_loop()
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, stop=stop,
              logprobs=logprobs, top_logprobs=top_logprobs)
    backend, messages, params = _prepare(prompt_or_messages, model, kw, max_tokens, reasoning_effort, system)
    src = backend.open_source(messages, reasoning_effort=reasoning_effort, system=system, params=params, loop=loop,
                              request_id=request_id)
    return AsyncStream(src, params.stop)
