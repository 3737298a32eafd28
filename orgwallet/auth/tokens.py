"""JWT verification (HS256 secret or RS256 through JWKS) and development tokens."""

from __future__ import annotations

import time
from typing import Any

import jwt

from orgwallet.auth.principals import UserPrincipal
from orgwallet.config import Settings
from orgwallet.errors import Unauthenticated


class JwtVerifier:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        self._admins = frozenset(settings.platform_admins)

    def _key(self, token: str) -> Any:
        if self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key
        return self._settings.signing_secret

    def verify(self, token: str) -> UserPrincipal:
        s = self._settings
        algorithms = ["RS256"] if self._jwks is not None else [s.jwt_algorithm]
        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=algorithms,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_seconds,
                options={"require": ["sub", "exp", "iss", "aud"]},
            )
        except (jwt.PyJWTError, ValueError) as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 255 or not subject.isprintable():
            raise Unauthenticated("invalid token: bad subject")
        admin_by_claim = bool(s.jwt_admin_claim and claims.get(s.jwt_admin_claim) is True)
        return UserPrincipal(
            subject=subject,
            email=claims.get("email"),
            name=claims.get("name"),
            is_platform_admin=subject in self._admins or admin_by_claim,
        )


def mint_token(
    settings: Settings,
    *,
    subject: str,
    email: str | None = None,
    admin: bool = False,
    ttl_seconds: int = 3600,
) -> str:
    """A development token signed with the configured HS256 secret.

    ``admin`` sets the ``orgwallet_admin`` claim, honoured when ``jwt_admin_claim`` names it
    (the embedded default does)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if email:
        claims["email"] = email
    if admin:
        claims[settings.jwt_admin_claim or "orgwallet_admin"] = True
    return jwt.encode(claims, settings.signing_secret, algorithm="HS256")
