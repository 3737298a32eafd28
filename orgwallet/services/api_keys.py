"""Organization API keys: issued, listed, revoked, and resolved to a principal."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from orgwallet.auth import api_keys as secrets
from orgwallet.auth.permissions import API_KEY_SCOPES, Permission
from orgwallet.auth.principals import ApiKeyPrincipal, Principal
from orgwallet.db.engine import DriverPool
from orgwallet.db.models import ApiKey, utcnow
from orgwallet.errors import InvalidInput, NotFound, Unauthenticated
from orgwallet.services import access, audit, validation

#: ``last_used_at`` is stamped at most this often per key: a write per request would cost
#: more than the request.
LAST_USED_RESOLUTION = timedelta(minutes=1)

#: Principals of API keys are remembered by the process that looked them up: a back end calls
#: many times a second, and each lookup is a round trip. A remembered principal is served only
#: while the set of keys has not changed: at most every REVOCATION_CHECK_SECONDS, one cheap query
#: per process (``count(*), count(revoked_at)`` over api_keys, which any revocation or removal
#: changes) tells, and when it changed the process forgets every principal. So a key revoked by
#: another process is refused here within about REVOCATION_CHECK_SECONDS of the revocation's
#: commit; the process that revoked it refuses it from the moment ``revokeApiKey`` answers
#: (``PrincipalCache.revoked``). PRINCIPAL_CACHE_SECONDS bounds how long one lookup is trusted.
PRINCIPAL_CACHE_SECONDS = 300.0
REVOCATION_CHECK_SECONDS = 1.0
PRINCIPAL_CACHE_SIZE = 100_000

_KEY_SET_VERSION = "SELECT count(*), count(revoked_at) FROM api_keys"


class PrincipalCache:
    """API key principals of one app (one process), checked against the key set's version.

    What is remembered is tagged with the version and this process's *generation*, which a
    revocation committed here moves: a lookup (or a version read) that began before the
    revocation committed may have seen the key unrevoked, and is then not kept."""

    def __init__(self, driver: DriverPool, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._driver = driver
        self._monotonic = monotonic
        # secret hash -> (monotonic expiry, version when looked up, principal)
        self._principals: dict[str, tuple[float, object, ApiKeyPrincipal]] = {}
        self._key_set: object = None
        self._generation = 0
        self._checked_at = -math.inf
        self._check: asyncio.Future[None] | None = None

    @property
    def version(self) -> object:
        """The version as last known: pass it to ``remember`` for a lookup that starts now."""
        return (self._key_set, self._generation)

    async def get(self, secret_hash: str) -> ApiKeyPrincipal | None:
        if secret_hash not in self._principals:
            return None
        if self._monotonic() - self._checked_at >= REVOCATION_CHECK_SECONDS:
            await self._recheck()
        found = self._principals.get(secret_hash)
        if found is None:
            return None
        expires, version, principal = found
        if version != self.version or self._monotonic() >= expires:
            self._principals.pop(secret_hash, None)
            return None
        return principal

    def remember(self, secret_hash: str, principal: ApiKeyPrincipal, version: object) -> None:
        """``version``: ``self.version`` when the lookup began. A lookup that raced a change of
        the key set (a revocation) carries the version before it and is not kept."""
        if version != self.version:
            return
        if len(self._principals) >= PRINCIPAL_CACHE_SIZE:
            self._principals.clear()  # rare; a full sweep is simpler than keeping LRU order
        self._principals[secret_hash] = (self._monotonic() + PRINCIPAL_CACHE_SECONDS, version, principal)

    def revoked(self) -> None:
        """A revocation has committed (in this process): forget everything, and refuse what
        lookups and version reads in flight bring back (they may predate the commit)."""
        self._generation += 1
        self._principals.clear()
        self._checked_at = -math.inf

    async def _recheck(self) -> None:
        """Reads the key set's version; concurrent callers share one query."""
        if self._check is None:
            self._check = asyncio.ensure_future(self._read_version())
        try:
            await asyncio.shield(self._check)
        except Exception:  # the database cannot say: serve nothing from memory
            self._principals.clear()

    async def _read_version(self) -> None:
        try:
            started, generation = self._monotonic(), self._generation
            # On the driver's pool: the requests that arrive meanwhile wait for this read, so
            # it is kept to one prepared statement (no session, no greenlet).
            async with self._driver.acquire() as connection:
                key_set = tuple(await connection.fetchrow(_KEY_SET_VERSION))
            if generation != self._generation:
                return  # read before a revocation committed here: it proves nothing
            if key_set != self._key_set:
                self._principals.clear()
                self._key_set = key_set
            self._checked_at = started
        finally:
            self._check = None


def _scopes(values: list[str]) -> list[str]:
    allowed = {p.value for p in API_KEY_SCOPES}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown scopes {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
            field="scopes",
        )
    return [p.value for p in Permission if p.value in values]


async def create_api_key(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    name: str,
    scopes: list[str],
) -> tuple[ApiKey, str]:
    """Returns the key row and its secret, which is never stored nor shown again."""
    user = access.require_user(principal)
    await access.authorize(session, principal, organization_id, Permission.MEMBERS_MANAGE)
    name = validation.text(name, "name")
    scope_list = _scopes(scopes)
    issued = secrets.issue()
    key = ApiKey(
        organization_id=organization_id,
        name=name,
        prefix=issued.prefix,
        secret_hash=issued.secret_hash,
        scopes=scope_list,
        created_by=user.subject,
    )
    session.add(key)
    await session.flush()
    await audit.record(
        session,
        principal,
        action="api_key.create",
        organization_id=organization_id,
        target_type="api_key",
        target_id=key.id,
        after={"name": name, "prefix": issued.prefix, "scopes": scope_list},
    )
    return key, issued.secret


async def revoke_api_key(session: AsyncSession, principal: Principal, api_key_id: uuid.UUID) -> ApiKey:
    """Revokes the key (once: a second call changes nothing). The caller tells the process's
    ``PrincipalCache`` once the revocation has committed (``PrincipalCache.revoked``)."""
    key = await session.get(ApiKey, api_key_id, with_for_update=True)
    try:
        if key is None:
            raise NotFound("API key not found")
        await access.authorize(session, principal, key.organization_id, Permission.MEMBERS_MANAGE)
    except NotFound:  # another organization's key is answered as a missing one, word for word
        raise NotFound("API key not found") from None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await audit.record(
            session,
            principal,
            action="api_key.revoke",
            organization_id=key.organization_id,
            target_type="api_key",
            target_id=key.id,
            before={"revoked": False},
            after={"revoked": True},
        )
    return key


async def list_api_keys(session: AsyncSession, organization_id: uuid.UUID) -> list[ApiKey]:
    rows = await session.execute(
        select(ApiKey).where(col(ApiKey.organization_id) == organization_id).order_by(col(ApiKey.created_at))
    )
    return list(rows.scalars())


# The key by its prefix, and its last-use stamp when due: one statement, one round trip (it is
# on every request of a back end whose key this process does not know yet), atomic on its own,
# sent on the driver's connection. The stamp needs the right secret and an unrevoked key; the
# answer is decided in Python, in constant time.
_LOOKUP = """
    WITH k AS (
      SELECT id, organization_id, secret_hash, scopes, revoked_at, last_used_at
      FROM api_keys WHERE prefix = $1
    ), stamp AS (
      UPDATE api_keys a SET last_used_at = now() FROM k
      WHERE a.id = k.id AND k.secret_hash = $2 AND k.revoked_at IS NULL
        AND (k.last_used_at IS NULL OR k.last_used_at < now() - $3::interval)
      RETURNING a.id
    )
    SELECT id, organization_id, secret_hash, scopes, revoked_at FROM k
"""


async def authenticate(connection: Any, secret: str) -> ApiKeyPrincipal:
    """The key's principal; ``Unauthenticated`` for a malformed, unknown or revoked key. The
    last-use stamp is written by the lookup itself, on its own (``connection`` is an asyncpg
    connection outside any transaction)."""
    prefix = secrets.split_prefix(secret)
    if prefix is None:
        raise Unauthenticated("malformed API key")
    key = await connection.fetchrow(_LOOKUP, prefix, secrets.hash_secret(secret), LAST_USED_RESOLUTION)
    if key is None or not secrets.matches(secret, key["secret_hash"]):
        raise Unauthenticated("unknown API key")
    if key["revoked_at"] is not None:
        raise Unauthenticated("revoked API key")
    return ApiKeyPrincipal(
        api_key_id=key["id"],
        organization_id=key["organization_id"],
        scopes=frozenset(Permission(s) for s in key["scopes"]),
    )
