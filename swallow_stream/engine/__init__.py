"""The engine: a pure-Python scheduler and block manager, a model runner that owns the tensors,
and the loop (its own thread) that joins them."""

from .config import DEFAULT_MAX_NUM_SEQS, EngineConfig, EngineOptions, StopPolicy
from .llm_engine import LLMEngine
from .sequence import Sequence, SequenceOutput

__all__ = ["DEFAULT_MAX_NUM_SEQS", "EngineConfig", "EngineOptions", "LLMEngine", "Sequence", "SequenceOutput",
           "StopPolicy"]
