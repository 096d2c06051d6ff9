"""swallow-stream: streaming inference for GPT-OSS-Swallow (gpt-oss architecture, MXFP4 MoE).

    from swallow_stream import stream
    for tok in stream("Create a casual one-day Tokyo itinerary in Japanese."):
        print(tok, end="", flush=True)
"""

from .api import astream, auto_model, default_backend, load, stream
from .errors import (
    CheckpointError,
    ContextLengthExceededError,
    GenerationError,
    InvalidRequestError,
    OverloadedError,
    SwallowError,
)
from .notebook import Chat
from .stream import AsyncStream, Stream, TokenEvent

__version__ = "0.1.0"

__all__ = [
    "AsyncStream",
    "Chat",
    "CheckpointError",
    "ContextLengthExceededError",
    "GenerationError",
    "InvalidRequestError",
    "OverloadedError",
    "Stream",
    "SwallowError",
    "TokenEvent",
    "astream",
    "auto_model",
    "default_backend",
    "load",
    "stream",
]
