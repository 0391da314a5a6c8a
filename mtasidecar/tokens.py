"""Mailbox tokens: random, shown once, stored hashed, compared in constant time.

A token carries 192 random bits, so nobody can guess it or brute-force its
hash; a fast hash (SHA-256) is then enough, and keeps every authenticated
request cheap. Passwords (chosen by people) need a slow KDF instead; they are
not handled here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "mts_"
_TOKEN_RE = re.compile(r"^mts_[A-Za-z0-9_-]{32}$")


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(24)  # 24 bytes = 192 bits → 32 characters


def well_formed(token: str) -> bool:
    return bool(_TOKEN_RE.fullmatch(token))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def matches(token: str, stored_hash: str | None) -> bool:
    if not stored_hash:
        return False
    return hmac.compare_digest(token_hash(token), stored_hash)
