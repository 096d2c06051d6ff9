"""The streaming channel parser: generated token ids -> text deltas on harmony channels."""

from __future__ import annotations

import codecs
import logging
import re
from typing import NamedTuple, Sequence

from .tokenizer import Tokenizer, get_tokenizer
from .tokens import (
    ANSWER_CHANNELS,
    N_ORDINARY,
    TOKEN_CALL,
    TOKEN_CHANNEL,
    TOKEN_CONSTRAIN,
    TOKEN_END,
    TOKEN_MESSAGE,
    TOKEN_RETURN,
    TOKEN_START,
)

log = logging.getLogger(__name__)

_utf8_decode = codecs.utf_8_decode  # (data, errors, final) -> (text, bytes consumed)


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
    next token completes them; bytes that cannot become valid UTF-8 turn into U+FFFD. A character
    left incomplete when its message or the generation ends is dropped.

    `reasoning` / `answer` accumulate the text of analysis / answer (final, preamble) messages;
    `reasoning_tokens` counts pieces on the analysis channel.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, role: str | None = "assistant"):
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._token_bytes = self._tok.bytes_table()  # id -> bytes, for the ordinary-text fast path
        # bytes of an incomplete UTF-8 character, held until the next token completes it (what
        # codecs' incremental decoder keeps, without its call layers: this runs once per token)
        self._held = b""
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self.reasoning_tokens = 0
        self.role: str | None = None
        self.channel: str | None = None
        self.recipient: str | None = None
        self._state = _LOOSE
        self._text_channel: str | None = None  # channel of the bytes in _held
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
        elif channel in ANSWER_CHANNELS and not (channel == "commentary" and self.recipient):
            self._answer.append(text)  # a preamble; commentary to a recipient is a tool call

    def _stream(self, data: bytes, channel: str | None) -> str:
        self._text_channel = channel
        data = self._held + data
        text, used = _utf8_decode(data, "replace", False)
        self._held = data[used:]
        if text:
            self._emit(text, channel)
        return text

    def _flush_text(self) -> str:
        # Bytes still held are the valid start of a character the model never finished (cut by
        # a control token, max_tokens or a stop): dropped, so no text ends in U+FFFD.
        self._held = b""
        return ""

    def _abandon_header(self, final: bool) -> str:
        data = self._tok.decode_bytes(self._header_ids)
        self._state = _LOOSE
        self.role = self.channel = self.recipient = None
        text = self._stream(data, None)
        if final:
            text += self._flush_text()
        return text

    def feed(self, token_id: int) -> TokenPiece:
        state = self._state
        if state != _HEADER and type(token_id) is int and 0 <= token_id < N_ORDINARY:
            # The common case, inlined (`_feed` then `_stream`): ordinary text inside a message
            # (or loose text outside one).
            channel = self.channel if state == _CONTENT else None
            self._text_channel = channel
            data = self._held + self._token_bytes[token_id]
            text, used = _utf8_decode(data, "replace", False)
            self._held = data[used:]
            if channel == "analysis":
                self.reasoning_tokens += 1
                if text:
                    self._reasoning.append(text)
            elif text:
                self._emit(text, channel)
            return TokenPiece(token_id, text, channel, False)
        try:
            return self._feed(int(token_id))
        except Exception:  # defensive: a stream must never die on model output
            log.warning("harmony parser reset after token %r", token_id, exc_info=True)
            self._held = b""
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
        """Call once generation ends: drops an incomplete UTF-8 tail (returns the text released, "").

        An unfinished header (generation cut inside one) is dropped, not released."""
        try:
            return self._flush_text()
        except Exception:
            log.warning("harmony parser flush failed", exc_info=True)
            self._held = b""
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
