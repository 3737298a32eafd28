"""Mutations of notifications and balance alerts. Their payloads are plain types (the
contract's), so a refused call is a GraphQL error with ``extensions.code`` (``BAD_USER_INPUT``
with the ``field``, ``NOT_FOUND``, ``FORBIDDEN``), and nothing is written."""

from __future__ import annotations

import strawberry
from strawberry import relay

from orgwallet.schema.context import Info
from orgwallet.schema.notifications import (
    AddBalanceAlertInput,
    BalanceAlert,
    BalanceAlertAdded,
    BalanceAlertRemoved,
    EmailNotificationsSet,
    MarkNotificationsReadInput,
    NotificationsMarkedRead,
    RemoveBalanceAlertInput,
    SetEmailNotificationsInput,
)
from orgwallet.schema.permissions import IsAuthenticated
from orgwallet.services import alerts as alert_service
from orgwallet.services import notifications as notification_service
from orgwallet.services.validation import global_id


@strawberry.type
class NotificationMutations:
    @strawberry.mutation(permission_classes=[IsAuthenticated], description="tokens.configure")
    async def add_balance_alert(self, info: Info, input: AddBalanceAlertInput) -> BalanceAlertAdded | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        async with info.context.unit_of_work() as session:
            alert = await alert_service.add_alert(
                session, info.context.principal, info.context.settings, organization_id, input.threshold
            )
        return BalanceAlertAdded(alert=BalanceAlert.of(alert))

    @strawberry.mutation(permission_classes=[IsAuthenticated], description="tokens.configure")
    async def remove_balance_alert(
        self, info: Info, input: RemoveBalanceAlertInput
    ) -> BalanceAlertRemoved | None:
        alert_id = global_id(input.alert_id, "BalanceAlert", "alertId")
        async with info.context.unit_of_work() as session:
            await alert_service.remove_alert(session, info.context.principal, alert_id)
        return BalanceAlertRemoved(alert_id=strawberry.ID(input.alert_id))

    @strawberry.mutation(permission_classes=[IsAuthenticated], description="tokens.view")
    async def mark_notifications_read(
        self, info: Info, input: MarkNotificationsReadInput
    ) -> NotificationsMarkedRead | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        ids = (
            None
            if input.notification_ids is None
            else [global_id(i, "Notification", "notificationIds") for i in input.notification_ids]
        )
        async with info.context.unit_of_work() as session:
            count, unread = await notification_service.mark_read(
                session, info.context.principal, organization_id, ids
            )
        return NotificationsMarkedRead(count=count, unread_count=unread)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="A member turns e-mail of the organization's notifications on or off for themselves.",
    )
    async def set_email_notifications(
        self, info: Info, input: SetEmailNotificationsInput
    ) -> EmailNotificationsSet | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        async with info.context.unit_of_work() as session:
            enabled = await notification_service.set_email_notifications(
                session, info.context.principal, organization_id, enabled=input.enabled
            )
        return EmailNotificationsSet(
            organization_id=strawberry.ID(str(relay.GlobalID("Organization", str(organization_id)))),
            enabled=enabled,
        )
