"""GraphQL object types of organizations, people and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import date, datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from strawberry import relay

from orgwallet import errors
from orgwallet.auth.permissions import ROLE_PERMISSIONS, Permission, sorted_permissions
from orgwallet.auth.principals import ApiKeyPrincipal, Principal, UserPrincipal
from orgwallet.db import models
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.services import access
from orgwallet.services import alerts as alert_service
from orgwallet.services import api_keys as key_service
from orgwallet.services import autotopup as topup_service
from orgwallet.services import organizations as org_service
from orgwallet.services import wallets as wallet_service

if TYPE_CHECKING:
    from orgwallet.schema.audit import AuditEventConnection
    from orgwallet.schema.autotopup import AutoTopUpPolicy
    from orgwallet.schema.notifications import BalanceAlert, NotificationConnection
    from orgwallet.schema.purchases import PurchaseConnection, PurchaseStatus
    from orgwallet.schema.subscriptions import TokenSubscription
    from orgwallet.schema.wallets import Wallet


@strawberry.enum
class Role(Enum):
    OWNER = "owner"
    ADMIN = "admin"
    BILLING = "billing"
    MEMBER = "member"
    VIEWER = "viewer"

    @classmethod
    def of(cls, role: models.Role) -> Role:
        return cls(role.value)

    def model(self) -> models.Role:
        return models.Role(self.value)


def page_info(cursors: list[str], *, has_next: bool, after: str | None) -> relay.PageInfo:
    """The PageInfo of a forward page whose edges have ``cursors``."""
    return relay.PageInfo(
        has_next_page=has_next,
        has_previous_page=after is not None,
        start_cursor=cursors[0] if cursors else None,
        end_cursor=cursors[-1] if cursors else None,
    )


R = TypeVar("R")
N = TypeVar("N")


async def nodes_via(
    info: Info,
    node_ids: Iterable[str],
    fetch: Callable[[AsyncSession, Principal, uuid.UUID], Awaitable[R | None]],
    of: Callable[[R], N],
) -> list[N | None]:
    """``resolve_nodes`` through a service reader that answers None for what the caller may not
    see (another organization's object is not found)."""
    out: list[N | None] = []
    async with info.context.reading() as session:
        for node_id in uuid_ids(node_ids):
            row = None if node_id is None else await fetch(session, info.context.principal, node_id)
            out.append(None if row is None else of(row))
    return out


def uuid_ids(node_ids: Iterable[str]) -> list[uuid.UUID | None]:
    out: list[uuid.UUID | None] = []
    for node_id in node_ids:
        try:
            out.append(uuid.UUID(node_id))
        except ValueError:
            out.append(None)
    return out


@strawberry.type
class Member:
    subject: str
    email: str | None
    role: Role


@strawberry.type
class Organization(relay.Node):
    id: relay.NodeID[str]
    name: str
    slug: str
    created_at: datetime
    # The wallet, when it was read with the organization (an API key's organization(id)).
    _wallet: strawberry.Private[Any] = None

    @classmethod
    def of(cls, row: models.Organization) -> Self:
        return cls(id=str(row.id), name=row.name, slug=row.slug, created_at=row.created_at)

    @classmethod
    def of_record(cls, record: Any) -> Self:
        """From a record of ``get_organization_of_key``: the organization, and its wallet's
        state, kept when it stands as read (nothing past due)."""
        return cls(
            id=str(record["id"]),
            name=record["name"],
            slug=record["slug"],
            created_at=record["created_at"],
            _wallet=wallet_service.wallet_state(record),
        )

    @classmethod
    async def load(cls, info: Info, organization_id: uuid.UUID) -> Self:
        """The organization an object already shown to the caller belongs to."""
        async with info.context.reading() as session:
            row = await session.get(models.Organization, organization_id)
        assert row is not None
        return cls.of(row)

    @property
    def pk(self) -> uuid.UUID:
        return uuid.UUID(self.id)

    @strawberry.field(description="People of the organization; not for API keys.")
    async def members(self, info: Info) -> list[Member]:
        if isinstance(info.context.principal, ApiKeyPrincipal):
            raise errors.Forbidden("API keys do not read the member list")
        async with info.context.reading() as session:
            rows = await org_service.list_members(session, self.pk)
        return [Member(subject=u.subject, email=u.email, role=Role.of(r)) for u, r in rows]

    @strawberry.field
    async def wallet(self, info: Info) -> Annotated[Wallet, strawberry.lazy("orgwallet.schema.wallets")]:
        from orgwallet.schema.wallets import Wallet

        await info.context.authorize(self.pk, Permission.TOKENS_VIEW)
        if self._wallet is not None:
            return Wallet.of(self._wallet)
        async with info.context.connection() as connection:
            row = await wallet_service.read_wallet(connection, info.context.sessions, self.pk)
        return Wallet.of(row)

    @strawberry.field(description="Purchases of tokens, newest first.")
    async def purchases(
        self,
        info: Info,
        first: int | None = 50,
        after: str | None = None,
        status: list[Annotated[PurchaseStatus, strawberry.lazy("orgwallet.schema.purchases")]] | None = None,
    ) -> Annotated[PurchaseConnection, strawberry.lazy("orgwallet.schema.purchases")]:
        from orgwallet.schema.purchases import purchase_connection

        return await purchase_connection(info, self.pk, first=first, after=after, status=status)

    @strawberry.field(description="Notifications of the organization, newest first.")
    async def notifications(
        self,
        info: Info,
        first: int | None = 50,
        after: str | None = None,
        unread_only: bool | None = False,
        since: Annotated[
            date | None, strawberry.argument(description="Created on or after this UTC day.")
        ] = None,
    ) -> Annotated[NotificationConnection, strawberry.lazy("orgwallet.schema.notifications")]:
        from orgwallet.schema.notifications import notification_connection

        return await notification_connection(
            info, self.pk, first=first, after=after, unread_only=unread_only, since=since
        )

    @strawberry.field(description="The automatic top-up policy; null when none was set.")
    async def auto_top_up(
        self, info: Info
    ) -> Annotated[AutoTopUpPolicy, strawberry.lazy("orgwallet.schema.autotopup")] | None:
        from orgwallet.schema.autotopup import AutoTopUpPolicy

        async with info.context.reading() as session:
            view = await topup_service.read_policy(
                session, info.context.principal, self.pk, info.context.runtime.clock.now()
            )
        return None if view is None else AutoTopUpPolicy.of(view)

    @strawberry.field(description="Low-balance alerts, highest threshold first.")
    async def balance_alerts(
        self, info: Info
    ) -> list[Annotated[BalanceAlert, strawberry.lazy("orgwallet.schema.notifications")]]:
        from orgwallet.schema.notifications import BalanceAlert

        async with info.context.reading() as session:
            rows = await alert_service.list_alerts(session, info.context.principal, self.pk)
        return [BalanceAlert.of(row) for row in rows]

    @strawberry.field(description="The subscription that is not CANCELED, if any.")
    async def subscription(
        self, info: Info
    ) -> Annotated[TokenSubscription, strawberry.lazy("orgwallet.schema.subscriptions")] | None:
        from orgwallet.schema.subscriptions import TokenSubscription
        from orgwallet.services import subscriptions as subscription_service

        await info.context.authorize(self.pk, Permission.TOKENS_VIEW)
        async with info.context.reading() as session:
            row = await subscription_service.current(session, self.pk)
        return None if row is None else TokenSubscription.of(row)

    @strawberry.field(description="API keys of the organization (never their secrets).")
    async def api_keys(self, info: Info) -> list[ApiKey]:
        async with info.context.reading() as session:
            await access.authorize(session, info.context.principal, self.pk, Permission.MEMBERS_MANAGE)
            rows = await key_service.list_api_keys(session, self.pk)
        return [ApiKey.of(row) for row in rows]

    @strawberry.field(
        description="Every change in the organization, newest first; owners, admins and platform staff."
    )
    async def audit_log(
        self,
        info: Info,
        first: int | None = 50,
        after: str | None = None,
        actions: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Annotated[AuditEventConnection, strawberry.lazy("orgwallet.schema.audit")]:
        from orgwallet.schema.audit import audit_log_connection

        return await audit_log_connection(
            info, self.pk, first=first, after=after, actions=actions, since=since, until=until
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        ids = uuid_ids(node_ids)
        found: dict[uuid.UUID, Any] = {}
        wanted = [i for i in ids if i is not None]
        async with info.context.reading() as session:
            statement = access.readable_organizations(info.context.principal).where(
                col(models.Organization.id).in_(wanted)
            )
            for row in (await session.execute(statement)).scalars():
                found[row.id] = cls.of(row)
        return [found.get(i) if i is not None else None for i in ids]


@strawberry.type
class ApiKey(relay.Node):
    id: relay.NodeID[str]
    name: str
    prefix: str
    scopes: list[str]
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: models.ApiKey) -> Self:
        return cls(
            id=str(row.id),
            name=row.name,
            prefix=row.prefix,
            scopes=list(row.scopes),
            created_by=row.created_by,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        out: list[Self | None] = []
        async with info.context.reading() as session:
            for key_id in uuid_ids(node_ids):
                row = await session.get(models.ApiKey, key_id) if key_id else None
                if row is None:
                    out.append(None)
                    continue
                try:
                    await access.authorize(
                        session,
                        info.context.principal,
                        row.organization_id,
                        Permission.MEMBERS_MANAGE,
                    )
                except OrgWalletError:
                    out.append(None)
                    continue
                out.append(cls.of(row))
        return out


@strawberry.type
class Membership:
    organization: Organization
    role: Role

    @strawberry.field
    def permissions(self) -> list[str]:
        return sorted_permissions(ROLE_PERMISSIONS[self.role.model()])


@strawberry.type
class Viewer:
    subject: str
    email: str | None
    is_platform_admin: bool

    @strawberry.field
    async def memberships(self, info: Info) -> list[Membership]:
        principal = info.context.principal
        async with info.context.reading() as session:
            if isinstance(principal, UserPrincipal):
                rows = await org_service.viewer_memberships(session, principal)
                return [Membership(organization=Organization.of(o), role=Role.of(r)) for o, r in rows]
        return []
