"""Notifications and balance alerts: types, inputs and payloads."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime
from typing import Self, cast

import strawberry
from strawberry import relay
from strawberry.scalars import JSON

from orgwallet.schema.context import Info
from orgwallet.schema.scalars import BigInt
from orgwallet.schema.types import nodes_via, page_info
from orgwallet.services import alerts as alert_service
from orgwallet.services import notifications as notification_service

NotificationKind = strawberry.enum(notification_service.NotificationKind, name="NotificationKind")


@strawberry.type
class Notification(relay.Node):
    id: relay.NodeID[str]
    kind: NotificationKind  # type: ignore[valid-type]
    title: str
    body: str
    data: JSON | None = strawberry.field(description="Machine-readable details (threshold, balance, ids...).")
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def of(cls, row: notification_service.Notification) -> Self:
        return cls(
            id=str(row.id),
            kind=row.kind,
            title=row.title,
            body=row.body,
            data=cast(JSON, row.data),
            created_at=row.created_at,
            read_at=row.read_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await nodes_via(info, node_ids, notification_service.get_notification, cls.of)


@strawberry.type
class NotificationEdge:
    cursor: str
    node: Notification


@strawberry.type
class NotificationConnection:
    edges: list[NotificationEdge]
    page_info: relay.PageInfo
    unread_count: int


async def notification_connection(
    info: Info,
    organization_id: uuid.UUID,
    *,
    first: int | None,
    after: str | None,
    unread_only: bool | None,
    since: date | None,
) -> NotificationConnection:
    async with info.context.reading() as session:
        page = await notification_service.list_notifications(
            session,
            info.context.principal,
            organization_id,
            first=50 if first is None else first,
            after=after,
            unread_only=bool(unread_only),
            since=since,
        )
    edges = [
        NotificationEdge(cursor=notification_service.encode_cursor(row.id), node=Notification.of(row))
        for row in page.notifications
    ]
    return NotificationConnection(
        edges=edges,
        page_info=page_info([e.cursor for e in edges], has_next=page.has_next, after=after),
        unread_count=page.unread,
    )


@strawberry.type
class BalanceAlert(relay.Node):
    id: relay.NodeID[str]
    threshold: BigInt = strawberry.field(description="Fires once when the available balance falls below it.")
    armed: bool = strawberry.field(
        description="False after it fired, until the balance is back at or above the threshold."
    )
    last_fired_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: alert_service.BalanceAlert) -> Self:
        return cls(
            id=str(row.id),
            threshold=BigInt(row.threshold),
            armed=row.armed,
            last_fired_at=row.last_fired_at,
            created_at=row.created_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await nodes_via(info, node_ids, alert_service.get_alert, cls.of)


@strawberry.input
class AddBalanceAlertInput:
    organization_id: strawberry.ID
    threshold: BigInt


@strawberry.input
class RemoveBalanceAlertInput:
    alert_id: strawberry.ID


@strawberry.input
class MarkNotificationsReadInput:
    organization_id: strawberry.ID
    notification_ids: list[strawberry.ID] | None = strawberry.field(
        default=None, description="Omitted: all of the organization's notifications."
    )


@strawberry.input
class SetEmailNotificationsInput:
    organization_id: strawberry.ID
    enabled: bool


@strawberry.type
class BalanceAlertAdded:
    alert: BalanceAlert


@strawberry.type
class BalanceAlertRemoved:
    alert_id: strawberry.ID


@strawberry.type
class NotificationsMarkedRead:
    count: int
    unread_count: int


@strawberry.type
class EmailNotificationsSet:
    organization_id: strawberry.ID
    enabled: bool
