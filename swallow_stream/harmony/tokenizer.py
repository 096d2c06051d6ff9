"""o200k_harmony tokenizer over the verified vocab: ordinary BPE plus the harmony specials."""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path
from typing import Sequence

from ..errors import VocabError
from .tokens import N_ORDINARY, VOCAB_SIZE, special_name
from .vocab import VOCAB_FILENAME, VOCAB_SHA256, sha256, vocab_dir_for_loading

# Copied verbatim from tiktoken_ext/openai_public.py `o200k_base()` (tiktoken 0.14), where it is
# a local of a function that downloads the vocab; tests check the two still agree.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_lock = threading.Lock()
_tokenizer: "Tokenizer | None" = None


class Tokenizer:
    """o200k_harmony over a verified vocab file: ordinary BPE plus the harmony specials.

    Ids outside [0, vocab_size) (a random-weight model's padded lm_head can emit them) are
    treated as special tokens with no text, so nothing here raises on model output.
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_file: str | os.PathLike[str]):
        import tiktoken

        path = Path(vocab_file)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise VocabError(f"cannot read vocab file {path}: {e}") from e
        actual = sha256(data)
        if actual != VOCAB_SHA256:
            raise VocabError(f"{path} has sha256 {actual}, expected {VOCAB_SHA256}")
        # File lines: "<base64 token bytes> <rank>", ranks 0..N_ORDINARY-1 in order.
        pieces: list[bytes] = [b""] * N_ORDINARY
        ranks: dict[bytes, int] = {}
        for line in data.splitlines():
            if line:
                tok, rank = line.split()
                b = base64.b64decode(tok)
                pieces[int(rank)] = b
                ranks[b] = int(rank)
        if len(ranks) != N_ORDINARY:
            raise VocabError(f"{path}: expected {N_ORDINARY} tokens, found {len(ranks)}")
        self.special_tokens: dict[str, int] = {
            special_name(i): i for i in range(N_ORDINARY, VOCAB_SIZE)
        }
        # id -> bytes for every id in the vocab; specials decode to their names (as harmony's
        # `decode` does), ids past the vocab to nothing.
        self._bytes: list[bytes] = pieces + [
            special_name(i).encode() for i in range(N_ORDINARY, VOCAB_SIZE)
        ]
        self._enc = tiktoken.Encoding(
            "o200k_harmony",
            pat_str=O200K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=VOCAB_SIZE,
        )

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids; special-token lookalikes such as "<|end|>" stay plain text."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; specials as their names, invalid UTF-8 as U+FFFD, unknown ids dropped."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        table = self._bytes
        n = len(table)
        return b"".join(table[i] for i in ids if 0 <= i < n)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one ordinary token (may be a partial UTF-8 sequence); a special's name;
        b"" for ids outside the vocab."""
        if 0 <= token_id < VOCAB_SIZE:
            return self._bytes[token_id]
        return b""

    def is_special(self, token_id: int) -> bool:
        return not 0 <= token_id < N_ORDINARY


def get_tokenizer() -> Tokenizer:
    """The process-wide Tokenizer, built from the same verified vocab as `get_encoding()`."""
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            _tokenizer = Tokenizer(vocab_dir_for_loading() / VOCAB_FILENAME)
        return _tokenizer

