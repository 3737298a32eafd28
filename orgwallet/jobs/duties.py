"""Periodic duties: each runs once per period, however many workers tick.

Every worker ticks (on start, then on PgQueuer's cron schedule ``ORGWALLET_DUTY_TICK_CRON``,
and whenever a ``duties.tick`` job arrives). A tick reads the runtime's clock and, for each
duty, claims the row (duty, start of the current period) in ``duty_runs``: the first tick of a
period inserts it and enqueues the ``duty.run`` job in the same transaction; every other tick
of that period finds the row and does nothing. Each duty does all that is due up to now, so
periods missed while no worker ran are caught up by one run, the first tick's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import text

from orgwallet.db.engine import transaction
from orgwallet.jobs import enqueue
from orgwallet.services import autotopup, forecast, mail, notifications, purchases, subscriptions, wallets
from orgwallet.services.notifications import NotificationKind
from orgwallet.webhooks.stripe import handle_event

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

#: A failed Stripe event is retried here once Stripe's own delivery had this long to land.
STRIPE_RETRY_AFTER = timedelta(minutes=1)
STRIPE_MAX_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Duty:
    name: str
    period: timedelta
    run: Callable[[Runtime, datetime], Awaitable[str]]


def period_start(now: datetime, period: timedelta) -> datetime:
    """The start of the period holding ``now`` (periods counted from 2000-01-01 UTC)."""
    return EPOCH + period * ((now - EPOCH) // period)


async def sweep_expired(runtime: Runtime, now: datetime) -> str:
    """Expired credit lots and reservations are returned (today also done on touch)."""
    settled = await wallets.sweep_expired(runtime.sessions, now)
    return f"settled {settled}"


async def retry_stripe_events(runtime: Runtime, now: datetime) -> str:
    """Stripe events whose handling failed are handled again (the handling is idempotent:
    the event's claim and each effect's key)."""
    async with runtime.driver.acquire() as connection:
        rows = await connection.fetch(
            "SELECT payload FROM stripe_events WHERE handled_at IS NULL AND received_at <= $1 "
            "AND attempts < $2 ORDER BY received_at LIMIT 500",
            now - STRIPE_RETRY_AFTER,
            STRIPE_MAX_ATTEMPTS,
        )
    handled = 0
    for row in rows:
        event = row["payload"]
        status, _ = await handle_event(
            runtime.sessions,
            runtime.gateway,
            event,
            json.dumps(event),
            runtime.clock.now(),
            subscriptions.grace_period(runtime),
        )
        handled += status < 300
    return f"handled {handled} of {len(rows)}"


async def remind_expiring_tokens(runtime: Runtime, now: datetime) -> str:
    """Tells an organization, once per lot, that its tokens expire within the next days."""
    days = runtime.settings.expiring_reminder_days
    async with transaction(runtime.sessions) as session:
        lots = (
            await session.execute(
                text(
                    """
                    SELECT l.id, l.remaining, l.expires_at, l.source, w.organization_id
                    FROM credit_lots l JOIN wallets w ON w.id = l.wallet_id
                    WHERE l.remaining > 0 AND l.expires_at > :now
                      AND l.expires_at <= :now + make_interval(days => :days)
                    """
                ),
                {"now": now, "days": days},
            )
        ).all()
        created = 0
        for lot in lots:
            when = lot.expires_at.astimezone(UTC)
            created += (
                await notifications.notify(
                    session,
                    lot.organization_id,
                    NotificationKind.TOKENS_EXPIRING,
                    key=f"expiring:{lot.id}",
                    title=f"{lot.remaining:,} tokens expire on {when:%Y-%m-%d}",
                    body=(
                        f"{lot.remaining:,} tokens of a {lot.source} grant expire on "
                        f"{when:%Y-%m-%d %H:%M} UTC. Tokens are spent from the grants that expire "
                        "soonest first."
                    ),
                    data={"lotId": str(lot.id), "tokens": lot.remaining, "expiresAt": when.isoformat()},
                    now=now,
                )
                is not None
            )
    return f"notified {created}"


async def remove_abandoned_purchases(runtime: Runtime, now: datetime) -> str:
    """Checkout purchases whose Stripe session never came (see ``purchases.remove_abandoned``)."""
    return f"removed {await purchases.remove_abandoned(runtime.sessions, now)}"


async def retry_emails(runtime: Runtime, now: datetime) -> str:
    """E-mails whose retry is due are sent again (one ``mail.send`` job each)."""
    due = await mail.due_emails(runtime.driver, now)
    async with runtime.driver.acquire() as connection:
        for email_id in due:
            await enqueue(
                connection, "mail.send", {"email_id": str(email_id)}, dedupe_key=f"email:{email_id}"
            )
    return f"queued {len(due)}"


async def record_usage_days(runtime: Runtime, now: datetime) -> str:
    """Each wallet's consumption of the completed UTC days, for the usage forecast (missed days
    caught up, the ledger's history counted on the first run): ``forecast.record_usage_days``."""
    return await forecast.record_usage_days(runtime.driver, now)


DUTIES: dict[str, Duty] = {
    duty.name: duty
    for duty in (
        Duty("ledger.sweep", timedelta(minutes=5), sweep_expired),
        Duty("stripe.retry", timedelta(minutes=5), retry_stripe_events),
        Duty("tokens.expiring", timedelta(days=1), remind_expiring_tokens),
        Duty("mail.retry", timedelta(minutes=1), retry_emails),
        Duty("auto_top_up.due", timedelta(minutes=1), autotopup.due),
        Duty("purchases.abandoned", timedelta(minutes=15), remove_abandoned_purchases),
        Duty("usage.days", timedelta(days=1), record_usage_days),
        Duty("subscriptions.grace", timedelta(minutes=5), subscriptions.end_grace),
        Duty("subscriptions.remind", timedelta(hours=1), subscriptions.send_reminders),
    )
}

_CLAIM = """
    INSERT INTO duty_runs (duty, period_start) VALUES ($1, $2)
    ON CONFLICT (duty, period_start) DO NOTHING RETURNING duty
"""


async def tick(runtime: Runtime) -> list[str]:
    """Claims the current period of every duty not yet claimed and enqueues its run: the names
    of the duties this tick started."""
    now = runtime.clock.now()
    started: list[str] = []
    async with runtime.driver.acquire() as connection, connection.transaction():
        for duty in DUTIES.values():
            start = period_start(now, duty.period)
            if await connection.fetchval(_CLAIM, duty.name, start) is None:
                continue
            await enqueue(connection, "duty.run", {"duty": duty.name, "period_start": start.isoformat()})
            started.append(duty.name)
    return started


async def run_duty(runtime: Runtime, name: str, period: datetime) -> str:
    """Runs a claimed duty (the ``duty.run`` job) and records its outcome on its period's row."""
    duty = DUTIES[name]
    outcome = await duty.run(runtime, runtime.clock.now())
    async with runtime.driver.acquire() as connection:
        await connection.execute(
            "UPDATE duty_runs SET finished_at = now(), outcome = $3, runs = runs + 1"
            " WHERE duty = $1 AND period_start = $2",
            name,
            period,
            outcome,
        )
    log.info("duty %s for %s: %s", name, period.isoformat(), outcome)
    return outcome
