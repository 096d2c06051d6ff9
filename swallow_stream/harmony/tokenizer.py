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

# Text longer than this is encoded in chunks cut where a pretoken boundary is certain, so one
# hostile input (a megabyte with no line break) costs no more than its chunks, and the ids are
# the same as unsplit encoding for any text with line breaks or spaces between words.
CHUNK_CHARS = 4096
# A run this long with no safe boundary (no "\n" or " " between words) is hard-cut: its ids may
# then differ from unsplit encoding at the cut, which only such runs (never prose or code) meet.
MAX_RUN_CHARS = 4 * CHUNK_CHARS

_lock = threading.Lock()


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi] where every o200k pretoken ends before i and another starts at i:
    after a line break followed by neither whitespace nor '/' (the punctuation pretoken absorbs
    trailing "\n" and "/"), or at a single space between two non-space characters (it starts
    the next word's pretoken). -1 when there is none."""
    i = text.rfind("\n", lo, hi - 1)
    while i >= lo:
        nxt = text[i + 1]
        if not nxt.isspace() and nxt != "/":
            return i + 1
        i = text.rfind("\n", lo, i)
    i = text.rfind(" ", lo + 1, hi)
    while i > lo:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    return -1


def split_for_encoding(text: str, chunk: int = CHUNK_CHARS, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """text cut into pieces of at most ~chunk characters (max_run for a run without a boundary)
    whose encodings, concatenated, equal the encoding of the whole (see `_safe_cut`)."""
    if len(text) <= chunk:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > chunk:
        cut = _safe_cut(text, start, start + chunk)
        if cut <= start:
            cut = _safe_cut(text, start, start + max_run)
        if cut <= start:
            cut = start + max_run
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
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
        """Ordinary text -> ids; special-token lookalikes such as "<|end|>" stay plain text.
        Linear in len(text) (see `split_for_encoding`)."""
        if len(text) <= CHUNK_CHARS:
            return self._enc.encode_ordinary(text)
        return [t for piece in split_for_encoding(text) for t in self._enc.encode_ordinary(piece)]

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

    def bytes_table(self) -> list[bytes]:
        """id -> raw bytes for every id in [0, VOCAB_SIZE) (as `token_bytes`); not to be modified."""
        return self._bytes

    def is_special(self, token_id: int) -> bool:
        return not 0 <= token_id < N_ORDINARY


def get_tokenizer() -> Tokenizer:
    """The process-wide Tokenizer, built from the same verified vocab as `get_encoding()`."""
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            _tokenizer = Tokenizer(vocab_dir_for_loading() / VOCAB_FILENAME)
        return _tokenizer

