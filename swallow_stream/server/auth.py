"""API-key checks for /v1/* (Authorization: Bearer) and /ws (the header, or ?api_key= for browsers)."""

from __future__ import annotations

import secrets
from typing import Mapping


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
