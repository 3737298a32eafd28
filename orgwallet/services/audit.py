"""The audit log: one append-only row per change, written in the transaction of the change.

``record`` is the one writer. Its actor is the principal of a mutation (a person's subject, an
API key's ``apikey:<id>``), ``stripe`` for what a Stripe event changes, or a job's name
(``system:...``). The request id comes from ``request_id_var``: the HTTP request's
(``X-Request-ID``), the Stripe event's id while an event is handled, ``job:<id>`` while a job
runs. A statement that must write its row in its own round trip (a paid purchase's, sent on
the driver) embeds ``driver_insert`` and sends ``driver_values`` of the same ``entry``.

Reading is for the organization's owners and admins and for platform staff
(``READ_PERMISSION``), newest first, in pages keyed on the time-ordered ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from uuid6 import uuid7

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.db.models import AuditEntry
from orgwallet.errors import InvalidInput, OrgWalletError
from orgwallet.services import access, validation

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

STRIPE_ACTOR = "stripe"

#: Owners and admins hold it, API keys never can (no key carries members.manage), platform
#: staff hold every permission: exactly who may read the log.
READ_PERMISSION = Permission.MEMBERS_MANAGE

MAX_PAGE = 200
MAX_ACTIONS = 50

Actor = Principal | str


def entry(
    actor: Actor,
    *,
    action: str,
    organization_id: uuid.UUID | None,
    target_type: str,
    target_id: object | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEntry:
    """The row, the one place its time, id and request id are decided."""
    return AuditEntry(
        id=uuid7(),
        at=datetime.now(UTC),
        actor=actor if isinstance(actor, str) else actor.actor,
        action=action,
        organization_id=organization_id,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        before=before,
        after=after,
        request_id=request_id_var.get(),
    )


async def record(
    session: AsyncSession,
    actor: Actor,
    *,
    action: str,
    organization_id: uuid.UUID | None,
    target_type: str,
    target_id: object | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Adds the row to the session's unit of work: it commits, or rolls back, with the change."""
    session.add(
        entry(
            actor,
            action=action,
            organization_id=organization_id,
            target_type=target_type,
            target_id=target_id,
            before=before,
            after=after,
        )
    )


# Column, and the cast its driver parameter takes (jsonb is sent as text: a session's driver
# connection has no JSON codec).
_COLUMNS = (
    ("id", "uuid"),
    ("at", "timestamptz"),
    ("actor", "text"),
    ("action", "text"),
    ("organization_id", "uuid"),
    ("target_type", "text"),
    ("target_id", "text"),
    ("before", "jsonb"),
    ("after", "jsonb"),
    ("request_id", "text"),
)


def driver_insert(first: int, *, after_extra: str = "", source: str = "") -> str:
    """``INSERT INTO audit_log ... SELECT`` of one row whose values are the parameters
    ``$first`` onwards, in ``driver_values``' order: for a statement that writes its audit row
    in the same round trip. ``after_extra``: jsonb that SQL merges into ``after`` (``|| ...``);
    ``source``: a ``FROM`` clause the row is selected from (no row written when it is empty)."""
    values = []
    for offset, (name, cast) in enumerate(_COLUMNS):
        parameter = f"${first + offset}"
        value = f"CAST({parameter}::text AS jsonb)" if cast == "jsonb" else f"{parameter}::{cast}"
        if name == "after" and after_extra:
            value = f"{value} || {after_extra}"
        values.append(value)
    columns = ", ".join(name for name, _ in _COLUMNS)
    return f"INSERT INTO audit_log ({columns}) SELECT {', '.join(values)} {source}"


def driver_values(row: AuditEntry) -> list[Any]:
    """The parameters of ``driver_insert`` for ``row`` (an ``entry``)."""
    return [
        row.id,
        row.at,
        row.actor,
        row.action,
        row.organization_id,
        row.target_type,
        row.target_id,
        None if row.before is None else json.dumps(row.before),
        None if row.after is None else json.dumps(row.after),
        row.request_id,
    ]


# ---------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: uuid.UUID
    at: datetime
    actor: str
    action: str
    organization_id: uuid.UUID | None
    target_type: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: list[AuditEvent]
    has_next: bool


_SELECT = (
    "SELECT id, at, actor, action, organization_id, target_type, target_id, before, after, request_id"
    " FROM audit_log"
)


def _event(record: Any) -> AuditEvent:
    return AuditEvent(*record)


def encode_cursor(event_id: uuid.UUID) -> str:
    return validation.id_cursor("audit", event_id)


def actions_filter(actions: Sequence[str] | None) -> list[str] | None:
    """The ``actions`` to keep (None: all), checked: a few names of at most 100 characters."""
    if actions is None:
        return None
    if len(actions) > MAX_ACTIONS:
        raise InvalidInput(f"at most {MAX_ACTIONS} actions", field="actions")
    return [validation.text(action, "actions", max_length=100) for action in actions]


async def events_page(
    connection: Any,
    organization_id: uuid.UUID,
    *,
    first: int,
    before_id: uuid.UUID | None,
    actions: list[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> AuditPage:
    """One page, newest first, on the driver (``DriverPool``'s connection, with its JSON codec):
    the events before ``before_id`` whose action is one of ``actions`` and whose time is in
    [since, until). Ids are time-ordered (UUID v7): a page never shifts when rows arrive. The
    organization's index on (organization_id, id) or (organization_id, action, id) serves it."""
    conditions = [f"{_SELECT} WHERE organization_id = $1"]
    params: list[Any] = [organization_id]
    for condition, value in (
        ("id < ${}", before_id),
        ("action = ANY(${}::text[])", actions),
        ("at >= ${}", since),
        ("at < ${}", until),
    ):
        if value is not None:
            params.append(value)
            conditions.append(condition.format(len(params)))
    params.append(first + 1)
    rows = await connection.fetch(
        " AND ".join(conditions) + f" ORDER BY id DESC LIMIT ${len(params)}", *params
    )
    return AuditPage(events=[_event(r) for r in rows[:first]], has_next=len(rows) > first)


async def list_events(
    connection: Any,
    granted: access.Access,
    *,
    first: int,
    after: str | None,
    actions: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> AuditPage:
    """``Organization.auditLog``: ``granted`` is the caller's access to the organization, read
    already (``Context.authorize``)."""
    access.check(granted, READ_PERMISSION)
    if not 1 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 1 and {MAX_PAGE}", field="first")
    since, until = validation.time_window(since, until)
    return await events_page(
        connection,
        granted.organization_id,
        first=first,
        before_id=None if after is None else validation.id_after("audit", after),
        actions=actions_filter(actions),
        since=since,
        until=until,
    )


async def get_event(session: AsyncSession, principal: Principal, event_id: uuid.UUID) -> AuditEvent | None:
    """The event, or None when it does not exist or the caller may not read its organization's log."""
    row = await session.get(AuditEntry, event_id)
    if row is None or row.organization_id is None:
        return None
    try:
        await access.authorize(session, principal, row.organization_id, READ_PERMISSION)
    except OrgWalletError:
        return None
    return AuditEvent(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        organization_id=row.organization_id,
        target_type=row.target_type,
        target_id=row.target_id,
        before=row.before,
        after=row.after,
        request_id=row.request_id,
    )
