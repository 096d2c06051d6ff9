"""`build_app(backend, settings)`: one FastAPI app, one port: the Gradio UI at `/`, `/ws`,
`/v1/chat/completions`, `/v1/models`, `/health` and `/metrics`."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from ..backends.base import Backend
from . import health, openai_api
from .auth import GradioGuard, gradio_login_check, install_log_redaction
from .health import Metrics
from .settings import Settings
from .websocket import make_websocket_endpoint

log = logging.getLogger("swallow_stream.server")


def build_app(backend: Backend, settings: Settings | None = None, *, ui: bool = True) -> FastAPI:
    """The server's ASGI app around a loaded backend (api.load(...) or any Backend object).

    The routes are registered before Gradio is mounted at `/`, so they take precedence."""
    settings = settings or Settings()
    install_log_redaction()
    metrics = Metrics()
    app = FastAPI(title="swallow-stream", docs_url="/api-docs", redoc_url=None, openapi_url="/api-docs/openapi.json")
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(health.make_router(backend, settings, metrics))
    app.include_router(openai_api.make_router(backend, settings, metrics))
    app.add_api_websocket_route("/ws", make_websocket_endpoint(backend, settings, metrics))
    if ui:
        import gradio as gr

        from .ui import CSS, build_ui

        demo = build_ui(backend, settings, metrics)
        app.state.demo = demo
        auth = {}
        if settings.api_key:
            auth = dict(auth=gradio_login_check(settings.api_key),
                        auth_message="This server needs its API key: any user name, the key as the password.")
        app = gr.mount_gradio_app(app, demo, path="/", ssr_mode=False, css=CSS, footer_links=["api"],
                                  server_name=settings.host, server_port=settings.port, max_file_size=1, **auth)
        gradio_app = app.routes[-1].app  # the Mount just added at "/"
        app.add_middleware(GradioGuard, api_key=settings.api_key, gradio_tokens=lambda: gradio_app.tokens,
                           max_body_bytes=settings.http_max_body_bytes)
    return app
