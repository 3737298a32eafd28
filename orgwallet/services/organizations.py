"""Organizations and their members."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal, Principal, UserPrincipal
from orgwallet.config import Settings
from orgwallet.db.models import Membership, Organization, Role, User
from orgwallet.errors import Conflict, Forbidden, NotFound
from orgwallet.services import access, audit, validation, wallets


async def ensure_user(
    session: AsyncSession, subject: str, email: str | None = None, name: str | None = None
) -> uuid.UUID:
    """The user row for ``subject``, created on first sight; e-mail and name are kept fresh."""
    statement = (
        insert(User)
        .values(id=uuid7(), subject=subject, email=email, name=name)
        .on_conflict_do_update(
            index_elements=["subject"],
            set_={
                "email": func.coalesce(insert(User).excluded.email, User.email),
                "name": func.coalesce(insert(User).excluded.name, User.name),
            },
        )
        .returning(col(User.id))
    )
    user_id: uuid.UUID = (await session.execute(statement)).scalar_one()
    return user_id


async def get_organization(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> Organization | None:
    statement = access.readable_organizations(principal).where(col(Organization.id) == organization_id)
    return (await session.execute(statement)).scalars().one_or_none()


# The organization and, in the same round trip, its wallet (what a back end's balance read asks).
_ORGANIZATION = f"""
    SELECT o.id, o.name, o.slug, o.created_at, ws.*
    FROM organizations o
    LEFT JOIN LATERAL ({wallets.WALLET_STATE} WHERE w.organization_id = o.id) ws ON true
    WHERE o.id = $1
"""  # noqa: S608 (constant SQL)


async def get_organization_of_key(
    connection: Any, principal: ApiKeyPrincipal, organization_id: uuid.UUID
) -> Any:
    """``get_organization`` for an API key, on an asyncpg connection: a key sees its own
    organization and no other (``access.readable_organizations``), so there is no membership
    to look up. The row (id, name, slug, created_at, and its wallet's ``WALLET_STATE``
    columns: ``wallets.wallet_state`` reads them), or None."""
    if organization_id != principal.organization_id:
        return None
    return await connection.fetchrow(_ORGANIZATION, organization_id)


DERIVED_SLUG_ATTEMPTS = 5


async def create_organization(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    *,
    name: str,
    slug: str | None,
) -> Organization:
    user = access.require_user(principal)
    name = validation.text(name, "name")
    given = validation.slug(slug) if slug else None
    organization: Organization | None = None
    # A derived slug that a concurrent request takes between our look and our insert is
    # derived again (the insert waited for that request, so the next look sees its slug).
    for _ in range(DERIVED_SLUG_ATTEMPTS):
        slug = given or await _free_slug(session, validation.slugify(name))
        inserted = await session.execute(
            insert(Organization)
            .values(id=uuid7(), name=name, slug=slug)
            .on_conflict_do_nothing(index_elements=["slug"])
            .returning(Organization)
        )
        organization = inserted.scalar_one_or_none()
        if organization is not None or given:
            break
    if organization is None:
        raise Conflict(f"slug {slug!r} is taken", code="SLUG_TAKEN")
    user_id = await ensure_user(session, user.subject, user.email, user.name)
    session.add(Membership(organization_id=organization.id, user_id=user_id, role=Role.OWNER))
    await session.flush()
    await wallets.open_wallet(session, principal, settings, organization.id)
    await audit.record(
        session,
        principal,
        action="organization.create",
        organization_id=organization.id,
        target_type="organization",
        target_id=organization.id,
        after={"name": name, "slug": slug, "owner": user.subject},
    )
    return organization


async def _free_slug(session: AsyncSession, base: str) -> str:
    taken = set(
        (
            await session.execute(
                select(col(Organization.slug)).where(col(Organization.slug).startswith(base))
            )
        ).scalars()
    )
    if base not in taken:
        return base
    n = 2
    while f"{base[:58]}-{n}" in taken:
        n += 1
    return f"{base[:58]}-{n}"


async def list_members(session: AsyncSession, organization_id: uuid.UUID) -> Sequence[tuple[User, Role]]:
    rows = await session.execute(
        select(User, col(Membership.role))
        .join(Membership, col(Membership.user_id) == col(User.id))
        .where(col(Membership.organization_id) == organization_id)
        .order_by(col(Membership.created_at), col(User.subject))
    )
    return [(user, Role(role)) for user, role in rows]


async def viewer_memberships(
    session: AsyncSession, principal: UserPrincipal
) -> Sequence[tuple[Organization, Role]]:
    rows = await session.execute(
        select(Organization, col(Membership.role))
        .join(Membership, col(Membership.organization_id) == col(Organization.id))
        .join(User, col(User.id) == col(Membership.user_id))
        .where(col(User.subject) == principal.subject)
        .order_by(col(Organization.created_at))
    )
    return [(org, Role(role)) for org, role in rows]


async def _lock_members(session: AsyncSession, organization_id: uuid.UUID) -> dict[str, Role]:
    """Locks the organization row (membership changes serialize on it) and returns its roles."""
    await session.execute(
        select(col(Organization.id)).where(col(Organization.id) == organization_id).with_for_update()
    )
    rows = await session.execute(
        select(col(User.subject), col(Membership.role))
        .join(Membership, col(Membership.user_id) == col(User.id))
        .where(col(Membership.organization_id) == organization_id)
    )
    return {subject: Role(role) for subject, role in rows}


def _check_owner_change(granted: access.Access, *roles: Role) -> None:
    """Only owners (and platform admins) make, unmake or remove owners."""
    if Role.OWNER in roles and granted.role not in (Role.OWNER, None):
        raise Forbidden("only an owner can grant, change or remove the owner role")


async def add_member(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    subject: str,
    email: str | None,
    role: Role,
) -> None:
    granted = await access.authorize(session, principal, organization_id, Permission.MEMBERS_MANAGE)
    subject = validation.text(subject, "subject", max_length=255)
    email = validation.email(email)
    _check_owner_change(granted, role)
    roles = await _lock_members(session, organization_id)
    if subject in roles:
        raise Conflict(f"{subject} is already a member", code="ALREADY_MEMBER")
    user_id = await ensure_user(session, subject, email)
    session.add(Membership(organization_id=organization_id, user_id=user_id, role=role))
    await audit.record(
        session,
        principal,
        action="member.add",
        organization_id=organization_id,
        target_type="member",
        target_id=subject,
        after={"subject": subject, "email": email, "role": role.value},
    )


async def set_member_role(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    subject: str,
    role: Role,
) -> None:
    granted = await access.authorize(session, principal, organization_id, Permission.MEMBERS_MANAGE)
    roles = await _lock_members(session, organization_id)
    current = roles.get(subject)
    if current is None:
        raise NotFound(f"{subject} is not a member")
    _check_owner_change(granted, current, role)
    if current == role:
        return
    if current == Role.OWNER and _owners(roles) == 1:
        raise Conflict("an organization keeps at least one owner", code="LAST_OWNER")
    user_id = await ensure_user(session, subject)
    membership = await session.get(Membership, (organization_id, user_id))
    assert membership is not None
    membership.role = role
    await audit.record(
        session,
        principal,
        action="member.set_role",
        organization_id=organization_id,
        target_type="member",
        target_id=subject,
        before={"role": current.value},
        after={"role": role.value},
    )


async def remove_member(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID, *, subject: str
) -> None:
    granted = await access.authorize(session, principal, organization_id, Permission.MEMBERS_MANAGE)
    roles = await _lock_members(session, organization_id)
    current = roles.get(subject)
    if current is None:
        raise NotFound(f"{subject} is not a member")
    _check_owner_change(granted, current)
    if current == Role.OWNER and _owners(roles) == 1:
        raise Conflict("an organization keeps at least one owner", code="LAST_OWNER")
    user_id = await ensure_user(session, subject)
    membership = await session.get(Membership, (organization_id, user_id))
    await session.delete(membership)
    await audit.record(
        session,
        principal,
        action="member.remove",
        organization_id=organization_id,
        target_type="member",
        target_id=subject,
        before={"role": current.value},
    )


def _owners(roles: dict[str, Role]) -> int:
    return sum(1 for r in roles.values() if r == Role.OWNER)
