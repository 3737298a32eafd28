"""Who is calling: a user from a JWT, an organization's API key, or nobody."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from orgwallet.auth.permissions import Permission


@dataclass(frozen=True, slots=True)
class UserPrincipal:
    subject: str
    email: str | None
    name: str | None
    is_platform_admin: bool

    @property
    def actor(self) -> str:
        return self.subject


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal:
    api_key_id: uuid.UUID
    organization_id: uuid.UUID
    scopes: frozenset[Permission]

    @property
    def subject(self) -> str:
        return f"apikey:{self.api_key_id}"

    @property
    def actor(self) -> str:
        return self.subject

    is_platform_admin = False


@dataclass(frozen=True, slots=True)
class Anonymous:
    actor = "anonymous"
    is_platform_admin = False


Principal = UserPrincipal | ApiKeyPrincipal | Anonymous
