"""Automatic top-ups: an off-session payment on the saved card when the balance falls below a
threshold, or on a weekly or monthly schedule; credited, like every purchase, only by the
payment's webhook.

What keeps it from charging twice or running away:
- At most one top-up in flight per wallet: a PENDING purchase of method 'auto_top_up' is
  unique per organization (index ``purchases_auto_top_up_in_flight``); the starting job also
  checks it under the policy's row lock.
- Each attempt is a purchase under the key of its trigger (``auto-top-up:threshold:<entry
  seq>:<failures>``, ``auto-top-up:schedule:<slot>``): a job that runs twice finds the purchase
  and charges it with the same Stripe idempotency key, so it is charged once.
- The monthly spend cap (a calendar month in UTC): a top-up that would pass it is not made
  (not made smaller either: a partial refill would hide that the cap is reached), and the
  organization is told once per month (SPEND_CAP_REACHED).
- Declines back off (1 h, 4 h, 24 h); the third in a row turns the policy off with a reason.
  A card that needs the customer (authentication) is not retried: the top-up stays in flight
  with a payment page for the customer (PAYMENT_ACTION_REQUIRED), until paid or expired.
- A runaway guard: at most ``auto_top_up_max_per_day`` top-ups per wallet in 24 hours.

Triggers: the threshold listens to the wallet-change signal (``evaluate``); schedules and
retries after a back-off are found by the ``auto_top_up.due`` duty. Both enqueue a
``top_up.start`` job (one queued per organization); ``start_top_up`` is that job.
"""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet import jobs, ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction, transaction_connection
from orgwallet.db.models import Purchase, PurchaseStatus, StripeCustomer
from orgwallet.errors import InvalidInput, NotFound
from orgwallet.jobs import enqueue
from orgwallet.services import access, audit, notifications, pricing, purchases, validation
from orgwallet.services.alerts import Band
from orgwallet.services.notifications import NotificationKind

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime

log = logging.getLogger(__name__)

ACTOR = "system:auto-top-up"
RETRY_DELAYS = (timedelta(hours=1), timedelta(hours=4), timedelta(hours=24))
MAX_CONSECUTIVE_FAILURES = 3
MAX_CAP_MINOR = 9_999_999_999


class AutoTopUpMethod(enum.StrEnum):
    FIXED = "fixed"
    TARGET = "target"


class ScheduleInterval(enum.StrEnum):
    WEEKLY = "weekly"
    MONTHLY = "monthly"


@dataclass(frozen=True, slots=True)
class Schedule:
    interval: ScheduleInterval
    day_of_week: int | None  # WEEKLY: 1 (Monday) .. 7
    day_of_month: int | None  # MONTHLY: 1 .. 28
    hour: int

    def _slot_on(self, day: datetime) -> datetime:
        return day.replace(hour=self.hour, minute=0, second=0, microsecond=0)

    def last_slot(self, now: datetime) -> datetime:
        """The latest time at or before ``now`` that the schedule buys."""
        now = now.astimezone(UTC)
        if self.interval == ScheduleInterval.WEEKLY:
            assert self.day_of_week is not None
            slot = self._slot_on(now - timedelta(days=(now.isoweekday() - self.day_of_week) % 7))
            return slot if slot <= now else slot - timedelta(days=7)
        assert self.day_of_month is not None
        slot = self._slot_on(now.replace(day=self.day_of_month))
        if slot <= now:
            return slot
        year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
        return slot.replace(year=year, month=month)

    def next_slot(self, now: datetime) -> datetime:
        last = self.last_slot(now)
        if self.interval == ScheduleInterval.WEEKLY:
            return last + timedelta(days=7)
        year, month = (last.year, last.month + 1) if last.month < 12 else (last.year + 1, 1)
        return last.replace(year=year, month=month)


@dataclass(frozen=True, slots=True)
class Policy:
    organization_id: uuid.UUID
    enabled: bool
    threshold: int | None
    schedule: Schedule | None
    schedule_done_slot: datetime | None
    method: AutoTopUpMethod
    tokens: int | None
    package_id: uuid.UUID | None
    target_balance: int | None
    monthly_spend_cap_minor: int | None
    currency: str
    consecutive_failures: int
    last_failure_at: datetime | None
    disabled_reason: str | None
    cap_told_month: Any

    def next_retry_at(self) -> datetime | None:
        if not self.consecutive_failures or self.last_failure_at is None:
            return None
        return self.last_failure_at + RETRY_DELAYS[min(self.consecutive_failures, len(RETRY_DELAYS)) - 1]

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "threshold": self.threshold,
            "schedule": None
            if self.schedule is None
            else {
                "interval": self.schedule.interval.value,
                "day_of_week": self.schedule.day_of_week,
                "day_of_month": self.schedule.day_of_month,
                "hour": self.schedule.hour,
            },
            "method": self.method.value,
            "tokens": self.tokens,
            "package_id": str(self.package_id) if self.package_id else None,
            "target_balance": self.target_balance,
            "monthly_spend_cap_minor": self.monthly_spend_cap_minor,
            "disabled_reason": self.disabled_reason,
        }


_COLUMNS = """
    organization_id, enabled, threshold, schedule_interval, schedule_day_of_week,
    schedule_day_of_month, schedule_hour, schedule_done_slot, method, tokens, package_id,
    target_balance, monthly_spend_cap_minor, currency, consecutive_failures, last_failure_at,
    disabled_reason, cap_told_month
"""


def _policy(row: Any) -> Policy:
    schedule = None
    if row.schedule_interval is not None:
        schedule = Schedule(
            ScheduleInterval(row.schedule_interval),
            row.schedule_day_of_week,
            row.schedule_day_of_month,
            row.schedule_hour,
        )
    return Policy(
        organization_id=row.organization_id,
        enabled=row.enabled,
        threshold=row.threshold,
        schedule=schedule,
        schedule_done_slot=row.schedule_done_slot,
        method=AutoTopUpMethod(row.method),
        tokens=row.tokens,
        package_id=row.package_id,
        target_balance=row.target_balance,
        monthly_spend_cap_minor=row.monthly_spend_cap_minor,
        currency=row.currency.strip(),
        consecutive_failures=row.consecutive_failures,
        last_failure_at=row.last_failure_at,
        disabled_reason=row.disabled_reason,
        cap_told_month=row.cap_told_month,
    )


async def _load(session: AsyncSession, organization_id: uuid.UUID, *, lock: bool = False) -> Policy | None:
    row = (
        await session.execute(
            text(
                f"SELECT {_COLUMNS} FROM auto_top_up_policies WHERE organization_id = :org"  # noqa: S608
                + (" FOR UPDATE" if lock else "")
            ),
            {"org": organization_id},
        )
    ).one_or_none()
    return None if row is None else _policy(row)


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def spent_this_month(session: AsyncSession, organization_id: uuid.UUID, now: datetime) -> int:
    """What the month's top-ups cost: those in flight or paid, less what was refunded."""
    spent = await session.scalar(
        text(
            """
            SELECT coalesce(sum(amount_minor - refunded_minor), 0) FROM purchases
            WHERE organization_id = :org AND method = 'auto_top_up' AND created_at >= :since
              AND status IN ('pending', 'paid', 'partially_refunded', 'disputed')
            """
        ),
        {"org": organization_id, "since": month_start(now)},
    )
    return int(spent or 0)


async def _purchase(session: AsyncSession, organization_id: uuid.UUID, which: str) -> Purchase | None:
    order = {"in_flight": "status = 'pending'", "last": "status <> 'pending'"}[which]
    result = await session.execute(
        text(
            f"SELECT id FROM purchases WHERE organization_id = :org AND method = 'auto_top_up' AND {order} "  # noqa: S608
            "ORDER BY id DESC LIMIT 1"
        ),
        {"org": organization_id},
    )
    purchase_id = result.scalar_one_or_none()
    return None if purchase_id is None else await session.get(Purchase, purchase_id)


@dataclass(frozen=True, slots=True)
class PolicyView:
    policy: Policy
    spent_this_month_minor: int
    in_flight: Purchase | None
    last_top_up: Purchase | None
    next_run_at: datetime | None


async def read_policy(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID, now: datetime
) -> PolicyView | None:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    policy = await _load(session, organization_id)
    if policy is None:
        return None
    return PolicyView(
        policy=policy,
        spent_this_month_minor=await spent_this_month(session, organization_id, now),
        in_flight=await _purchase(session, organization_id, "in_flight"),
        last_top_up=await _purchase(session, organization_id, "last"),
        next_run_at=None if policy.schedule is None else policy.schedule.next_slot(now),
    )


# ---------------------------------------------------------------- configuring


def _schedule(
    interval: ScheduleInterval | None, day_of_week: int | None, day_of_month: int | None, hour: int | None
) -> Schedule | None:
    if interval is None:
        return None
    hour = 0 if hour is None else hour
    if not 0 <= hour <= 23:
        raise InvalidInput("hourUtc must be between 0 and 23", field="hourUtc")
    if interval == ScheduleInterval.WEEKLY:
        if day_of_week is None or not 1 <= day_of_week <= 7:
            raise InvalidInput(
                "a weekly schedule needs dayOfWeek between 1 (Monday) and 7", field="dayOfWeek"
            )
        if day_of_month is not None:
            raise InvalidInput("a weekly schedule takes no dayOfMonth", field="dayOfMonth")
        return Schedule(interval, day_of_week, None, hour)
    if day_of_month is None or not 1 <= day_of_month <= 28:
        raise InvalidInput(
            "a monthly schedule needs dayOfMonth between 1 and 28 (every month has it)", field="dayOfMonth"
        )
    if day_of_week is not None:
        raise InvalidInput("a monthly schedule takes no dayOfWeek", field="dayOfWeek")
    return Schedule(interval, None, day_of_month, hour)


async def set_policy(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    organization_id: uuid.UUID,
    *,
    now: datetime,
    enabled: bool,
    threshold: object | None,
    schedule_interval: ScheduleInterval | None,
    day_of_week: int | None,
    day_of_month: int | None,
    hour: int | None,
    method: AutoTopUpMethod,
    tokens: object | None,
    package_id: uuid.UUID | None,
    target_balance: object | None,
    monthly_spend_cap_minor: int | None,
) -> Policy:
    """Sets the organization's policy (all of it). Needs a saved card."""
    await access.authorize(session, principal, organization_id, Permission.TOKENS_CONFIGURE)
    limit = None if threshold is None else validation.token_amount(threshold, field="threshold")
    schedule = _schedule(schedule_interval, day_of_week, day_of_month, hour)
    if limit is None and schedule is None:
        raise InvalidInput("give a threshold, a schedule, or both", field="threshold")
    count = target = None
    currency = settings.currency
    if method == AutoTopUpMethod.FIXED:
        if target_balance is not None:
            raise InvalidInput("targetBalance is for the TARGET method", field="targetBalance")
        if (tokens is None) == (package_id is None):
            raise InvalidInput("a FIXED top-up needs exactly one of tokens and packageId", field="tokens")
        if package_id is not None:
            currency = (await pricing.price_package(session, organization_id, package_id)).package.currency
        else:
            count = (await pricing.price_tokens(session, settings, organization_id, tokens)).tokens
    else:
        if tokens is not None or package_id is not None:
            raise InvalidInput(
                "a TARGET top-up buys what the target needs: no tokens or packageId", field="tokens"
            )
        if target_balance is None:
            raise InvalidInput("a TARGET top-up needs targetBalance", field="targetBalance")
        target = validation.token_amount(target_balance, field="targetBalance")
        if limit is not None and target <= limit:
            raise InvalidInput("targetBalance must be above the threshold", field="targetBalance")
    if monthly_spend_cap_minor is not None and not 1 <= monthly_spend_cap_minor <= MAX_CAP_MINOR:
        raise InvalidInput(
            f"monthlySpendCapMinor must be between 1 and {MAX_CAP_MINOR}", field="monthlySpendCapMinor"
        )
    card = await session.get(StripeCustomer, organization_id)
    if card is None or not card.default_payment_method:
        raise purchases.PaymentMethodRequired(organization_id)
    before = await _load(session, organization_id, lock=True)
    await session.execute(
        text(
            """
            INSERT INTO auto_top_up_policies AS p (
              organization_id, enabled, threshold, schedule_interval, schedule_day_of_week,
              schedule_day_of_month, schedule_hour, schedule_done_slot, method, tokens, package_id,
              target_balance, monthly_spend_cap_minor, currency, updated_by)
            VALUES (:org, :enabled, :threshold, :interval, :dow, :dom, :hour, :done, :method, :tokens,
                    :package, :target, :cap, :currency, :actor)
            ON CONFLICT (organization_id) DO UPDATE SET
              enabled = EXCLUDED.enabled, threshold = EXCLUDED.threshold,
              schedule_interval = EXCLUDED.schedule_interval,
              schedule_day_of_week = EXCLUDED.schedule_day_of_week,
              schedule_day_of_month = EXCLUDED.schedule_day_of_month,
              schedule_hour = EXCLUDED.schedule_hour, schedule_done_slot = EXCLUDED.schedule_done_slot,
              method = EXCLUDED.method, tokens = EXCLUDED.tokens, package_id = EXCLUDED.package_id,
              target_balance = EXCLUDED.target_balance,
              monthly_spend_cap_minor = EXCLUDED.monthly_spend_cap_minor, currency = EXCLUDED.currency,
              updated_by = EXCLUDED.updated_by, updated_at = now(),
              -- set again by a person: the run of failures and the reason it stopped are over
              consecutive_failures = 0, last_failure_at = NULL, disabled_reason = NULL
            """
        ),
        {
            "org": organization_id,
            "enabled": enabled,
            "threshold": limit,
            "interval": None if schedule is None else schedule.interval.value,
            "dow": None if schedule is None else schedule.day_of_week,
            "dom": None if schedule is None else schedule.day_of_month,
            "hour": None if schedule is None else schedule.hour,
            # The slot already past when the schedule is set is not bought: the next one is.
            "done": None if schedule is None else schedule.last_slot(now),
            "method": method.value,
            "tokens": count,
            "package": package_id,
            "target": target,
            "cap": monthly_spend_cap_minor,
            "currency": currency,
            "actor": principal.actor,
        },
    )
    policy = await _load(session, organization_id)
    assert policy is not None
    await audit.record(
        session,
        principal,
        action="auto_top_up.set",
        organization_id=organization_id,
        target_type="auto_top_up_policy",
        target_id=organization_id,
        before=None if before is None else before.snapshot(),
        after=policy.snapshot(),
    )
    await jobs.signal_wallet(session, organization_id)
    return policy


async def disable_policy(session: AsyncSession, principal: Principal, organization_id: uuid.UUID) -> Policy:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_CONFIGURE)
    before = await _load(session, organization_id, lock=True)
    if before is None:
        raise NotFound("the organization has no automatic top-up")
    await session.execute(
        text(
            "UPDATE auto_top_up_policies SET enabled = false, updated_by = :actor, updated_at = now() "
            "WHERE organization_id = :org"
        ),
        {"org": organization_id, "actor": principal.actor},
    )
    policy = await _load(session, organization_id)
    assert policy is not None
    await audit.record(
        session,
        principal,
        action="auto_top_up.disable",
        organization_id=organization_id,
        target_type="auto_top_up_policy",
        target_id=organization_id,
        before=before.snapshot(),
        after=policy.snapshot(),
    )
    return policy


# ---------------------------------------------------------------- triggers


async def _enqueue_start(session: AsyncSession, organization_id: uuid.UUID, trigger: str, key: str) -> None:
    connection = await transaction_connection(session)
    await enqueue(
        connection,
        "top_up.start",
        {"organization_id": str(organization_id), "trigger": trigger, "key": key},
        dedupe_key=f"top-up:{organization_id}",
    )


def _threshold_key(seq: int, policy: Policy) -> str:
    return f"threshold:{seq}:{policy.consecutive_failures}"


async def _in_flight(session: AsyncSession, organization_id: uuid.UUID) -> bool:
    found = await session.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM purchases WHERE organization_id = :org "
            "AND method = 'auto_top_up' AND status = 'pending')"
        ),
        {"org": organization_id},
    )
    return bool(found)


def _backing_off(policy: Policy, now: datetime) -> bool:
    retry = policy.next_retry_at()
    return retry is not None and retry > now


async def evaluate(session: AsyncSession, wallet: ledger.WalletState, seq: int, now: datetime) -> Band:
    """The wallet-change signal's listener (the wallet is locked by the caller): below the
    threshold, a top-up is asked for unless one is in flight or a decline's back-off runs."""
    policy = await _load(session, wallet.organization_id)
    if policy is None or not policy.enabled or policy.threshold is None:
        return Band()
    if wallet.balance >= policy.threshold:
        return Band(below=policy.threshold)
    if not _backing_off(policy, now) and not await _in_flight(session, wallet.organization_id):
        await _enqueue_start(session, wallet.organization_id, "threshold", _threshold_key(seq, policy))
    return Band(at_or_above=policy.threshold)


async def due(runtime: Runtime, now: datetime) -> str:
    """The duty: schedules whose slot has come, and thresholds whose back-off has run out."""
    started = 0
    async with transaction(runtime.sessions) as session:
        rows = (
            await session.execute(
                text(
                    f"""
                    SELECT {_COLUMNS}, w.balance, w.entry_seq,
                           EXISTS (SELECT 1 FROM purchases x WHERE x.organization_id = p.organization_id
                                   AND x.method = 'auto_top_up' AND x.status = 'pending') AS in_flight
                    FROM auto_top_up_policies p JOIN wallets w USING (organization_id)
                    WHERE p.enabled
                    """  # noqa: S608
                )
            )
        ).all()
        for row in rows:
            policy = _policy(row)
            if policy.schedule is not None:
                slot = policy.schedule.last_slot(now)
                if policy.schedule_done_slot is None or slot > policy.schedule_done_slot:
                    await _enqueue_start(
                        session, policy.organization_id, "schedule", f"schedule:{slot.isoformat()}"
                    )
                    started += 1
                    continue
            if (
                policy.threshold is not None
                and row.balance < policy.threshold
                and policy.consecutive_failures
                and not row.in_flight
                and not _backing_off(policy, now)
            ):
                await _enqueue_start(
                    session, policy.organization_id, "threshold", _threshold_key(row.entry_seq, policy)
                )
                started += 1
    return f"asked {started}"


# ---------------------------------------------------------------- the job


@dataclass(frozen=True, slots=True)
class _Order:
    tokens: int
    amount_minor: int
    currency: str
    package_id: uuid.UUID | None


async def _order(session: AsyncSession, settings: Settings, policy: Policy, balance: int) -> _Order | None:
    """What this top-up buys at the organization's price; None when nothing is needed."""
    if policy.method == AutoTopUpMethod.FIXED and policy.package_id is not None:
        priced = await pricing.price_package(session, policy.organization_id, policy.package_id)
        return _Order(priced.package.tokens, priced.price_minor, priced.package.currency, priced.package.id)
    if policy.method == AutoTopUpMethod.FIXED:
        wanted = policy.tokens or 0
    else:
        wanted = (policy.target_balance or 0) - balance
        if wanted <= 0:
            return None
        wanted = min(max(wanted, settings.min_custom_tokens), settings.max_custom_tokens)
    quote = await pricing.price_tokens(session, settings, policy.organization_id, wanted)
    return _Order(quote.tokens, quote.price_minor, quote.currency, None)


async def _refusal(
    session: AsyncSession, runtime: Runtime, policy: Policy, balance: int, trigger: str, now: datetime
) -> str | None:
    if await _in_flight(session, policy.organization_id):
        return "in_flight"
    if _backing_off(policy, now):
        return "backing_off"
    if trigger == "threshold" and (policy.threshold is None or balance >= policy.threshold):
        return "balance_recovered"
    made_today = await session.scalar(
        text(
            "SELECT count(*) FROM purchases WHERE organization_id = :org AND method = 'auto_top_up' "
            "AND created_at > :since"
        ),
        {"org": policy.organization_id, "since": now - timedelta(days=1)},
    )
    if (made_today or 0) >= runtime.settings.auto_top_up_max_per_day:
        log.warning(
            "auto top-up of %s refused by the runaway guard: %s top-ups in 24 h",
            policy.organization_id,
            made_today,
        )
        return "runaway_guard"
    return None


async def _cap_reached(session: AsyncSession, policy: Policy, order: _Order, now: datetime) -> bool:
    cap = policy.monthly_spend_cap_minor
    if cap is None:
        return False
    spent = await spent_this_month(session, policy.organization_id, now)
    if spent + order.amount_minor <= cap:
        return False
    month = month_start(now).date()
    if policy.cap_told_month != month:
        await session.execute(
            text("UPDATE auto_top_up_policies SET cap_told_month = :month WHERE organization_id = :org"),
            {"month": month, "org": policy.organization_id},
        )
        await notifications.notify(
            session,
            policy.organization_id,
            NotificationKind.SPEND_CAP_REACHED,
            key=f"spend-cap:{month.isoformat()}",
            title="Automatic top-ups paused for this month",
            body=(
                f"A top-up of {order.tokens:,} tokens would pass this month's spending cap "
                f"({spent} of {cap} minor units spent): none is made until next month or a higher cap."
            ),
            data={"capMinor": cap, "spentMinor": spent, "tokens": order.tokens, "month": month.isoformat()},
            now=now,
        )
    return True


async def start_top_up(runtime: Runtime, organization_id: uuid.UUID, trigger: str, key: str) -> str:
    """The ``top_up.start`` job: decides, records the purchase (committed), then charges the saved
    card with no transaction open. Run again, it finds its purchase by the key and charges it
    (Stripe's idempotency key is the purchase's) or leaves it as it is."""
    now = runtime.clock.now()
    purchase_key = f"auto-top-up:{key}"
    async with transaction(runtime.sessions) as session:
        policy = await _load(session, organization_id, lock=True)
        if policy is None or not policy.enabled:
            return "disabled"
        purchase = await purchases.purchase_by_key(session, organization_id, purchase_key)
        if purchase is None:
            if trigger == "schedule" and policy.schedule is not None:
                slot = policy.schedule.last_slot(now)
                if policy.schedule_done_slot is not None and slot <= policy.schedule_done_slot:
                    return "slot_done"
                await session.execute(
                    text(
                        "UPDATE auto_top_up_policies SET schedule_done_slot = :slot "
                        "WHERE organization_id = :org"
                    ),
                    {"slot": slot, "org": organization_id},
                )
            wallet_id = await session.scalar(
                text("SELECT id FROM wallets WHERE organization_id = :org"), {"org": organization_id}
            )
            locked = await ledger.lock_wallet(session, wallet_id)
            assert locked is not None
            balance = locked[0].balance
            refusal = await _refusal(session, runtime, policy, balance, trigger, now)
            if refusal is not None:
                return refusal
            order = await _order(session, runtime.settings, policy, balance)
            if order is None:
                return "target_reached"
            if await _cap_reached(session, policy, order, now):
                return "cap_reached"
            card = await session.get(StripeCustomer, organization_id)
            if card is None or not card.default_payment_method:
                await _turn_off(session, policy, "no saved card to charge", purchase_id=None)
                return "no_card"
            purchase = await purchases.insert_auto_top_up(
                session,
                organization_id,
                tokens=order.tokens,
                amount_minor=order.amount_minor,
                currency=order.currency,
                package_id=order.package_id,
                key=purchase_key,
                actor=ACTOR,
                trigger=trigger,
            )
        customer = await session.get(StripeCustomer, organization_id)
    if purchase.status != PurchaseStatus.PENDING:
        return "settled"
    if customer is None or not customer.default_payment_method:
        return "no_card"
    if purchase.payment_intent_id is None:
        outcome = await purchases.charge_saved_card(
            runtime.sessions,
            runtime.gateway,
            purchase,
            customer.customer_id,
            customer.default_payment_method,
            now=now,
        )
        purchase = outcome.purchase
        if outcome.provider_error is not None:
            return "provider_failed"
        if outcome.declined is not None and not purchases.needs_action(purchase):
            return "declined"
    if purchases.needs_action(purchase) and purchase.action_url is None:
        await purchases.open_action_page(runtime.sessions, runtime.gateway, runtime.settings, purchase)
        return "action_required"
    return "charged"


# ---------------------------------------------------------------- outcomes (purchases calls these)


async def on_paid(session: AsyncSession, purchase: Purchase) -> None:
    await session.execute(
        text(
            "UPDATE auto_top_up_policies SET consecutive_failures = 0, last_failure_at = NULL "
            "WHERE organization_id = :org"
        ),
        {"org": purchase.organization_id},
    )
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.AUTO_TOP_UP_SUCCEEDED,
        key=f"top-up-paid:{purchase.id}",
        title=f"Topped up: {purchase.tokens:,} tokens",
        body=f"An automatic top-up ({purchase.reference}) added {purchase.tokens:,} tokens to the wallet.",
        data={"purchaseId": str(purchase.id), "reference": purchase.reference, "tokens": purchase.tokens},
    )
    await jobs.signal_wallet(session, purchase.organization_id)


async def on_failed(session: AsyncSession, purchase: Purchase, now: datetime | None) -> None:
    """A top-up that did not get paid (declined, or its payment page expired): the policy backs
    off from ``now`` (the runtime's clock; the database's when the caller has none), and turns
    itself off after MAX_CONSECUTIVE_FAILURES in a row."""
    row = (
        await session.execute(
            text(
                f"""
                UPDATE auto_top_up_policies SET consecutive_failures = consecutive_failures + 1,
                    last_failure_at = coalesce(CAST(:now AS timestamptz), now())
                WHERE organization_id = :org RETURNING {_COLUMNS}
                """  # noqa: S608
            ),
            {"org": purchase.organization_id, "now": now},
        )
    ).one_or_none()
    if row is None:
        return
    policy = _policy(row)
    retry = policy.next_retry_at()
    reason = purchase.failure_reason or "the payment failed"
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.AUTO_TOP_UP_FAILED,
        key=f"top-up-failed:{purchase.id}",
        title="An automatic top-up failed",
        body=f"The top-up {purchase.reference} was not paid: {reason}."
        + (f" It is tried again after {retry:%Y-%m-%d %H:%M} UTC." if retry and policy.enabled else ""),
        data={
            "purchaseId": str(purchase.id),
            "reference": purchase.reference,
            "reason": purchase.failure_reason,
        },
    )
    if policy.enabled and policy.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
        await _turn_off(
            session,
            policy,
            f"{policy.consecutive_failures} top-ups in a row were not paid; the last: "
            f"{purchase.failure_reason or 'the payment failed'}",
            purchase_id=purchase.id,
        )
    await jobs.signal_wallet(session, purchase.organization_id)


async def _turn_off(
    session: AsyncSession, policy: Policy, reason: str, *, purchase_id: uuid.UUID | None
) -> None:
    await session.execute(
        text(
            "UPDATE auto_top_up_policies SET enabled = false, disabled_reason = :reason, updated_at = now(), "
            "updated_by = :actor WHERE organization_id = :org"
        ),
        {"reason": reason[:1000], "org": policy.organization_id, "actor": ACTOR},
    )
    await audit.record(
        session,
        ACTOR,
        action="auto_top_up.disabled",
        organization_id=policy.organization_id,
        target_type="auto_top_up_policy",
        target_id=policy.organization_id,
        before=policy.snapshot(),
        after=policy.snapshot() | {"enabled": False, "disabled_reason": reason},
    )
    await notifications.notify(
        session,
        policy.organization_id,
        NotificationKind.AUTO_TOP_UP_DISABLED,
        key=f"top-up-disabled:{purchase_id or uuid.uuid4()}",
        title="Automatic top-ups turned off",
        body=f"Automatic top-ups were turned off: {reason}. Check the saved card, then set them again.",
        data={"reason": reason},
    )
