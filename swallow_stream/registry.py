"""Loaded backends by name, and the default one `stream()` uses.

The registry creates backends and owns their lifecycle; backends know nothing of it. A backend
that was shut down drops out of every lookup. At interpreter exit every backend still open is
shut down (open requests cancelled, engine threads stopped) before torch tears down.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from .backends.base import Backend
from .backends.local import LocalBackend
from .catalog import TINY, auto_model
from .engine import EngineOptions, LLMEngine, StopPolicy
from .engine.planner import preflight
from .errors import InvalidRequestError
from .harmony.tokens import STOP_TOKEN_IDS, TOKEN_END

log = logging.getLogger("swallow_stream")

# The harmony format's stops: a final answer or a tool call ends generation; `<|end|>` only
# closes the analysis message before the final one.
HARMONY_STOPS = StopPolicy(always=STOP_TOKEN_IDS, never=frozenset({TOKEN_END}))


def make_local_backend(model: str, **options: Any) -> LocalBackend:
    opts = EngineOptions.from_kwargs(**options)
    if model == TINY:
        from .checkpoint import materialize_preset, open_checkpoint

        # written and read in the engine thread: all CPU tensor work stays in one thread
        engine = LLMEngine(lambda: open_checkpoint(materialize_preset("tiny")), opts, name=TINY, stops=HARMONY_STOPS)
        return LocalBackend(engine, is_tiny=True)
    plan = preflight(model, opts)  # before any weight is downloaded
    if plan is not None:
        log.info("%s", plan.table())
    return LocalBackend(LLMEngine.from_pretrained(model, opts, name=model, stops=HARMONY_STOPS))


def make_remote_backend(model: str | None, base_url: str | None, api_key: str | None, **options: Any) -> Backend:
    if not base_url:
        raise InvalidRequestError("backend='openai' needs base_url")
    from .backends.remote import RemoteBackend

    return RemoteBackend(base_url, model=model, api_key=api_key, **options)


class Registry:
    """Guarded by a lock: front doors look backends up from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Backend] = {}
        self._default: Backend | None = None
        self._exit_hook = False

    def load(self, model: str | None = None, *, make_default: bool = True, backend: str = "local",
             base_url: str | None = None, api_key: str | None = None, **options: Any) -> Backend:
        if backend == "openai":
            b = make_remote_backend(model, base_url, api_key, **options)
            key = model or b.name
        elif backend == "local":
            key = model or os.environ.get("SWALLOW_MODEL") or auto_model()
            b = make_local_backend(key, **options)
        else:
            raise InvalidRequestError(f"unknown backend {backend!r}: use 'local' or 'openai'")
        with self._lock:
            self._backends[key] = b
            if make_default or self._live_default() is None:
                self._default = b
            if not self._exit_hook:
                atexit.register(self.shutdown_all)
                self._exit_hook = True
        return b

    def _live_default(self) -> Backend | None:
        if self._default is not None and self._default.closed:
            self._default = next((b for b in self._backends.values() if not b.closed), None)
        return self._default

    def default(self) -> Backend | None:
        with self._lock:
            return self._live_default()

    def resolve(self, model: Any) -> Backend:
        """A model name, path, engine or backend -> the backend to run on (loading by name when needed)."""
        if model is None:
            b = self.default()
            return b if b is not None else self.load()
        if isinstance(model, LLMEngine):
            return LocalBackend(model)
        if isinstance(model, Backend):
            return model
        if not isinstance(model, str):
            raise InvalidRequestError(f"model must be a name, a path, an engine or a backend, got {type(model).__name__}")
        with self._lock:
            b = self._backends.get(model)
            if b is not None and b.closed:
                del self._backends[model]
                b = None
        return b if b is not None else self.load(model, make_default=False)

    def shutdown_all(self) -> None:
        with self._lock:
            backends = list(self._backends.values())
            self._backends.clear()
            self._default = None
        for b in backends:
            try:
                b.shutdown()
            except Exception:  # at exit: one broken backend must not keep the others running
                pass
