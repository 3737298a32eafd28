"""Low-balance alerts: several thresholds per organization, each firing once when the available
balance falls below it and re-arming only when the balance is back at or above it.

Alerts listen to the wallet-change signal (``jobs.signal``). ``evaluate`` runs with the wallet
locked, so the balance it sees cannot move until it commits: it fires the armed alerts above
the balance (one notification each, keyed by the alert and its firing count), re-arms the
fired ones the balance is back at, and returns the band of balances it must hear about next.
A balance that hovers around a threshold therefore notifies once per real crossing, and a
burst of consumptions crossing it produces one signal and one notification.

Besides the organization's thresholds there is one built-in watch, ``depleted`` (threshold 1:
the balance reached zero), made on first need and not listed as an alert.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet import jobs, ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.errors import Conflict, InvalidInput, NotFound
from orgwallet.services import access, audit, notifications, validation
from orgwallet.services.notifications import NotificationKind

#: The actor of what the wallet-change signal's listener changes (an alert that fires).
ACTOR = "system:balance-alerts"


@dataclass(frozen=True, slots=True)
class BalanceAlert:
    id: uuid.UUID
    organization_id: uuid.UUID
    threshold: int
    armed: bool
    last_fired_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Band:
    """Balances a listener wants to hear about: below ``below``, or at or above ``at_or_above``."""

    below: int | None = None
    at_or_above: int | None = None

    def join(self, other: Band) -> Band:
        return Band(
            below=_max(self.below, other.below), at_or_above=_min(self.at_or_above, other.at_or_above)
        )


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


_COLUMNS = "id, organization_id, threshold, armed, last_fired_at, created_at"


def _alert(row: Any) -> BalanceAlert:
    return BalanceAlert(
        id=row.id,
        organization_id=row.organization_id,
        threshold=row.threshold,
        armed=row.armed,
        last_fired_at=row.last_fired_at,
        created_at=row.created_at,
    )


async def list_alerts(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> list[BalanceAlert]:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    rows = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM balance_alerts WHERE organization_id = :org AND kind = 'low' "  # noqa: S608
            "ORDER BY threshold DESC"
        ),
        {"org": organization_id},
    )
    return [_alert(r) for r in rows]


async def get_alert(session: AsyncSession, principal: Principal, alert_id: uuid.UUID) -> BalanceAlert | None:
    row = (
        await session.execute(
            text(f"SELECT {_COLUMNS} FROM balance_alerts WHERE id = :id AND kind = 'low'"),  # noqa: S608
            {"id": alert_id},
        )
    ).one_or_none()
    if row is None:
        return None
    if not await access.can_view(session, principal, row.organization_id):
        return None
    return _alert(row)


async def add_alert(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    organization_id: uuid.UUID,
    threshold: object,
) -> BalanceAlert:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_CONFIGURE)
    value = validation.token_amount(threshold, field="threshold")
    count = await session.scalar(
        text("SELECT count(*) FROM balance_alerts WHERE organization_id = :org AND kind = 'low'"),
        {"org": organization_id},
    )
    if (count or 0) >= settings.max_balance_alerts:
        raise InvalidInput(
            f"an organization has at most {settings.max_balance_alerts} balance alerts", field="threshold"
        )
    row = (
        await session.execute(
            text(
                f"""
                INSERT INTO balance_alerts (organization_id, kind, threshold, created_by)
                VALUES (:org, 'low', :threshold, :actor)
                ON CONFLICT (organization_id, kind, threshold) DO NOTHING
                RETURNING {_COLUMNS}
                """  # noqa: S608
            ),
            {"org": organization_id, "threshold": value, "actor": principal.actor},
        )
    ).one_or_none()
    if row is None:
        raise Conflict(f"an alert at {value} tokens exists already")
    await jobs.signal_wallet(session, organization_id)
    await audit.record(
        session,
        principal,
        action="balance_alert.add",
        organization_id=organization_id,
        target_type="balance_alert",
        target_id=row.id,
        after={"threshold": value},
    )
    return _alert(row)


async def remove_alert(session: AsyncSession, principal: Principal, alert_id: uuid.UUID) -> uuid.UUID:
    alert = await get_alert(session, principal, alert_id)
    if alert is None:
        raise NotFound("balance alert not found")
    await access.authorize(session, principal, alert.organization_id, Permission.TOKENS_CONFIGURE)
    await session.execute(text("DELETE FROM balance_alerts WHERE id = :id"), {"id": alert_id})
    await jobs.signal_wallet(session, alert.organization_id)
    await audit.record(
        session,
        principal,
        action="balance_alert.remove",
        organization_id=alert.organization_id,
        target_type="balance_alert",
        target_id=alert_id,
        before={"threshold": alert.threshold},
    )
    return alert_id


# ---------------------------------------------------------------- the listener


async def evaluate(
    session: AsyncSession,
    wallet: ledger.WalletState,
    seq: int,
    *,
    low_water: int | None,
    signal_seq: int | None,
    now: datetime,
) -> Band:
    """Fires and re-arms the organization's alerts for the wallet's balance (the wallet is
    locked by the caller). ``low_water``: the balance that raised the signal, at entry
    ``signal_seq``: a dip below a threshold that was refilled before this ran still fires,
    once (an alert evaluated at or after that entry ignores it: a job delivered twice)."""
    organization_id = wallet.organization_id
    await session.execute(
        text(
            "INSERT INTO balance_alerts (organization_id, kind, threshold) VALUES (:org, 'depleted', 1) "
            "ON CONFLICT DO NOTHING"
        ),
        {"org": organization_id},
    )
    rows = (
        await session.execute(
            text(
                "SELECT id, kind, threshold, armed, fired_count, checked_seq FROM balance_alerts "
                "WHERE organization_id = :org ORDER BY threshold DESC FOR UPDATE"
            ),
            {"org": organization_id},
        )
    ).all()
    balance = wallet.balance
    band = Band()
    for row in rows:
        lowest = balance
        if low_water is not None and signal_seq is not None and signal_seq > row.checked_seq:
            lowest = min(balance, low_water)
        armed, fired = row.armed, row.fired_count
        if armed and lowest < row.threshold:
            fired += 1
            await _fire(session, row, wallet, fired, now)
            armed = False
        if not armed and balance >= row.threshold:
            armed = True  # back at or above: ready for the next crossing
        await session.execute(
            text(
                "UPDATE balance_alerts SET armed = :armed, fired_count = :fired, checked_seq = :seq, "
                "last_fired_at = CASE WHEN :fired > fired_count THEN CAST(:now AS timestamptz) "
                "ELSE last_fired_at END WHERE id = :id"
            ),
            {"armed": armed, "fired": fired, "seq": seq, "now": now, "id": row.id},
        )
        band = band.join(Band(below=row.threshold) if armed else Band(at_or_above=row.threshold))
    return band


async def _fire(
    session: AsyncSession, row: Any, wallet: ledger.WalletState, fired: int, now: datetime
) -> None:
    if row.kind == "depleted":
        kind = NotificationKind.BALANCE_DEPLETED
        title = "No tokens left"
        body = (
            "The organization's wallet has no tokens left: consumptions are refused until "
            "tokens are bought or granted."
        )
    else:
        kind = NotificationKind.LOW_BALANCE
        title = f"Balance below {row.threshold:,} tokens"
        body = (
            f"The available balance is {wallet.balance:,} tokens, below the alert set at "
            f"{row.threshold:,} tokens."
        )
    await notifications.notify(
        session,
        wallet.organization_id,
        kind,
        key=f"alert:{row.id}:{fired}",
        title=title,
        body=body,
        data={"threshold": row.threshold, "balance": wallet.balance, "alertId": str(row.id)},
        now=now,
    )
    await audit.record(
        session,
        ACTOR,
        action="balance_alert.fire",
        organization_id=wallet.organization_id,
        target_type="balance_alert",
        target_id=row.id,
        before={"armed": True, "fired_count": fired - 1},
        after={"armed": False, "fired_count": fired, "balance": wallet.balance, "threshold": row.threshold},
    )
