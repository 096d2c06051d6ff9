"""A remote OpenAI-compatible server (vLLM, SGLang, a hosted endpoint) as a Backend.

Each request posts a streaming chat completion from a worker thread (httpx) and turns its chunks
into TokenEvents: `delta.reasoning` / `delta.reasoning_content` on channel "analysis",
`delta.content` on "final" (token ids are not known remotely: None). Cancelling closes the HTTP
stream, which makes vLLM abort the request.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..config import SWALLOW_GENERATION_DEFAULTS, GenerationDefaults
from ..errors import InvalidRequestError, SwallowError, UpstreamError, error_for_status
from ..request import GenerateRequest
from ..stream import ChannelSource, Finished, QueueChannel, TokenEvent

log = logging.getLogger("swallow_stream.remote")

# Requests the remote runs at once, as far as our front doors size their own limits by it.
REMOTE_MAX_NUM_SEQS = 64


def normalize_base_url(url: str) -> str:
    """'http://h:8000' -> 'http://h:8000/v1'; URLs with a path (…/v1, …/openai/v1) are kept."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(f"base_url must be an http(s) URL, got {url!r}")
    return url + "/v1" if parts.path in ("", "/") else url


def _error_for(status: int, body: str) -> SwallowError:
    message = body
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            message = err.get("message") or message
        elif isinstance(err, str):
            message = err
    except ValueError:
        pass
    return error_for_status(status, f"remote server: {str(message)[:500]}")


class RemoteSource(ChannelSource):
    """One streaming chat completion on the remote server, read by a worker thread. The remote
    renders the prompt itself, so prompt_token_ids stays empty."""

    def __init__(self, backend: "RemoteBackend", body: dict, channel: QueueChannel, request_id: str | None = None):
        super().__init__(channel, backend.name)
        self._backend = backend
        self._body = body
        self._request_id = request_id
        self._cancelled = threading.Event()
        self._finished = False
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, name="swallow-remote", daemon=True)
        backend._count(+1)
        self._thread.start()

    def _finish(self, item: Finished) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._backend._count(-1)
        self.channel.put(item)

    def _run(self) -> None:
        b = self._backend
        reason: str | None = None
        usage: dict | None = None
        n_reasoning = n_content = 0
        try:
            headers = b._headers()
            if self._request_id:
                headers["X-Request-Id"] = self._request_id
            with b._client.stream("POST", f"{b.base_url}/chat/completions", json=self._body,
                                  headers=headers) as r:
                with self._lock:
                    self._response = r
                if self._cancelled.is_set():
                    return
                if r.status_code != 200:
                    r.read()
                    self._finish(Finished("error", _error_for(r.status_code, r.text)))
                    return
                for line in r.iter_lines():
                    if self._cancelled.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        log.warning("remote sent a malformed chunk: %.200s", data)
                        continue
                    if isinstance(chunk.get("error"), (dict, str)):
                        err = chunk["error"]
                        msg = err.get("message", str(err)) if isinstance(err, dict) else err
                        self._finish(Finished("error", UpstreamError(f"remote server: {msg}")))
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    events = []
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        thought = delta.get("reasoning")
                        if thought is None:
                            thought = delta.get("reasoning_content")
                        if thought:
                            events.append(TokenEvent(thought, "analysis", None))
                            n_reasoning += 1
                        if delta.get("content"):
                            events.append(TokenEvent(delta["content"], "final", None))
                            n_content += 1
                        if choice.get("finish_reason"):
                            reason = choice["finish_reason"]
                    for ev in events:
                        self.channel.put(ev)
        except Exception as e:
            if self._cancelled.is_set():
                return
            log.warning("remote request failed: %r", e)
            self._finish(Finished("error", UpstreamError(f"remote server {b.base_url} failed: {e}")))
            return
        finally:
            if self._cancelled.is_set():
                self._finish(Finished("cancelled"))
        if self._cancelled.is_set():
            return
        details = (usage or {}).get("completion_tokens_details") or {}
        self._finish(Finished(
            reason if reason in ("stop", "length") else ("stop" if reason is None else reason),
            completion_tokens=(usage or {}).get("completion_tokens", n_reasoning + n_content),
            prompt_tokens=(usage or {}).get("prompt_tokens"),
            reasoning_tokens=details.get("reasoning_tokens", n_reasoning),
        ))

    def cancel(self) -> None:
        """Close the HTTP stream (the remote aborts the request) and end this source."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._lock:
            r = self._response
        if r is not None:
            try:
                r.close()
            except Exception:
                pass
        self._finish(Finished("cancelled"))


class RemoteBackend:
    """A remote OpenAI-compatible chat completions endpoint as a Backend."""

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        generation: GenerationDefaults | None = None,
        max_model_len: int | None = None,
        connect_timeout: float = 10.0,
        **ignored: Any,
    ):
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.generation = generation or SWALLOW_GENERATION_DEFAULTS
        self.is_tiny = False
        self.max_num_seqs = REMOTE_MAX_NUM_SEQS
        self.max_queued_requests = REMOTE_MAX_NUM_SEQS
        self._closed = False
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )
        self._counter_lock = threading.Lock()
        self._active = 0
        self._finished_total = 0
        card: dict = {}
        if model is None or max_model_len is None:
            card = self._model_card(model)
        self.name = model or card.get("id") or ""
        self.max_model_len = int(max_model_len or card.get("max_model_len") or 131072)
        if ignored:
            log.debug("remote backend ignores engine options %s", sorted(ignored))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _model_card(self, model: str | None) -> dict:
        try:
            r = self._client.get(f"{self.base_url}/models", headers=self._headers(), timeout=30.0)
        except httpx.HTTPError as e:
            if model is not None:
                return {}
            raise UpstreamError(f"cannot reach {self.base_url}/models: {e}") from e
        if r.status_code != 200:
            if model is not None:
                return {}
            raise _error_for(r.status_code, r.text)
        data = (r.json() or {}).get("data") or []
        if model is not None:
            return next((m for m in data if isinstance(m, dict) and m.get("id") == model), {})
        if not data or not isinstance(data[0], dict) or not data[0].get("id"):
            raise UpstreamError(f"{self.base_url}/models lists no model; pass model=...")
        return data[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def request_body(self, request: GenerateRequest) -> dict:
        params = request.params
        msgs: list[dict] = [{"role": "system", "content": request.system}] if request.system else []
        for m in request.messages:
            # Earlier reasoning stays out of the prompt (the remote's chat template drops it anyway).
            msgs.append({"role": m["role"], "content": m["content"]})
        body: dict[str, Any] = {
            "model": self.name,
            "messages": msgs,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
            "reasoning_effort": request.reasoning_effort,
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if request.cache_salt is not None:
            # vLLM's prefix-cache salt: the tenant's (API key, UI session) and the request's own,
            # hashed together, so tenants stay apart in the upstream's cache as in ours
            body["cache_salt"] = request.cache_salt
        return body

    def open(self, request: GenerateRequest, channel: QueueChannel) -> RemoteSource:
        if self._closed:
            raise SwallowError(f"the backend for {self.base_url} is shut down")
        return RemoteSource(self, self.request_body(request), channel, request.id)

    def _count(self, delta: int) -> None:
        with self._counter_lock:
            self._active += delta
            if delta < 0:
                self._finished_total += 1

    def stats(self) -> dict:
        return {
            "model": self.name,
            "running": self._active,
            "requests_finished_total": self._finished_total,
            "max_model_len": self.max_model_len,
        }

    def describe(self) -> dict:
        return {"backend": self.kind, "model": self.name, "is_tiny": False, "base_url": self.base_url,
                "max_model_len": self.max_model_len}

    def shutdown(self) -> None:
        self._closed = True
        self._client.close()
