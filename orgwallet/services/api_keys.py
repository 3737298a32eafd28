"""Organization API keys: issued, listed, revoked, and resolved to a principal."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from orgwallet.auth import api_keys as secrets
from orgwallet.auth.permissions import API_KEY_SCOPES, Permission
from orgwallet.auth.principals import ApiKeyPrincipal, Principal
from orgwallet.db.models import ApiKey, utcnow
from orgwallet.errors import InvalidInput, NotFound, Unauthenticated
from orgwallet.services import access, audit, validation

#: ``last_used_at`` is stamped at most this often per key: a write per request would cost
#: more than the request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
    key = await session.get(ApiKey, api_key_id, with_for_update=True)
    if key is None:
        raise NotFound("API key not found")
    await access.authorize(session, principal, key.organization_id, Permission.MEMBERS_MANAGE)
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


async def authenticate(session: AsyncSession, secret: str) -> ApiKeyPrincipal:
    prefix = secrets.split_prefix(secret)
    if prefix is None:
        raise Unauthenticated("malformed API key")
    key = (await session.execute(select(ApiKey).where(col(ApiKey.prefix) == prefix))).scalars().one_or_none()
    if key is None or not secrets.matches(secret, key.secret_hash):
        raise Unauthenticated("unknown API key")
    if key.revoked_at is not None:
        raise Unauthenticated("revoked API key")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(update(ApiKey).where(col(ApiKey.id) == key.id).values(last_used_at=now))
    return ApiKeyPrincipal(
        api_key_id=key.id,
        organization_id=key.organization_id,
        scopes=frozenset(Permission(s) for s in key.scopes),
    )
