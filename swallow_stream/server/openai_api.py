"""OpenAI-compatible `/v1/chat/completions` and `/v1/models` (vLLM's `reasoning` field).

Model names: a request may name the served model by its full name, its last path component, any
--served-model-name alias, or (only while the tiny stand-in serves) the Swallow names of the
model card. Names are compared case-insensitively; a missing `model` means the served one;
anything else is 404 `model_not_found`. Responses always report the served name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..backends.base import Backend
from ..errors import UnavailableError, wire
from ..harmony.tokens import TOKEN_CALL, TOKEN_CHANNEL, TOKEN_END, TOKEN_MESSAGE, TOKEN_RETURN, TOKEN_START
from ..stream import AsyncStream, TokenEvent, channel_runs
from .auth import bearer_token, key_matches
from .doors import error_fields, key_tenant, model_aliases, open_request
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.openai")


class APIError(Exception):
    """An error in OpenAI's shape: the status, type and code follow from a wire code (errors.WIRE)."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int | None = None):
        super().__init__(message)
        w = wire(code)
        self.status = status or w.status
        self.message, self.param = message, param
        self.type, self.code = w.openai_type, w.openai_code

    @classmethod
    def of(cls, exc: BaseException) -> "APIError":
        code, status, message = error_fields(exc)
        return cls(code, message, "messages" if code == "context_length_exceeded" else None, status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _opt(body: dict, key: str, kinds: tuple[type, ...]) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds:
        raise APIError("invalid_request", f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}", key)
    if not isinstance(v, kinds):
        raise APIError("invalid_request", f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}, got {v!r}", key)
    return v


def _stream_kwargs(body: dict) -> dict:
    """OpenAI request fields -> astream() keyword arguments (values checked again by the sampler)."""
    n = body.get("n")
    if n not in (None, 1):
        raise APIError("invalid_request", "only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise APIError("invalid_request", "tool calling is not supported by this server", "tools")
    _check_unsupported(body)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    logprobs = _opt(body, "logprobs", (bool,)) or False
    top_logprobs = _opt(body, "top_logprobs", (int,))
    if top_logprobs and not logprobs:
        raise APIError("invalid_request", "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):  # Responses-style {"reasoning": {"effort"}}
        effort = body["reasoning"].get("effort")
    return dict(
        max_tokens=max_tokens,
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        top_k=body.get("top_k"),
        min_p=body.get("min_p"),
        seed=body.get("seed"),
        stop=body.get("stop"),
        reasoning_effort=effort if effort is not None else "medium",
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        cache_salt=body.get("cache_salt"),
    )


# Fields accepted only at their no-op values: anything else would be silently ignored, so it is
# refused (400) instead of returning something the client did not ask for.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "logit_bias": lambda v: not v,
    "parallel_tool_calls": lambda v: v in (None, False, True),
}


def _check_unsupported(body: dict) -> None:
    for key, noop in _UNSUPPORTED.items():
        if key in body and not noop(body[key]):
            raise APIError("invalid_request", f"'{key}' is not supported by this server (got {body[key]!r})", key)


class ContentTokens:
    """Which generated tokens belong to a message's content (the only ones `logprobs.content`
    lists): generation starts inside the assistant header, `<|message|>` opens the content,
    `<|start|>` / `<|channel|>` open a header (role, channel name) again."""

    def __init__(self) -> None:
        self.in_header = True

    def __call__(self, ev: TokenEvent) -> bool:
        if ev.special:
            if ev.token_id == TOKEN_MESSAGE:
                self.in_header = False
            elif ev.token_id in (TOKEN_START, TOKEN_CHANNEL):
                self.in_header = True
            elif ev.token_id in (TOKEN_END, TOKEN_RETURN, TOKEN_CALL):
                self.in_header = False
            return False
        return not self.in_header and ev.token_id is not None


def _logprob_entries(events: list[TokenEvent], tokenizer: Any) -> list[dict]:
    out = []
    for ev in events:
        if ev.logprob is None or ev.token_id is None:
            continue
        tok = _token_text(tokenizer, ev.token_id)
        entry = {"token": tok, "logprob": ev.logprob, "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
        for tid, lp in ev.top_logprobs or []:
            t = _token_text(tokenizer, tid)
            entry["top_logprobs"].append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))})
        out.append(entry)
    return out


def _token_text(tokenizer: Any, tid: int) -> str:
    try:
        return tokenizer.token_bytes(tid).decode("utf-8", "replace")
    except Exception:
        return ""


def _usage(s: AsyncStream) -> dict:
    u = s.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _finish_reason(s: AsyncStream) -> str:
    return {"length": "length"}.get(s.finish_reason or "stop", "stop")


def make_router(backend: Backend, settings: Settings, metrics: Metrics) -> APIRouter:
    router = APIRouter(prefix="/v1")
    aliases = model_aliases(backend.name, backend.is_tiny, settings.served_model_names)
    tenant = key_tenant(settings.api_key)
    tokenizer_box: list[Any] = []

    def tokenizer() -> Any:
        if not tokenizer_box:
            from ..harmony import get_tokenizer

            tokenizer_box.append(get_tokenizer())
        return tokenizer_box[0]

    def check_auth(request: Request) -> None:
        if not key_matches(settings.api_key, bearer_token(request.headers)):
            raise APIError("unauthorized", "Missing or incorrect API key: pass it as 'Authorization: Bearer <key>'.")

    def check_model(name: Any) -> None:
        if name is None:
            return
        if not isinstance(name, str):
            raise APIError("invalid_request", "'model' must be a string", "model")
        if name.lower() not in aliases:
            raise APIError("not_found", f"The model '{name}' does not exist; this server serves '{backend.name}'.",
                           "model")

    @router.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            check_auth(request)
        except APIError as e:
            metrics.count_error("openai", e.code or "error")
            return e.response()
        card = {
            "id": backend.name,
            "object": "model",
            "created": int(metrics.started),
            "owned_by": "swallow-stream",
            "max_model_len": backend.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        try:
            check_auth(request)
            check_model(model_id)
        except APIError as e:
            return e.response()
        return JSONResponse({"id": backend.name, "object": "model", "created": int(metrics.started),
                             "owned_by": "swallow-stream"})

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            refused = settings.generation_refused()
            if refused:
                raise APIError.of(UnavailableError(refused))
            raw = await _read_body(request, settings.http_max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                raise APIError("invalid_request", "request body is not valid JSON")
            if not isinstance(body, dict):
                raise APIError("invalid_request", "request body must be a JSON object")
            check_model(body.get("model"))
            if "messages" not in body:
                raise APIError("invalid_request", "'messages' is required", "messages")
            kwargs = _stream_kwargs(body)
            include_reasoning = body.get("include_reasoning", True)
            if not isinstance(include_reasoning, bool):
                raise APIError("invalid_request", "'include_reasoning' must be a boolean", "include_reasoning")
            streaming = body.get("stream", False)
            if not isinstance(streaming, bool):
                raise APIError("invalid_request", "'stream' must be a boolean", "stream")
            opts = body.get("stream_options") or {}
            include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            try:
                s = await open_request(backend, body["messages"], kwargs, tenant=tenant)
            except Exception as e:
                raise APIError.of(e)
        except APIError as e:
            metrics.count_error("openai", e.code or "error")
            return e.response()
        metrics.count_request("openai")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if streaming:
            gen = _sse(s, rid, created, include_reasoning, include_usage, kwargs["logprobs"], tokenizer, metrics)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(s, rid, created, include_reasoning, kwargs["logprobs"], tokenizer, metrics, request)

    return router


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes before more of it is read or parsed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError("invalid_request", f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError("invalid_request", f"request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _complete(s: AsyncStream, rid: str, created: int, include_reasoning: bool, logprobs: bool,
                    tokenizer: Any, metrics: Metrics, request: Request) -> JSONResponse:
    content: list[str] = []
    reasoning: list[str] = []
    lp_events: list[TokenEvent] = []
    is_content = ContentTokens()

    async def cancel_on_disconnect() -> None:  # a client that gives up frees the engine at once
        while not s.done:
            if await request.is_disconnected():
                s.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        async for batch in s.batches():
            for ev in batch:
                (reasoning if ev.channel == "analysis" else content).append(ev.text)
                if is_content(ev) and logprobs and ev.channel != "analysis":
                    lp_events.append(ev)
    except Exception as e:
        err = APIError.of(e)
        metrics.count_error("openai", err.code)
        return err.response()
    finally:
        watcher.cancel()
        s.cancel()
    metrics.count_finish("openai", s.finish_reason or "stop", s.usage)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if include_reasoning:
        text = "".join(reasoning)
        message["reasoning"] = text
        message["reasoning_content"] = text
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _finish_reason(s), "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": _logprob_entries(lp_events, tokenizer())}
    return JSONResponse({
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": s.model,
        "choices": [choice],
        "usage": _usage(s),
    })


def _sse_data(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


async def _sse(s: AsyncStream, rid: str, created: int, include_reasoning: bool, include_usage: bool,
               logprobs: bool, tokenizer: Any, metrics: Metrics) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish: str | None = None, lp: list | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if lp is not None:
            choice["logprobs"] = {"content": lp}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model,
                "choices": [choice]}

    is_content = ContentTokens()
    try:
        yield _sse_data(chunk({"role": "assistant", "content": ""}))
        async for batch in s.batches():
            # one chunk per run of what is ready now: a fast engine gets fewer, bigger chunks
            for is_reasoning, run in channel_runs(batch, key=TokenEvent.is_reasoning.fget):
                text = "".join(e.text for e in run)
                content_run = [e for e in run if is_content(e)]
                lp = _logprob_entries(content_run, tokenizer()) if logprobs and not is_reasoning else None
                if is_reasoning and include_reasoning and text:
                    yield _sse_data(chunk({"reasoning": text, "reasoning_content": text}))
                elif not is_reasoning and (text or lp):
                    yield _sse_data(chunk({"content": text}, lp=lp))
        metrics.count_finish("openai", s.finish_reason or "stop", s.usage)
        last = chunk({}, _finish_reason(s))
        last["usage"] = _usage(s)
        yield _sse_data(last)
        if include_usage:
            yield _sse_data({"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model,
                             "choices": [], "usage": _usage(s)})
    except Exception as e:
        err = APIError.of(e)
        metrics.count_error("openai", err.code)
        yield _sse_data(err.body())
    finally:
        s.cancel()  # the client went away (or we finished): free the engine's blocks
    yield b"data: [DONE]\n\n"
