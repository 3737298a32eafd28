"""API key secrets: ``owk_<prefix>_<secret>``, shown once, stored as a SHA-256 hash.

The secret has 256 bits of entropy, so a plain (unsalted) hash is enough: there is
nothing to brute-force. The prefix is the lookup key; the hash is compared in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "owk_"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    prefix: str
    secret: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue() -> IssuedKey:
    prefix = secrets.token_hex(6)
    secret = f"{PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return IssuedKey(prefix=prefix, secret=secret, secret_hash=hash_secret(secret))


def looks_like_api_key(token: str) -> bool:
    return token.startswith(PREFIX)


def split_prefix(secret: str) -> str | None:
    body = secret.removeprefix(PREFIX)
    prefix, sep, rest = body.partition("_")
    return prefix if sep and prefix and rest else None


def matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)
