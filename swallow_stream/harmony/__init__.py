"""Harmony chat format: token ids, the offline vocab, the tokenizer, prompt rendering and the
streaming channel parser, one module each."""

from .parser import MAX_HEADER_TOKENS, HarmonyStreamParser, TokenPiece, parse_completion
from .render import (
    REASONING_EFFORTS,
    ROLES,
    normalize_messages,
    normalize_reasoning_effort,
    render_messages,
    render_prompt,
)
from .tokenizer import O200K_PAT_STR, Tokenizer, get_tokenizer
from .tokens import (
    N_ORDINARY,
    STOP_TOKEN_IDS,
    TOKEN_CALL,
    TOKEN_CHANNEL,
    TOKEN_CONSTRAIN,
    TOKEN_END,
    TOKEN_ENDOFTEXT,
    TOKEN_MESSAGE,
    TOKEN_RETURN,
    TOKEN_START,
    TOKEN_STARTOFTEXT,
    VOCAB_SIZE,
)
from .vocab import ENV_TIKTOKEN_BASE, ENV_VOCAB, VOCAB_FILENAME, VOCAB_SHA256, ensure_vocab, get_encoding
from ..errors import VocabError
from ..paths import ENV_CACHE, cache_dir

__all__ = [
    "ENV_CACHE", "ENV_TIKTOKEN_BASE", "ENV_VOCAB", "MAX_HEADER_TOKENS", "N_ORDINARY", "O200K_PAT_STR",
    "REASONING_EFFORTS", "ROLES", "STOP_TOKEN_IDS", "TOKEN_CALL", "TOKEN_CHANNEL", "TOKEN_CONSTRAIN", "TOKEN_END",
    "TOKEN_ENDOFTEXT", "TOKEN_MESSAGE", "TOKEN_RETURN", "TOKEN_START", "TOKEN_STARTOFTEXT", "VOCAB_FILENAME",
    "VOCAB_SHA256", "VOCAB_SIZE", "HarmonyStreamParser", "TokenPiece", "Tokenizer", "VocabError", "cache_dir",
    "ensure_vocab", "get_encoding", "get_tokenizer", "normalize_messages", "normalize_reasoning_effort",
    "parse_completion", "render_messages", "render_prompt",
]
