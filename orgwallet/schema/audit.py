"""The audit log and CSV exports: types, inputs and payloads."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Self, cast

import strawberry
from strawberry import relay
from strawberry.scalars import JSON

# Imported for its registration of the ledger's kinds as LedgerEntryKind (strawberry.enum),
# which must come before any field of that type is seen.
import orgwallet.schema.wallets  # noqa: F401
from orgwallet.ledger import EntryKind
from orgwallet.schema.context import Info
from orgwallet.schema.purchases import PurchaseStatus
from orgwallet.schema.types import nodes_via, page_info
from orgwallet.services import audit
from orgwallet.services import exports as export_service

# The domain's enum is the GraphQL enum (values by name: LEDGER, PURCHASES, AUDIT_LOG).
strawberry.enum(export_service.ExportKind, name="ExportKind")


@strawberry.type
class AuditEvent(relay.Node):
    id: relay.NodeID[str]
    actor: str = strawberry.field(
        description="Who: a person's subject, apikey:<id>, stripe, or system:<job> for a background job."
    )
    action: str = strawberry.field(description="e.g. wallet.suspend, member.add, auto_top_up.set")
    target_type: str
    target_id: str | None
    request_id: str | None = strawberry.field(
        description="The request's X-Request-ID, the Stripe event's id, or job:<id> for a job."
    )
    before: JSON | None
    after: JSON | None
    created_at: datetime

    @classmethod
    def of(cls, event: audit.AuditEvent) -> Self:
        return cls(
            id=str(event.id),
            actor=event.actor,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            request_id=event.request_id,
            before=cast(JSON, event.before),
            after=cast(JSON, event.after),
            created_at=event.at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await nodes_via(info, node_ids, audit.get_event, cls.of)


@strawberry.type
class AuditEventEdge:
    cursor: str
    node: AuditEvent


@strawberry.type
class AuditEventConnection:
    edges: list[AuditEventEdge]
    page_info: relay.PageInfo


async def audit_log_connection(
    info: Info,
    organization_id: uuid.UUID,
    *,
    first: int | None,
    after: str | None,
    actions: list[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> AuditEventConnection:
    granted = await info.context.authorize(organization_id, audit.READ_PERMISSION)
    async with info.context.connection() as connection:
        page = await audit.list_events(
            connection,
            granted,
            first=50 if first is None else first,
            after=after,
            actions=actions,
            since=since,
            until=until,
        )
    edges = [AuditEventEdge(cursor=audit.encode_cursor(e.id), node=AuditEvent.of(e)) for e in page.events]
    return AuditEventConnection(
        edges=edges, page_info=page_info([e.cursor for e in edges], has_next=page.has_next, after=after)
    )


@strawberry.input
class CreateExportInput:
    organization_id: strawberry.ID
    kind: export_service.ExportKind
    since: datetime | None = strawberry.field(default=None, description="Rows at or after this instant.")
    until: datetime | None = strawberry.field(default=None, description="Rows before this instant.")
    kinds: list[EntryKind] | None = strawberry.field(default=None, description="LEDGER: these kinds only.")
    statuses: list[PurchaseStatus] | None = strawberry.field(
        default=None, description="PURCHASES: these statuses only."
    )
    actions: list[str] | None = strawberry.field(default=None, description="AUDIT_LOG: these actions only.")

    def request(self) -> export_service.ExportRequest:
        return export_service.ExportRequest(
            kind=self.kind,
            since=self.since,
            until=self.until,
            kinds=self.kinds,
            statuses=None if self.statuses is None else [s.model() for s in self.statuses],
            actions=self.actions,
        )


@strawberry.type(
    description="A short-lived link a browser downloads as CSV, without an Authorization header."
)
class ExportReady:
    url: str
    expires_at: datetime
