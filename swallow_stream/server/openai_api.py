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
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import SwallowError
from ..stream import AsyncStream, TokenEvent
from .auth import bearer_token, key_matches
from .common import event_batches, model_aliases, open_stream
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.openai")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def _from_swallow(e: SwallowError) -> APIError:
    code = {"not_found": "model_not_found"}.get(e.code, e.code)
    param = "messages" if e.code == "context_length_exceeded" else None
    return APIError(e.status, str(e), code, param)


def _opt(body: dict, key: str, kinds: tuple[type, ...]) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds:
        raise APIError(400, f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}", "invalid_request", key)
    if not isinstance(v, kinds):
        raise APIError(400, f"'{key}' must be {' or '.join(k.__name__ for k in kinds)}, got {v!r}", "invalid_request", key)
    return v


def _stream_kwargs(body: dict) -> dict:
    """OpenAI request fields -> astream() keyword arguments (values checked again by the sampler)."""
    n = body.get("n")
    if n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "invalid_request", "n")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tool calling is not supported by this server", "invalid_request", "tools")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    logprobs = _opt(body, "logprobs", (bool,)) or False
    top_logprobs = _opt(body, "top_logprobs", (int,))
    if top_logprobs and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "invalid_request", "top_logprobs")
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
    )


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


def make_router(backend: Any, settings: Settings, metrics: Metrics) -> APIRouter:
    router = APIRouter(prefix="/v1")
    aliases = model_aliases(backend.name, bool(getattr(backend, "is_tiny", False)), settings.served_model_names)
    tokenizer_box: list[Any] = []

    def tokenizer() -> Any:
        if not tokenizer_box:
            from ..harmony import get_tokenizer

            tokenizer_box.append(get_tokenizer())
        return tokenizer_box[0]

    def check_auth(request: Request) -> None:
        if not key_matches(settings.api_key, bearer_token(request.headers)):
            raise APIError(401, "Missing or incorrect API key: pass it as 'Authorization: Bearer <key>'.",
                           "invalid_api_key")

    def check_model(name: Any) -> None:
        if name is None:
            return
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", "invalid_request", "model")
        if name.lower() not in aliases:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{backend.name}'.",
                           "model_not_found", "model")

    @router.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            check_auth(request)
        except APIError as e:
            metrics.count_error("openai", e.code or "error")
            return error_response(e.status, e.message, e.code, e.param)
        card = {
            "id": backend.name,
            "object": "model",
            "created": int(metrics.started),
            "owned_by": "swallow-stream",
            "max_model_len": getattr(backend, "max_model_len", None),
        }
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        try:
            check_auth(request)
            check_model(model_id)
        except APIError as e:
            return error_response(e.status, e.message, e.code, e.param)
        return JSONResponse({"id": backend.name, "object": "model", "created": int(metrics.started),
                             "owned_by": "swallow-stream"})

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            try:
                body = await request.json()
            except ValueError:
                raise APIError(400, "request body is not valid JSON", "invalid_request")
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object", "invalid_request")
            check_model(body.get("model"))
            if "messages" not in body:
                raise APIError(400, "'messages' is required", "invalid_request", "messages")
            kwargs = _stream_kwargs(body)
            include_reasoning = body.get("include_reasoning", True)
            if not isinstance(include_reasoning, bool):
                raise APIError(400, "'include_reasoning' must be a boolean", "invalid_request", "include_reasoning")
            streaming = body.get("stream", False)
            if not isinstance(streaming, bool):
                raise APIError(400, "'stream' must be a boolean", "invalid_request", "stream")
            opts = body.get("stream_options") or {}
            include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            try:
                s = open_stream(backend, body["messages"], **kwargs)
            except SwallowError as e:
                raise _from_swallow(e)
            except Exception as e:
                log.exception("opening a chat completion failed")
                raise APIError(500, f"internal error: {type(e).__name__}: {e}", "internal")
        except APIError as e:
            metrics.count_error("openai", e.code or "error")
            return error_response(e.status, e.message, e.code, e.param)
        metrics.count_request("openai")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if streaming:
            gen = _sse(s, rid, created, include_reasoning, include_usage, kwargs["logprobs"], tokenizer, metrics)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(s, rid, created, include_reasoning, kwargs["logprobs"], tokenizer, metrics, request)

    return router


async def _complete(s: AsyncStream, rid: str, created: int, include_reasoning: bool, logprobs: bool,
                    tokenizer: Any, metrics: Metrics, request: Request) -> JSONResponse:
    content: list[str] = []
    reasoning: list[str] = []
    lp_events: list[TokenEvent] = []

    async def cancel_on_disconnect() -> None:  # a client that gives up frees the engine at once
        while not s.done:
            if await request.is_disconnected():
                s.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        async for batch in event_batches(s):
            for ev in batch:
                (reasoning if ev.channel == "analysis" else content).append(ev.text)
                if logprobs and ev.channel != "analysis":
                    lp_events.append(ev)
    except SwallowError as e:
        metrics.count_error("openai", e.code)
        err = _from_swallow(e)
        return error_response(err.status, err.message, err.code, err.param)
    except Exception as e:
        log.exception("chat completion failed")
        metrics.count_error("openai", "internal")
        return error_response(500, f"generation failed: {e}", "internal")
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

    try:
        yield _sse_data(chunk({"role": "assistant", "content": ""}))
        async for batch in event_batches(s):
            # one chunk per channel run of what is ready now: a fast engine gets fewer, bigger chunks
            run: list[TokenEvent] = []
            for ev in [*batch, None]:
                if ev is not None and (not run or (run[-1].channel == "analysis") == (ev.channel == "analysis")):
                    run.append(ev)
                    continue
                if run:
                    text = "".join(e.text for e in run)
                    is_reasoning = run[0].channel == "analysis"
                    lp = _logprob_entries(run, tokenizer()) if logprobs and not is_reasoning else None
                    if is_reasoning and include_reasoning and text:
                        yield _sse_data(chunk({"reasoning": text, "reasoning_content": text}))
                    elif not is_reasoning and (text or lp):
                        yield _sse_data(chunk({"content": text}, lp=lp))
                run = [ev] if ev is not None else []
        metrics.count_finish("openai", s.finish_reason or "stop", s.usage)
        last = chunk({}, _finish_reason(s))
        last["usage"] = _usage(s)
        yield _sse_data(last)
        if include_usage:
            yield _sse_data({"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model,
                             "choices": [], "usage": _usage(s)})
    except SwallowError as e:
        metrics.count_error("openai", e.code)
        err = _from_swallow(e)
        yield _sse_data(error_body(err.status, err.message, err.code, err.param))
    except Exception as e:
        log.exception("streaming chat completion failed")
        metrics.count_error("openai", "internal")
        yield _sse_data(error_body(500, f"generation failed: {e}", "internal"))
    finally:
        s.cancel()  # the client went away (or we finished): free the engine's blocks
    yield b"data: [DONE]\n\n"
