"""The server: one ASGI app with the Gradio UI, `/ws`, the OpenAI-compatible API, health and metrics."""

from .app import build_app
from .settings import Settings

__all__ = ["Settings", "build_app"]
