"""Serve the app from a background thread (notebooks, tests): the same server as `python app.py`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .settings import Settings


class BackgroundServer:
    """uvicorn serving `app` on host:<port> (0: a free port) in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        cfg = dict(log_level="warning", ws_max_size=16 << 20, timeout_graceful_shutdown=2, lifespan="on")
        cfg.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, **cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(backend: "Backend | None" = None, settings: Settings | None = None, *, host: str = "127.0.0.1",
                        port: int = 0, ui: bool = True) -> BackgroundServer:
    """Start the server for `backend` (default: the current default backend) and return it running.

        srv = serve_in_background()
        for tok in ws_stream(srv.ws, "こんにちは"): ...
        srv.stop()
    """
    from ..api import default_backend, load
    from .app import build_app

    backend = backend or default_backend() or load()
    settings = settings or Settings(host=host, port=port)
    return BackgroundServer(build_app(backend, settings, ui=ui), host=host, port=port).start()
