"""Notifications: stored per organization, listed newest first, marked read, and e-mailed.

A notification is created by the event that causes it, in that event's transaction, under a
key that names the cause (``purchase-paid:<id>``, ``alert:<id>:<n>``...): UNIQUE
(organization_id, key) makes it exactly once however often the event is delivered and however
many workers handle it. The same statement writes one e-mail per recipient (members who can
configure billing, OWNER, ADMIN and BILLING, with an address, who have not turned e-mail off)
and enqueues their ``mail.send`` jobs: all of it commits or rolls back with the cause.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.db.engine import transaction_connection
from orgwallet.db.models import Role
from orgwallet.errors import InvalidInput, NotFound
from orgwallet.services import access, audit, validation

MAX_PAGE = 200


class NotificationKind(enum.StrEnum):
    LOW_BALANCE = "low_balance"
    BALANCE_DEPLETED = "balance_depleted"
    TOKENS_EXPIRING = "tokens_expiring"
    PURCHASE_PAID = "purchase_paid"
    PURCHASE_FAILED = "purchase_failed"
    PURCHASE_REFUNDED = "purchase_refunded"
    WALLET_SUSPENDED = "wallet_suspended"
    WALLET_REACTIVATED = "wallet_reactivated"
    AUTO_TOP_UP_SUCCEEDED = "auto_top_up_succeeded"
    AUTO_TOP_UP_FAILED = "auto_top_up_failed"
    AUTO_TOP_UP_DISABLED = "auto_top_up_disabled"
    SPEND_CAP_REACHED = "spend_cap_reached"
    PAYMENT_ACTION_REQUIRED = "payment_action_required"
    PURCHASE_DISPUTE_WON = "purchase_dispute_won"  # a won dispute gave the tokens back
    SUBSCRIPTION_STARTED = "subscription_started"  # its first invoice paid
    SUBSCRIPTION_RENEWED = "subscription_renewed"  # a renewal paid, the period's tokens granted
    SUBSCRIPTION_PAYMENT_FAILED = "subscription_payment_failed"  # an attempt failed: past due
    SUBSCRIPTION_RENEWAL_UPCOMING = "subscription_renewal_upcoming"  # days before a renewal
    SUBSCRIPTION_CANCELED = "subscription_canceled"


#: Who gets a notification by e-mail: those who can act on billing.
MAIL_ROLES = (Role.OWNER.value, Role.ADMIN.value, Role.BILLING.value)

_NOTIFY = """
    WITH created AS (
        INSERT INTO notifications (organization_id, kind, key, title, body, data, created_at)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, coalesce($7, now()))
        ON CONFLICT (organization_id, key) DO NOTHING
        RETURNING id, organization_id, title, body, created_at
    ), mailed AS (
        INSERT INTO emails (notification_id, organization_id, user_id, to_address, subject, body,
                            next_attempt_at)
        SELECT c.id, c.organization_id, u.id, u.email, '[' || o.name || '] ' || c.title,
               c.body || E'\\n\\n-- \\norgwallet, for ' || o.name
                      || E'. You receive this as ' || upper(m.role) || E' of the organization;\\n'
                      || 'turn these e-mails off for yourself with setEmailNotifications.',
               c.created_at
        FROM created c
        JOIN organizations o ON o.id = c.organization_id
        JOIN memberships m ON m.organization_id = c.organization_id
        JOIN users u ON u.id = m.user_id
        WHERE m.role = ANY($8::text[]) AND m.email_notifications AND u.email IS NOT NULL
        ON CONFLICT (notification_id, user_id) DO NOTHING
        RETURNING id
    ), queued AS (
        SELECT job_enqueue('mail.send', json_build_object('email_id', id)::text, 'email:' || id)
        FROM mailed
    )
    SELECT id, (SELECT count(*) FROM queued) AS emails FROM created
"""


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    organization_id: uuid.UUID
    kind: NotificationKind
    title: str
    body: str
    data: Any
    created_at: datetime
    read_at: datetime | None


async def notify(
    session: AsyncSession,
    organization_id: uuid.UUID,
    kind: NotificationKind,
    *,
    key: str,
    title: str,
    body: str,
    data: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> uuid.UUID | None:
    """Creates the notification of ``key`` in the session's transaction, with its e-mails and
    their jobs; None when that cause was notified already."""
    connection = await transaction_connection(session)
    row = await connection.fetchrow(
        _NOTIFY,
        organization_id,
        kind.value,
        key,
        title,
        body,
        None if data is None else json.dumps(data),
        now,
        list(MAIL_ROLES),
    )
    return None if row is None else row["id"]


# ---------------------------------------------------------------- reads and marking read


def encode_cursor(notification_id: uuid.UUID) -> str:
    return validation.id_cursor("notification", notification_id)


@dataclass(frozen=True, slots=True)
class NotificationPage:
    notifications: list[Notification]
    has_next: bool
    unread: int


def _notification(row: Any) -> Notification:
    return Notification(
        id=row.id,
        organization_id=row.organization_id,
        kind=NotificationKind(row.kind),
        title=row.title,
        body=row.body,
        data=row.data,
        created_at=row.created_at,
        read_at=row.read_at,
    )


_COLUMNS = "id, organization_id, kind, title, body, data, created_at, read_at"


async def list_notifications(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    first: int,
    after: str | None,
    unread_only: bool,
    since: date | None = None,
) -> NotificationPage:
    """Newest first (ids are time-ordered UUID v7: a page never shifts when new ones arrive)."""
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    if not 0 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 0 and {MAX_PAGE}", field="first")
    before = None if after is None else validation.id_after("notification", after)
    rows = (
        await session.execute(
            text(
                f"""
                SELECT {_COLUMNS} FROM notifications
                WHERE organization_id = :org
                  AND (CAST(:before AS uuid) IS NULL OR id < CAST(:before AS uuid))
                  AND (NOT :unread_only OR read_at IS NULL)
                  AND (CAST(:since AS date) IS NULL OR created_at >= CAST(:since AS date) AT TIME ZONE 'UTC')
                ORDER BY id DESC LIMIT :limit
                """  # noqa: S608 (constant columns)
            ),
            {
                "org": organization_id,
                "before": before,
                "unread_only": unread_only,
                "since": since,
                "limit": first + 1,
            },
        )
    ).all()
    unread = await _unread(session, organization_id)
    return NotificationPage(
        notifications=[_notification(r) for r in rows[:first]],
        has_next=len(rows) > first,
        unread=unread,
    )


async def _unread(session: AsyncSession, organization_id: uuid.UUID) -> int:
    unread = await session.scalar(
        text("SELECT count(*) FROM notifications WHERE organization_id = :org AND read_at IS NULL"),
        {"org": organization_id},
    )
    return int(unread or 0)


async def get_notification(
    session: AsyncSession, principal: Principal, notification_id: uuid.UUID
) -> Notification | None:
    """The notification, or None when it does not exist or is another organization's."""
    row = (
        await session.execute(
            text(f"SELECT {_COLUMNS} FROM notifications WHERE id = :id"),  # noqa: S608
            {"id": notification_id},
        )
    ).one_or_none()
    if row is None:
        return None
    if not await access.can_view(session, principal, row.organization_id):
        return None
    return _notification(row)


async def mark_read(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    notification_ids: Sequence[uuid.UUID] | None,
) -> tuple[int, int]:
    """Marks the given notifications of the organization (all when None) read: (how many were
    marked now, how many stay unread). Ids of other organizations mark nothing."""
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    if notification_ids is not None and len(notification_ids) > MAX_PAGE:
        raise InvalidInput(f"at most {MAX_PAGE} notificationIds at once", field="notificationIds")
    marked = await session.execute(
        text(
            """
            UPDATE notifications SET read_at = now()
            WHERE organization_id = :org AND read_at IS NULL
              AND (CAST(:ids AS uuid[]) IS NULL OR id = ANY(CAST(:ids AS uuid[])))
            """
        ),
        {"org": organization_id, "ids": None if notification_ids is None else list(notification_ids)},
    )
    count = int(marked.rowcount)  # type: ignore[attr-defined]
    if count:
        await audit.record(
            session,
            principal,
            action="notifications.mark_read",
            organization_id=organization_id,
            target_type="notifications",
            target_id=None,
            after={
                "count": count,
                "ids": None if notification_ids is None else [str(i) for i in notification_ids],
            },
        )
    unread = await _unread(session, organization_id)
    return count, unread


async def set_email_notifications(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID, *, enabled: bool
) -> bool:
    """A member turns e-mail of the organization's notifications on or off for themselves."""
    user = access.require_user(principal)
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    before = await session.scalar(
        text(
            """
            WITH old AS (
                SELECT m.organization_id, m.user_id, m.email_notifications FROM memberships m
                JOIN users u ON u.id = m.user_id
                WHERE u.subject = :subject AND m.organization_id = :org FOR UPDATE OF m
            )
            UPDATE memberships m SET email_notifications = :enabled FROM old
            WHERE m.organization_id = old.organization_id AND m.user_id = old.user_id
            RETURNING old.email_notifications
            """
        ),
        {"enabled": enabled, "subject": user.subject, "org": organization_id},
    )
    if before is None:  # platform staff, not a member
        raise NotFound("you are not a member of this organization")
    if before != enabled:
        await audit.record(
            session,
            principal,
            action="member.email_notifications",
            organization_id=organization_id,
            target_type="member",
            target_id=user.subject,
            before={"email_notifications": before},
            after={"email_notifications": enabled},
        )
    return enabled
