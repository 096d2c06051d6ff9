"""The API key: checks for /v1/* and /health details (Authorization: Bearer), /ws (the header, or
?api_key= for browsers), the UI (Gradio's login plus a guard on all of its API), and keeping the
key out of the logs."""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any, Callable, Mapping


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def key_matches(expected: str | None, given: str | None) -> bool:
    """True when no key is configured, or `given` equals it (constant-time comparison)."""
    if not expected:
        return True
    if not given:
        return False
    return secrets.compare_digest(expected.encode(), given.encode())


def request_authorized(expected: str | None, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> bool:
    if not expected:
        return True
    if key_matches(expected, bearer_token(headers)):
        return True
    return query is not None and key_matches(expected, query.get("api_key"))


# -- the UI: Gradio's routes behind the same key ---------------------------------------------------

GRADIO_API = "/gradio_api/"
# The chat takes no files: Gradio's upload routes are closed whatever the key.
_CLOSED_PREFIXES = ("/gradio_api/upload", "/gradio_api/process_recording")


def gradio_login_check(api_key: str) -> Callable[[str, str], bool]:
    """Gradio's `auth=`: its login page takes any user name and the API key as the password."""
    def check(username: str, password: str) -> bool:
        return key_matches(api_key, password)

    return check


class GradioGuard:
    """ASGI middleware in front of the mounted Gradio app. Gradio's `auth` guards most of its
    routes, not all (`/gradio_api/stream/...`, `/cancel`, `/heartbeat/...` skip its check): with a
    key set, every `/gradio_api/*` request needs a session that logged in with the key (Gradio's
    cookie) or the key as a Bearer token. Uploads are refused outright."""

    def __init__(self, app: Any, api_key: str | None, gradio_tokens: Callable[[], Mapping[str, Any]],
                 max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.gradio_tokens = gradio_tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path.startswith(_CLOSED_PREFIXES):
                return await _deny(send, 403, "uploads are disabled on this server")
            if path.startswith(GRADIO_API):
                if self.api_key and not self._logged_in(scope):
                    return await _deny(send, 401, "log in with the API key first")
                declared = dict(scope.get("headers", [])).get(b"content-length", b"")
                if declared.isdigit() and int(declared) > self.max_body_bytes:
                    return await _deny(send, 413, f"request body exceeds {self.max_body_bytes} bytes")
                receive = _capped(receive, self.max_body_bytes)
        await self.app(scope, receive, send)

    def _logged_in(self, scope: dict) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if key_matches(self.api_key, bearer_token(headers)):
            return True
        tokens = self.gradio_tokens()
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name.startswith("access-token-") and value and value in tokens:
                return True
        return False


def _capped(receive: Any, limit: int) -> Any:
    """`receive` that ends the request as a disconnect once its body passes `limit` bytes (a
    body sent without Content-Length)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return wrapped


async def _deny(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- logs ----------------------------------------------------------------------------------------

_KEY_IN_QUERY = re.compile(r"(?i)((?:api_key|access_token|token)=)[^&\s\"']+")


def redact(text: str) -> str:
    """`?api_key=SECRET` (or access_token / token) -> `?api_key=REDACTED`."""
    return _KEY_IN_QUERY.sub(r"\1REDACTED", text)


class RedactKeys(logging.Filter):
    """On uvicorn's loggers: request lines (access log, WebSocket handshakes) name the full URL,
    and browsers' WebSockets pass the key in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())
