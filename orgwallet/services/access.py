"""Authorization: who may do what in which organization.

Every organization-scoped service call starts here. A caller who is not a member
(or an API key of another organization) gets ``NotFound``: existence is not leaked.
A member without the permission gets ``Forbidden``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import false
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from orgwallet.auth.permissions import ROLE_PERMISSIONS, Permission
from orgwallet.auth.principals import Anonymous, ApiKeyPrincipal, Principal, UserPrincipal
from orgwallet.db.models import Membership, Organization, Role, User
from orgwallet.errors import Forbidden, NotFound, Unauthenticated


@dataclass(frozen=True, slots=True)
class Access:
    organization_id: uuid.UUID
    role: Role | None
    permissions: frozenset[Permission]


def require_authenticated(principal: Principal) -> UserPrincipal | ApiKeyPrincipal:
    if isinstance(principal, Anonymous):
        raise Unauthenticated("authentication required")
    return principal


def require_platform_admin(principal: Principal) -> UserPrincipal:
    principal = require_authenticated(principal)
    if not isinstance(principal, UserPrincipal) or not principal.is_platform_admin:
        raise Forbidden("platform administrators only")
    return principal


def require_user(principal: Principal) -> UserPrincipal:
    principal = require_authenticated(principal)
    if not isinstance(principal, UserPrincipal):
        raise Forbidden("this operation needs a signed-in user, not an API key")
    return principal


async def role_in(session: AsyncSession, subject: str, organization_id: uuid.UUID) -> Role | None:
    role = await session.scalar(
        select(col(Membership.role))
        .join(User, col(User.id) == col(Membership.user_id))
        .where(col(Membership.organization_id) == organization_id, col(User.subject) == subject)
    )
    return Role(role) if role is not None else None


def key_access(principal: ApiKeyPrincipal, organization_id: uuid.UUID) -> Access:
    """An API key's access, known without the database: its scopes, in its own organization."""
    if principal.organization_id != organization_id:
        raise NotFound("organization not found")
    return Access(organization_id, None, principal.scopes)


def check(granted: Access, permission: Permission) -> Access:
    if permission not in granted.permissions:
        raise Forbidden(f"missing permission {permission.value}")
    return granted


async def access(session: AsyncSession, principal: Principal, organization_id: uuid.UUID) -> Access:
    """What ``principal`` may do in the organization; ``NotFound`` when it may see nothing."""
    principal = require_authenticated(principal)
    if isinstance(principal, ApiKeyPrincipal):
        return key_access(principal, organization_id)
    role = await role_in(session, principal.subject, organization_id)
    if role is not None:
        return Access(organization_id, role, ROLE_PERMISSIONS[role])
    if principal.is_platform_admin:
        exists = await session.scalar(
            select(col(Organization.id)).where(col(Organization.id) == organization_id)
        )
        if exists is not None:
            return Access(organization_id, None, frozenset(Permission))
    raise NotFound("organization not found")


async def authorize(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    permission: Permission,
) -> Access:
    return check(await access(session, principal, organization_id), permission)


async def can_view(session: AsyncSession, principal: Principal, organization_id: uuid.UUID) -> bool:
    """Whether the principal may see the organization's objects (tokens.view): False for
    another organization's, which its readers then answer as not found."""
    try:
        await authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    except NotFound:
        return False
    return True


def readable_organizations(principal: Principal) -> SelectOfScalar[Organization]:
    """Organizations the principal may see, as a statement to refine: no tenant filter to forget."""
    statement = select(Organization)
    if isinstance(principal, ApiKeyPrincipal):
        return statement.where(col(Organization.id) == principal.organization_id)
    if isinstance(principal, UserPrincipal):
        if principal.is_platform_admin:
            return statement
        member_of = (
            select(col(Membership.organization_id))
            .join(User, col(User.id) == col(Membership.user_id))
            .where(col(User.subject) == principal.subject)
        )
        return statement.where(col(Organization.id).in_(member_of))
    return statement.where(false())
