"""Server settings: what `build_app` needs besides the backend (flags and env vars map onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    # when set, every way to generate requires it: /ws and /v1/* (Bearer header; /ws also
    # ?api_key=), the UI and its Gradio API (a login that takes the key as its password)
    api_key: str | None = None
    # Extra names /v1/chat/completions accepts for the served model (besides its own name).
    served_model_names: tuple[str, ...] = ()
    model_source: str = "flag"  # "flag" (named by --model / SWALLOW_MODEL), "auto" (picked by hardware), "remote"
    # WebSocket limits
    ws_max_frame_bytes: int = 1 << 20  # a bigger client frame gets an error frame (connection stays)
    ws_max_generations: int = 8  # concurrent generations per connection
    # Origins (scheme://host[:port]) besides this server's own and loopback pages whose web
    # pages may open /ws; "*" allows any.
    ws_allowed_origins: tuple[str, ...] = ()
    # /v1 and Gradio API request bodies: a bigger one is refused (413) unread. Room for the longest prompt the
    # context admits (8 characters a token, up to 6 bytes each as JSON escapes) at 32k tokens.
    http_max_body_bytes: int = 8 << 20
    # Gradio: how many chats run at once (Gradio's own default of 1 would serialize users);
    # None: as many as the backend generates at once
    ui_concurrency: int | None = None
    ui_update_interval: float = 0.05  # seconds between UI updates while streaming (coalescing)
    ui_default_max_tokens: int = 4096  # capped at half the context, so a chat always has room
    # Chats waiting in the UI's queue beyond those running; more are refused at once (None: the
    # engine's own queue limit)
    ui_max_queue: int | None = None
    # Wraps the chat handler where the GPU exists only inside decorated calls (ZeroGPU's spaces.GPU).
    # The engine then steps only inside the UI's calls, so /ws and /v1 cannot generate.
    gpu_decorator: Any = None
    title: str = "GPT-OSS-Swallow"

    def generation_refused(self) -> str | None:
        """Why /ws and /v1 cannot generate on this server, or None when they can."""
        if self.gpu_decorator is None:
            return None
        return ("this server runs on ZeroGPU, where the GPU exists only inside the chat UI's calls: "
                "use the UI, or serve from a dedicated GPU for /ws and /v1")
    extra: dict = field(default_factory=dict)
