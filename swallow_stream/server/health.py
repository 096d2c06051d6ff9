"""`/health` (liveness/readiness JSON) and `/metrics` (Prometheus text exposition format)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..backends.base import Backend
from ..stream import Usage
from .auth import bearer_token, key_matches


class Metrics:
    """Front-door counters (the engine keeps its own; both show in /metrics). Event-loop only."""

    def __init__(self) -> None:
        self.started = time.time()
        self.ws_connections = 0
        self.generations_active = 0
        self.requests: Counter[str] = Counter()  # by front door: ws, openai, ui
        self.finished: Counter[tuple[str, str]] = Counter()  # (door, finish_reason)
        self.errors: Counter[tuple[str, str]] = Counter()  # (door, code)
        self.completion_tokens: Counter[str] = Counter()

    def count_request(self, door: str) -> None:
        self.requests[door] += 1

    def count_finish(self, door: str, reason: str, usage: Usage | None = None) -> None:
        self.finished[(door, reason)] += 1
        if usage is not None:
            self.completion_tokens[door] += usage.completion_tokens

    def count_error(self, door: str, code: str) -> None:
        self.errors[(door, code)] += 1


def backend_stats(backend: Backend) -> dict:
    try:
        return dict(backend.stats())
    except Exception as e:  # a broken backend shows as not ready, never as a 500 here
        # the type only: a message may name an upstream URL or a path
        return {"error": type(e).__name__}


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(backend: Backend, metrics: Metrics) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    model = {"model": backend.name}
    metric("swallow_info", "gauge", "Served model (value is always 1).",
           [({**model, "tiny": str(backend.is_tiny).lower()}, 1)])
    metric("swallow_uptime_seconds", "gauge", "Seconds since the server started.",
           [({}, round(time.time() - metrics.started, 3))])
    metric("swallow_ws_connections", "gauge", "Open WebSocket connections.", [({}, metrics.ws_connections)])
    metric("swallow_ws_generations_active", "gauge", "WebSocket generations running.",
           [({}, metrics.generations_active)])
    metric("swallow_requests_total", "counter", "Generation requests accepted, by front door.",
           [({"door": d}, n) for d, n in sorted(metrics.requests.items())])
    metric("swallow_requests_finished_total", "counter", "Generations finished, by front door and reason.",
           [({"door": d, "reason": r}, n) for (d, r), n in sorted(metrics.finished.items())])
    metric("swallow_errors_total", "counter", "Errors returned, by front door and code.",
           [({"door": d, "code": c}, n) for (d, c), n in sorted(metrics.errors.items())])
    metric("swallow_completion_tokens_total", "counter", "Completion tokens sent, by front door.",
           [({"door": d}, n) for d, n in sorted(metrics.completion_tokens.items())])

    engine = backend_stats(backend)
    gauges = {"running", "waiting", "kv_blocks_used", "kv_blocks_total", "tokens_per_second", "max_model_len"}
    for key, value in sorted(engine.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind = "gauge" if key in gauges or not key.endswith("_total") else "counter"
        metric(f"swallow_engine_{key}", kind, f"Engine {key.replace('_', ' ')}.", [(model, value)])
    return "\n".join(lines) + "\n"


def make_router(backend: Backend, settings: Any, metrics: Metrics) -> APIRouter:
    router = APIRouter()

    def authorized(request: Request) -> bool:
        return key_matches(settings.api_key, bearer_token(request.headers))

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine = backend_stats(backend)
        ready = "error" not in engine
        if not authorized(request):
            # Liveness for anyone (load balancers, Spaces); what runs where only with the key.
            return JSONResponse({"status": "ok" if ready else "degraded", "ready": ready},
                                status_code=200 if ready else 503)
        body = {
            "status": "ok" if ready else "degraded",
            "ready": ready,
            "model": backend.name,
            "backend": backend.kind,
            "is_tiny": backend.is_tiny,
            "model_source": settings.model_source,
            "uptime_s": round(time.time() - metrics.started, 3),
            "engine": engine,
            "ws_connections": metrics.ws_connections,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        if not authorized(request):
            return PlainTextResponse("missing or wrong API key\n", status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(prometheus_text(backend, metrics), media_type="text/plain; version=0.0.4")

    return router
