"""Subscriptions: an organization's Stripe subscription to a plan.

Stripe bills; this module keeps a copy of Stripe's subscription and grants tokens.

- **State comes from Stripe's object**, never from the order of events. Every event about a
  subscription makes the webhook read the subscription from Stripe first (no transaction
  open) after taking a number from ``subscription_sync_seq``; ``apply_subscription`` writes
  it only when that number is above the row's ``sync_seq``. A read begun earlier never
  overwrites one begun later, and the last event's read, begun after Stripe's last change,
  is the state that stays. Mutations do the same with the object Stripe answers.
- **Tokens are granted only by ``invoice.paid``**, once per invoice (the ledger key
  ``subscription-invoice:<invoice id>``): a new period's allowance for ``subscription_create``
  and ``subscription_cycle``; for an upgrade (``subscription_update``), the difference of the
  two plans' allowances prorated as Stripe prorates the money (the time left in the period).
- **The plan in force** (``plan_id``) is what the current period was paid for. An upgrade
  takes effect at once (Stripe charged it); a downgrade moves Stripe's item to the cheaper
  price with no proration, so the next renewal bills it, and is ``scheduled_plan_id`` here
  until that renewal is paid.
- **Unlimited plans** cover the wallet's consumptions (``ledger.set_coverage``) while ACTIVE or
  TRIALING (until the period's end plus the grace period, so a renewal paid late does not
  interrupt it), or PAST_DUE until ``grace_ends_at``.
- **Failed renewals:** PAST_DUE starts ``grace_ends_at`` (``subscription_grace_days``). Past it,
  ``end_grace`` (the ``subscriptions.grace`` duty) cancels through Stripe and suspends the
  wallet; that invoice paid later reactivates it, unless platform staff have since taken
  the wallet's status over (``wallets.set_wallet_status``).
- **Reminders:** ``send_reminders`` (the ``subscriptions.remind`` duty) tells the organization
  once per period, ``subscription_reminder_days`` before the renewal.

No Stripe call is made while a transaction is open (the gateway refuses it).
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import stripe
from sqlalchemy import delete, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.db.engine import transaction
from orgwallet.db.models import (
    Subscription,
    SubscriptionInvoice,
    SubscriptionPlan,
    SubscriptionStatus,
    Wallet,
    WalletStatus,
)
from orgwallet.errors import Conflict, InvalidInput, NotFound
from orgwallet.payments import fields
from orgwallet.payments.gateway import CheckoutLink, StripeGateway, declined
from orgwallet.services import access, audit, notifications, plans, purchases, validation, wallets
from orgwallet.services.notifications import NotificationKind
from orgwallet.services.purchases import PaymentProviderError

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

GRANT_KEY = "subscription-invoice:"  # + the Stripe invoice id: the ledger key of its grant
LIVE = (SubscriptionStatus.ACTIVE.value, SubscriptionStatus.TRIALING.value)
COVERED_STATUSES = frozenset({SubscriptionStatus.ACTIVE.value, SubscriptionStatus.TRIALING.value})
GRACE_ACTOR = "system:subscriptions.grace"
REMIND_ACTOR = "system:subscriptions.remind"
MAX_PAGE = 100

#: An invoice's status never goes back (a replayed ``invoice.finalized`` after ``invoice.paid``).
_INVOICE_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _now() -> datetime:
    return datetime.now(UTC)


def as_json(obj: Any) -> JsonObject:
    """A Stripe SDK object as the plain JSON a webhook carries."""
    if isinstance(obj, dict):
        return obj
    converted: JsonObject = obj.to_dict()
    return converted


# ---------------------------------------------------------------- reading


async def _plan(session: AsyncSession, plan_id: uuid.UUID) -> SubscriptionPlan:
    plan = await session.get(SubscriptionPlan, plan_id)
    assert plan is not None  # plans are archived, never deleted
    return plan


def priced(plan: SubscriptionPlan, organization_id: uuid.UUID) -> plans.PricedPlan:
    return plans.PricedPlan(plan, plans.organization_plan_price(plan, organization_id))


async def current(session: AsyncSession, organization_id: uuid.UUID) -> Subscription | None:
    """The organization's subscription that is not CANCELED, if any (no authorization: the
    caller reached the organization)."""
    return (
        await session.execute(
            select(Subscription)
            .where(
                col(Subscription.organization_id) == organization_id,
                col(Subscription.status) != SubscriptionStatus.CANCELED.value,
            )
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def get_subscription(
    session: AsyncSession, principal: Principal, subscription_id: uuid.UUID
) -> Subscription | None:
    """One subscription, for whoever may see its organization's wallet."""
    row = await session.get(Subscription, subscription_id, populate_existing=True)
    if row is None or not await access.can_view(session, principal, row.organization_id):
        return None
    return row


async def get_invoice(
    session: AsyncSession, principal: Principal, invoice_id: uuid.UUID
) -> SubscriptionInvoice | None:
    row = await session.get(SubscriptionInvoice, invoice_id, populate_existing=True)
    if row is None or await get_subscription(session, principal, row.subscription_id) is None:
        return None
    return row


@dataclass(frozen=True, slots=True)
class InvoicePage:
    invoices: list[SubscriptionInvoice]
    has_next: bool


def encode_cursor(invoice: SubscriptionInvoice) -> str:
    raw = f"{invoice.period_start.isoformat()}|{invoice.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        start, _, invoice_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(start), uuid.UUID(invoice_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("after is not a valid cursor", field="after") from None


async def invoices_page(
    session: AsyncSession, subscription_id: uuid.UUID, *, first: int, after: str | None
) -> InvoicePage:
    """Newest period first."""
    if not 0 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 0 and {MAX_PAGE}", field="first")
    statement = select(SubscriptionInvoice).where(col(SubscriptionInvoice.subscription_id) == subscription_id)
    if after is not None:
        start, invoice_id = _decode_cursor(after)
        statement = statement.where(
            text("(period_start, id) < (:start, :id)").bindparams(start=start, id=invoice_id)
        )
    statement = statement.order_by(
        col(SubscriptionInvoice.period_start).desc(), col(SubscriptionInvoice.id).desc()
    ).limit(first + 1)
    rows = list((await session.execute(statement)).scalars())
    return InvoicePage(rows[:first], len(rows) > first)


def _snapshot(row: Subscription) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "status": row.status,
        "plan_id": str(row.plan_id),
        "scheduled_plan_id": None if row.scheduled_plan_id is None else str(row.scheduled_plan_id),
        "stripe_subscription_id": row.stripe_subscription_id,
        "current_period_start": iso(row.current_period_start),
        "current_period_end": iso(row.current_period_end),
        "cancel_at_period_end": row.cancel_at_period_end,
        "canceled_at": iso(row.canceled_at),
        "paused_at": iso(row.paused_at),
        "grace_ends_at": iso(row.grace_ends_at),
    }


# ---------------------------------------------------------------- subscribing


@dataclass(frozen=True, slots=True)
class SubscribeStarted:
    subscription: Subscription
    checkout_url: str


async def _sold_plan(session: AsyncSession, plan_id: uuid.UUID) -> SubscriptionPlan:
    plan = await session.get(SubscriptionPlan, plan_id, populate_existing=True)
    if plan is None or not plan.active or plan.stripe_price_id is None:
        raise NotFound("plan not found")
    return plan


async def _by_key(session: AsyncSession, organization_id: uuid.UUID, key: str) -> Subscription | None:
    return (
        await session.execute(
            select(Subscription)
            .where(
                col(Subscription.organization_id) == organization_id, col(Subscription.idempotency_key) == key
            )
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


def _exists() -> Conflict:
    return Conflict(
        "the organization has a subscription: change its plan, or cancel it first",
        code="SUBSCRIPTION_EXISTS",
    )


async def subscribe(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    organization_id: uuid.UUID,
    *,
    plan_id: uuid.UUID,
    success_url: str,
    cancel_url: str,
    idempotency_key: str | None,
) -> SubscribeStarted:
    """An INCOMPLETE subscription and its Stripe Checkout Session (mode subscription). The
    subscription becomes real when Stripe's events say the Checkout was paid.

    One live subscription per organization: another is ``Conflict(SUBSCRIPTION_EXISTS)``. A
    Checkout started earlier and never paid does not count: its session is expired in Stripe
    (the person started over) and a new one is made. The same idempotency key again returns the
    same page."""
    async with transaction(sessions) as session:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_CONFIGURE)
        key = None if idempotency_key is None else validation.idempotency_key(idempotency_key)
        success = purchases.return_url(success_url, "successUrl")
        cancel = purchases.return_url(cancel_url, "cancelUrl")
        plan = await _sold_plan(session, plan_id)
        if key is not None:
            keyed = await _by_key(session, organization_id, key)
            if keyed is not None:
                if keyed.plan_id != plan.id:
                    raise Conflict(
                        "the idempotency key was used for another plan", code="IDEMPOTENCY_CONFLICT"
                    )
                if keyed.checkout_url is not None and keyed.status == SubscriptionStatus.INCOMPLETE.value:
                    return SubscribeStarted(keyed, keyed.checkout_url)
                if keyed.status != SubscriptionStatus.INCOMPLETE.value:
                    raise _exists()
        live = await current(session, organization_id)
        if live is not None and (
            live.status != SubscriptionStatus.INCOMPLETE.value or live.stripe_subscription_id is not None
        ):
            raise _exists()
    if live is not None and (key is None or live.idempotency_key != key):
        await _abandon_checkout(sessions, gateway, live)
        live = None

    row = live
    if row is None:
        row = Subscription(
            id=uuid7(),
            organization_id=organization_id,
            plan_id=plan.id,
            idempotency_key=key,
            currency=plan.currency,
        )
        try:
            async with transaction(sessions) as session:
                session.add(row)
        except IntegrityError:  # a concurrent subscribe made one first
            row = await _same_key_made(sessions, organization_id, key, plan.id)
            if row.checkout_url is not None:
                return SubscribeStarted(row, row.checkout_url)
            # Finished here too: the same Stripe idempotency key gives the same session.

    metadata = {
        "subscription_id": str(row.id),
        "organization_id": str(organization_id),
        "plan_id": str(plan.id),
    }
    assert plan.stripe_price_id is not None
    try:
        link = await _checkout(sessions, gateway, row, plan.stripe_price_id, metadata, success, cancel)
    except stripe.StripeError as error:
        if key is None or not purchases.indeterminate(error):
            async with transaction(sessions) as session:
                await session.execute(
                    delete(Subscription).where(
                        col(Subscription.id) == row.id, col(Subscription.stripe_subscription_id).is_(None)
                    )
                )
        raise PaymentProviderError(purchases.provider_failure(error)) from error

    async with transaction(sessions) as session:
        locked = await session.get(Subscription, row.id, with_for_update=True, populate_existing=True)
        if locked is None:
            raise NotFound("subscription not found")
        started_over = locked.status != SubscriptionStatus.INCOMPLETE.value
        if not started_over and locked.checkout_url is None:
            locked.checkout_session_id = link.session_id
            locked.checkout_url = link.url
            locked.updated_at = _now()
            await session.flush()
            await audit.record(
                session,
                principal,
                action="subscription.subscribe",
                organization_id=organization_id,
                target_type="subscription",
                target_id=locked.id,
                after=_snapshot(locked) | {"plan": plan.code, "checkout_session_id": link.session_id},
            )
        url = locked.checkout_url
    if started_over or url is None:
        # Another subscribe started over meanwhile and canceled this one before its page was
        # recorded: the page just made must not be payable.
        await _expire_quietly(gateway, link.session_id)
        raise _exists()
    return SubscribeStarted(locked, url)


async def _same_key_made(
    sessions: async_sessionmaker[AsyncSession],
    organization_id: uuid.UUID,
    key: str | None,
    plan_id: uuid.UUID,
) -> Subscription:
    """The subscription a concurrent request with the same key made; without a key (or another
    one), the organization's subscription exists."""
    if key is not None:
        async with transaction(sessions) as session:
            keyed = await _by_key(session, organization_id, key)
        if (
            keyed is not None
            and keyed.plan_id == plan_id
            and keyed.status == SubscriptionStatus.INCOMPLETE.value
        ):
            return keyed
    raise _exists()


async def _checkout(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    row: Subscription,
    price_id: str,
    metadata: dict[str, str],
    success_url: str,
    cancel_url: str,
) -> CheckoutLink:
    customer_id = await purchases.stripe_customer(sessions, gateway, row.organization_id)
    arguments: dict[str, Any] = {
        "price_id": price_id,
        "client_reference_id": str(row.id),
        "metadata": metadata,
        "success_url": success_url,
        "cancel_url": cancel_url,
    }
    try:
        return await gateway.create_subscription_checkout(
            customer_id=customer_id, idempotency_key=f"subscription-{row.id}-checkout", **arguments
        )
    except stripe.InvalidRequestError as error:
        if not purchases.missing_customer(error):
            raise
        customer_id = await purchases.stripe_customer(
            sessions, gateway, row.organization_id, replace=customer_id
        )
        return await gateway.create_subscription_checkout(
            customer_id=customer_id, idempotency_key=f"subscription-{row.id}-checkout-2", **arguments
        )


async def _abandon_checkout(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, row: Subscription
) -> None:
    """An INCOMPLETE subscription whose Checkout nobody paid: the row is CANCELED first (so a
    request still making its page sees that, and expires the page itself), then the page it has
    is expired in Stripe, so it can no longer be paid. A page paid meanwhile is a subscription:
    ``Conflict(SUBSCRIPTION_EXISTS)`` (its webhook brings the row back to life)."""
    async with transaction(sessions) as session:
        canceled = (
            await session.execute(
                update(Subscription)
                .where(
                    col(Subscription.id) == row.id,
                    col(Subscription.status) == SubscriptionStatus.INCOMPLETE.value,
                    col(Subscription.stripe_subscription_id).is_(None),
                )
                .values(status=SubscriptionStatus.CANCELED.value, canceled_at=_now(), updated_at=_now())
                .returning(col(Subscription.checkout_session_id))
            )
        ).all()
    if len(canceled) != 1:
        raise _exists()
    session_id = canceled[0][0]
    if session_id is None:
        return
    try:
        await gateway.expire_checkout_session(session_id)
    except stripe.InvalidRequestError:
        checkout = await gateway.retrieve_checkout_session(session_id)
        if checkout.status != "expired":
            raise _exists() from None
    except stripe.StripeError as error:
        raise PaymentProviderError(purchases.provider_failure(error)) from error


async def _expire_quietly(gateway: StripeGateway, session_id: str) -> None:
    try:
        await gateway.expire_checkout_session(session_id)
    except stripe.StripeError:
        log.warning("could not expire the Checkout Session %s of a subscription started over", session_id)


async def checkout_expired(session: AsyncSession, checkout: JsonObject, now: datetime) -> str:
    """``checkout.session.expired`` (mode subscription): the INCOMPLETE subscription it was
    for is CANCELED, quietly (nothing was ever billed)."""
    session_id = fields.text(checkout.get("id"))
    if session_id is None:
        return "ignored"
    row = (
        await session.execute(
            select(Subscription)
            .where(col(Subscription.checkout_session_id) == session_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if row is None:
        return "unknown_subscription"
    if row.status != SubscriptionStatus.INCOMPLETE.value or row.stripe_subscription_id is not None:
        return "ignored"
    row.status = SubscriptionStatus.CANCELED.value
    row.canceled_at = now
    row.updated_at = _now()
    await session.flush()
    return "checkout_expired"


# ---------------------------------------------------------------- Stripe's state, applied


async def next_seq(sessions: async_sessionmaker[AsyncSession]) -> int:
    """A number taken before reading a subscription from Stripe (see the module's doc)."""
    async with sessions() as session:
        seq = await session.scalar(text("SELECT nextval('subscription_sync_seq')"))
        await session.commit()
    assert isinstance(seq, int)
    return seq


def _status(obj: JsonObject) -> SubscriptionStatus:
    status = obj.get("status")
    if status in ("canceled", "incomplete_expired"):
        return SubscriptionStatus.CANCELED
    if status == "incomplete":
        return SubscriptionStatus.INCOMPLETE
    if status in ("past_due", "unpaid"):
        return SubscriptionStatus.PAST_DUE
    if status == "paused" or obj.get("pause_collection"):
        return SubscriptionStatus.PAUSED
    if status == "trialing":
        return SubscriptionStatus.TRIALING
    return SubscriptionStatus.ACTIVE


def _item(obj: JsonObject) -> JsonObject | None:
    items = obj.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None


async def plan_of_product(session: AsyncSession, product: object) -> SubscriptionPlan | None:
    product_id = fields.id_of(product)
    if product_id is None:
        return None
    return (
        await session.execute(
            select(SubscriptionPlan).where(col(SubscriptionPlan.stripe_product_id) == product_id)
        )
    ).scalar_one_or_none()


async def _find(session: AsyncSession, stripe_id: str | None, metadata: object) -> Subscription | None:
    """Our subscription of a Stripe one, locked: by its Stripe id, else by the id we put in its
    metadata (before the first event linked them)."""
    if stripe_id is not None:
        row = (
            await session.execute(
                select(Subscription)
                .where(col(Subscription.stripe_subscription_id) == stripe_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
        if row is not None:
            return row
    ours = fields.uuid_in(metadata.get("subscription_id")) if isinstance(metadata, dict) else None
    if ours is None:
        return None
    row = await session.get(Subscription, ours, with_for_update=True, populate_existing=True)
    if row is None or row.stripe_subscription_id not in (None, stripe_id):
        return None
    return row


def _costs_more(new_amount: int | None, paid_amount: int | None) -> bool:
    """A change to what costs more per period than the subscription pays now is an upgrade
    (it takes effect now); any other waits for the renewal. What it pays, not the plans' list
    prices: a plan repriced since keeps its subscribers on the old price."""
    return new_amount is not None and paid_amount is not None and new_amount > paid_amount


async def apply_subscription(
    session: AsyncSession,
    obj: JsonObject,
    *,
    seq: int,
    now: datetime,
    grace: timedelta,
    actor: audit.Actor = "stripe",
    audited: bool = True,
) -> str:
    """Writes Stripe's subscription ``obj`` (read after ``seq`` was taken) onto ours, unless a
    later read was applied already; audits a change (unless ``audited`` is False: the caller
    records it as the member's request); tells the organization when it ends."""
    stripe_id = fields.text(obj.get("id"))
    row = await _find(session, stripe_id, obj.get("metadata"))
    if row is None:
        log.warning("Stripe subscription %s is not one of ours", stripe_id)
        return "unknown_subscription"
    if seq <= row.sync_seq:
        return "stale"
    before = _snapshot(row)
    old_plan = await _plan(session, row.plan_id)
    status = _status(obj)
    if status != SubscriptionStatus.CANCELED and row.status == SubscriptionStatus.CANCELED.value:
        other = await current(session, row.organization_id)
        if other is not None and other.id != row.id:
            # A Checkout abandoned here was paid after all: two subscriptions. Staff must
            # cancel (and refund) one in Stripe; this one stays CANCELED here.
            log.error(
                "Stripe subscription %s is live beside %s of the same organization", stripe_id, other.id
            )
            return "second_subscription"
    row.sync_seq = seq
    row.stripe_subscription_id = stripe_id
    row.status = status.value
    item = _item(obj)
    paid_amount = row.renewal_amount_minor
    if item is not None:
        row.stripe_item_id = fields.text(item.get("id"))
        raw_price = item.get("price")
        price: JsonObject = raw_price if isinstance(raw_price, dict) else {}
        row.stripe_price_id = fields.id_of(price) or row.stripe_price_id
        amount = price.get("unit_amount")
        quantity = _quantity(item)
        row.renewal_amount_minor = amount * quantity if isinstance(amount, int) else row.renewal_amount_minor
        start = fields.instant(item.get("current_period_start")) or fields.instant(
            obj.get("current_period_start")
        )
        end = fields.instant(item.get("current_period_end")) or fields.instant(obj.get("current_period_end"))
        if start is not None and end is not None and end > start:
            row.current_period_start, row.current_period_end = start, end
        item_plan = await plan_of_product(session, price.get("product"))
        if item_plan is None:
            log.warning("Stripe subscription %s is on a price of no plan here", stripe_id)
        elif item_plan.id == row.plan_id:
            row.scheduled_plan_id = None
        elif row.plan_since is None or _costs_more(row.renewal_amount_minor, paid_amount):
            row.plan_id, row.scheduled_plan_id = item_plan.id, None
            if row.plan_since is not None:
                row.plan_since = now
        else:
            row.scheduled_plan_id = item_plan.id
    row.cancel_at_period_end = bool(obj.get("cancel_at_period_end")) and status != SubscriptionStatus.CANCELED
    row.canceled_at = (
        fields.instant(obj.get("canceled_at")) or fields.instant(obj.get("ended_at")) or now
        if status == SubscriptionStatus.CANCELED or row.cancel_at_period_end
        else None
    )
    row.paused_at = (row.paused_at or now) if status == SubscriptionStatus.PAUSED else None
    if status == SubscriptionStatus.PAST_DUE:
        row.grace_ends_at = row.grace_ends_at or now + grace
    elif not (status == SubscriptionStatus.CANCELED and row.grace_expired_at is None):
        row.grace_ends_at = None
    # else: ended while unpaid (Stripe's retries ran out first, or it was canceled): its grace
    # still runs, and suspends the wallet at its end unless the invoice is paid.
    after = _snapshot(row)
    if after == before:
        await session.flush()
        return "unchanged"
    row.updated_at = _now()
    await session.flush()
    await _cover(session, row, old_plan, now, grace)
    if audited:
        await audit.record(
            session,
            actor,
            action="subscription.update",
            organization_id=row.organization_id,
            target_type="subscription",
            target_id=row.id,
            before=before,
            after=after,
        )
    if status == SubscriptionStatus.CANCELED and before["status"] != SubscriptionStatus.CANCELED.value:
        plan = await _plan(session, row.plan_id)
        await notifications.notify(
            session,
            row.organization_id,
            NotificationKind.SUBSCRIPTION_CANCELED,
            key=f"subscription-canceled:{row.id}",
            title="Subscription canceled",
            body=f"The subscription to {plan.name} has ended. Tokens already granted stay until they expire.",
            data={"subscriptionId": str(row.id), "plan": plan.code},
        )
    return "synced"


async def _cover(
    session: AsyncSession, row: Subscription, old_plan: SubscriptionPlan, now: datetime, grace: timedelta
) -> None:
    """The wallet's coverage by an unlimited plan, as the subscription now stands."""
    plan = await _plan(session, row.plan_id)
    if not (plan.unlimited or old_plan.unlimited):
        return
    until: datetime | None = None
    if plan.unlimited and row.status in COVERED_STATUSES and row.current_period_end is not None:
        until = row.current_period_end + grace
    elif plan.unlimited and row.status == SubscriptionStatus.PAST_DUE.value:
        until = row.grace_ends_at
    wallet_id = await wallets.wallet_id_of(session, row.organization_id)
    coverage = await ledger.set_coverage(session, wallet_id, until, now=now)
    if coverage.before != coverage.until:
        await audit.record(
            session,
            "stripe",
            action="wallet.coverage",
            organization_id=row.organization_id,
            target_type="wallet",
            target_id=wallet_id,
            before={"covered_until": None if coverage.before is None else coverage.before.isoformat()},
            after={"covered_until": None if until is None else until.isoformat(), "plan": plan.code},
        )


# ---------------------------------------------------------------- invoices


def invoice_subscription_id(invoice: JsonObject) -> str | None:
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    if isinstance(details, dict):
        return fields.id_of(details.get("subscription"))
    return fields.id_of(invoice.get("subscription"))  # API versions before 2025-03


def _invoice_metadata(invoice: JsonObject) -> JsonObject:
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    metadata = details.get("metadata") if isinstance(details, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _lines(invoice: JsonObject) -> list[JsonObject]:
    lines = invoice.get("lines")
    data = lines.get("data") if isinstance(lines, dict) else None
    return [line for line in data or [] if isinstance(line, dict)]


def _line_product(line: JsonObject) -> object:
    pricing = line.get("pricing")
    details = pricing.get("price_details") if isinstance(pricing, dict) else None
    if isinstance(details, dict):
        return details.get("product")
    price = line.get("price")  # API versions before 2025-03
    return price.get("product") if isinstance(price, dict) else None


def _proration(line: JsonObject) -> bool:
    parent = line.get("parent")
    details = parent.get("subscription_item_details") if isinstance(parent, dict) else None
    if isinstance(details, dict):
        return bool(details.get("proration"))
    return bool(line.get("proration"))


def _line_period(line: JsonObject) -> tuple[datetime, datetime] | None:
    period = line.get("period")
    if not isinstance(period, dict):
        return None
    start, end = fields.instant(period.get("start")), fields.instant(period.get("end"))
    return None if start is None or end is None else (start, end)


def _quantity(line: JsonObject) -> int:
    quantity = line.get("quantity")
    return quantity if isinstance(quantity, int) and quantity > 0 else 1


def half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2)) if value >= 0 else -int(-value + Fraction(1, 2))


@dataclass(frozen=True, slots=True)
class _Grant:
    tokens: int
    plan: SubscriptionPlan
    period: tuple[datetime, datetime]
    new_period: bool  # a period's allowance (create or cycle), not an upgrade's difference


async def _grant_of(session: AsyncSession, row: Subscription, invoice: JsonObject) -> _Grant | None:
    """What a paid invoice grants (None: nothing, e.g. an unlimited plan's or a manual one)."""
    reason = invoice.get("billing_reason")
    lines = _lines(invoice)
    if reason in ("subscription_create", "subscription_cycle"):
        for line in lines:
            period = _line_period(line)
            plan = await plan_of_product(session, _line_product(line))
            if _proration(line) or period is None or plan is None:
                continue
            return _Grant(plan.tokens_per_period * _quantity(line), plan, period, True)
        return None
    if reason != "subscription_update":
        return None
    # An upgrade: the proration lines credit the old price's unused time and charge the new
    # one's; the tokens follow the same fractions of the period the change fell in.
    total = Fraction(0)
    charged: tuple[SubscriptionPlan, tuple[datetime, datetime]] | None = None
    for line in lines:
        period = _line_period(line)
        plan = await plan_of_product(session, _line_product(line))
        amount = line.get("amount")
        if not _proration(line) or period is None or plan is None or not isinstance(amount, int):
            continue
        whole = Fraction(
            int((period[1] - await _period_start(session, row, period[1], plan)).total_seconds())
        )
        if whole <= 0:
            continue
        share = Fraction(int((period[1] - period[0]).total_seconds())) / whole
        sign = -1 if amount < 0 else 1
        total += sign * plan.tokens_per_period * _quantity(line) * share
        if sign > 0:
            charged = (plan, period)
    if charged is None:
        return None
    return _Grant(max(0, half_up(total)), charged[0], charged[1], False)


async def _period_start(
    session: AsyncSession, row: Subscription, end: datetime, plan: SubscriptionPlan
) -> datetime:
    """The start of the subscription's period that ends at ``end``: the current one's, or the
    one a paid period's invoice recorded (an upgrade's invoice handled after the renewal), or
    one interval back."""
    if row.current_period_end == end and row.current_period_start is not None:
        return row.current_period_start
    recorded = await session.scalar(
        select(col(SubscriptionInvoice.period_start))
        .where(
            col(SubscriptionInvoice.subscription_id) == row.id,
            col(SubscriptionInvoice.period_end) == end,
            col(SubscriptionInvoice.billing_reason).in_(("subscription_create", "subscription_cycle")),
        )
        .limit(1)
    )
    if recorded is not None:
        return recorded
    return plans.previous_period_start(end, plan.interval, plan.interval_count)


async def _upsert_invoice(
    session: AsyncSession, row: Subscription, invoice: JsonObject
) -> SubscriptionInvoice:
    """The invoice's row, locked, its status moved forward only."""
    invoice_id = str(invoice["id"])
    status = str(invoice.get("status") or "draft")
    found = (
        await session.execute(
            select(SubscriptionInvoice)
            .where(col(SubscriptionInvoice.stripe_invoice_id) == invoice_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    lines = [p for p in (_line_period(line) for line in _lines(invoice)) if p is not None]
    start = min((p[0] for p in lines), default=None) or fields.instant(invoice.get("period_start")) or _now()
    end = max((p[1] for p in lines), default=None) or fields.instant(invoice.get("period_end")) or start
    amount = invoice.get("amount_paid") if status == "paid" else invoice.get("amount_due")
    transitions = invoice.get("status_transitions")
    paid_at = fields.instant(transitions.get("paid_at")) if isinstance(transitions, dict) else None
    if found is None:
        found = SubscriptionInvoice(
            id=uuid7(),
            subscription_id=row.id,
            stripe_invoice_id=invoice_id,
            status=status,
            billing_reason=fields.text(invoice.get("billing_reason")),
            amount_minor=amount if isinstance(amount, int) and amount >= 0 else 0,
            currency=str(invoice.get("currency") or row.currency).upper(),
            period_start=start,
            period_end=max(end, start),
        )
        session.add(found)
    elif _INVOICE_RANK.get(status, 0) < _INVOICE_RANK.get(found.status, 0):
        return found  # an older copy of the invoice
    found.status = status
    if isinstance(amount, int) and amount >= 0:
        found.amount_minor = amount
    found.hosted_invoice_url = fields.text(invoice.get("hosted_invoice_url")) or found.hosted_invoice_url
    found.paid_at = paid_at or found.paid_at
    attempts = invoice.get("attempt_count")
    found.attempt_count = max(found.attempt_count, attempts if isinstance(attempts, int) else 0)
    found.updated_at = _now()
    await session.flush()
    return found


async def _invoice_row(session: AsyncSession, invoice: JsonObject) -> Subscription | None:
    return await _find(session, invoice_subscription_id(invoice), _invoice_metadata(invoice))


async def record_invoice(session: AsyncSession, invoice: JsonObject) -> str:
    """Any other invoice event: the invoice as it now stands, for the invoices list."""
    row = await _invoice_row(session, invoice)
    if row is None or not fields.text(invoice.get("id")):
        return "unknown_subscription"
    await _upsert_invoice(session, row, invoice)
    return "recorded"


async def invoice_paid(session: AsyncSession, invoice: JsonObject, now: datetime, grace: timedelta) -> str:
    """``invoice.paid``: the invoice's tokens granted once (the ledger key is the invoice's),
    the plan in force moved to the one paid for, the wallet reactivated if this subscription's
    unpaid grace suspended it, the organization told."""
    row = await _invoice_row(session, invoice)
    if row is None or not fields.text(invoice.get("id")):
        return "unknown_subscription"
    if invoice.get("status") != "paid":
        return "ignored"
    stored = await _upsert_invoice(session, row, invoice)
    grant = await _grant_of(session, row, invoice)
    wallet_id = await wallets.wallet_id_of(session, row.organization_id)
    if row.status == SubscriptionStatus.CANCELED.value and row.grace_ends_at is not None:
        row.grace_ends_at = None  # ended unpaid, now paid: its grace no longer runs
        await session.flush()
    if grant is None:
        await _reactivate(session, row, wallet_id, now)
        return "paid"
    if grant.new_period and (row.plan_since is None or grant.period[0] >= row.plan_since):
        before_plan = await _plan(session, row.plan_id)
        row.plan_id, row.plan_since = grant.plan.id, grant.period[0]
        if row.scheduled_plan_id == grant.plan.id:
            row.scheduled_plan_id = None
        row.updated_at = _now()
        await session.flush()
        await _cover(session, row, before_plan, now, grace)
    replayed = False
    cut = 0
    if grant.tokens > 0:
        amount_paid = invoice.get("amount_paid")
        made = await ledger.grant_subscription_period(
            session,
            wallet_id,
            tokens=grant.tokens,
            period_start=grant.period[0],
            period_end=grant.period[1],
            rollover="rollover" if grant.plan.rollover == plans.RolloverPolicy.ROLLOVER.value else "expire",
            cap=grant.plan.rollover_cap,
            key=GRANT_KEY + stored.stripe_invoice_id,
            actor="stripe",
            reason=f"subscription {grant.plan.code}: invoice {stored.stripe_invoice_id}",
            metadata={
                "invoice": stored.stripe_invoice_id,
                "subscription": str(row.id),
                "plan": grant.plan.code,
            },
            cost_minor=amount_paid if isinstance(amount_paid, int) else None,
            currency=stored.currency,
            reference_id=row.id,
            now=now,
        )
        replayed, cut = made.posting.replayed, made.cut
        stored.tokens_granted = grant.tokens
        await session.flush()
    told = None
    reason = invoice.get("billing_reason")
    if grant.new_period:
        first = reason == "subscription_create"
        told = await notifications.notify(
            session,
            row.organization_id,
            NotificationKind.SUBSCRIPTION_STARTED if first else NotificationKind.SUBSCRIPTION_RENEWED,
            key=f"subscription-paid:{stored.stripe_invoice_id}",
            title="Subscription started" if first else "Subscription renewed",
            body=(
                f"{grant.plan.name}: "
                + (
                    "consumption is covered without limit"
                    if grant.plan.unlimited
                    else f"{grant.tokens} tokens granted"
                )
                + f" until {grant.period[1]:%Y-%m-%d %H:%M} UTC."
            ),
            data={
                "subscriptionId": str(row.id),
                "plan": grant.plan.code,
                "tokens": grant.tokens,
                "amountMinor": stored.amount_minor,
                "currency": stored.currency,
                "periodEnd": grant.period[1].isoformat(),
            },
            now=now,
        )
    await _reactivate(session, row, wallet_id, now)
    if replayed or (grant.tokens == 0 and told is None):
        return "duplicate_grant"
    await audit.record(
        session,
        "stripe",
        action="subscription.grant",
        organization_id=row.organization_id,
        target_type="subscription",
        target_id=row.id,
        after={
            "invoice": stored.stripe_invoice_id,
            "billing_reason": stored.billing_reason,
            "plan": grant.plan.code,
            "tokens": grant.tokens,
            "expired_by_rollover_cap": cut,
            "period_start": grant.period[0].isoformat(),
            "period_end": grant.period[1].isoformat(),
        },
    )
    return "granted"


async def invoice_payment_failed(session: AsyncSession, invoice: JsonObject, now: datetime) -> str:
    """A failed attempt: the invoice recorded, the organization told (once per attempt). The
    subscription's PAST_DUE and grace come from Stripe's object, applied before."""
    row = await _invoice_row(session, invoice)
    if row is None or not fields.text(invoice.get("id")):
        return "unknown_subscription"
    stored = await _upsert_invoice(session, row, invoice)
    if stored.status == "paid":
        return "ignored"
    attempt = invoice.get("attempt_count") if isinstance(invoice.get("attempt_count"), int) else 0
    retry = fields.instant(invoice.get("next_payment_attempt"))
    created = await notifications.notify(
        session,
        row.organization_id,
        NotificationKind.SUBSCRIPTION_PAYMENT_FAILED,
        key=f"subscription-payment-failed:{stored.stripe_invoice_id}:{attempt}",
        title="Subscription payment failed",
        body=(
            f"The payment of {stored.amount_minor / 100:.2f} {stored.currency} for the subscription failed."
            + (f" Stripe tries again on {retry:%Y-%m-%d}." if retry else "")
            + (
                f" Unless it is paid by {row.grace_ends_at:%Y-%m-%d %H:%M} UTC, the subscription is "
                "canceled and the wallet suspended."
                if row.grace_ends_at
                else ""
            )
            + (f" Pay it here: {stored.hosted_invoice_url}" if stored.hosted_invoice_url else "")
        ),
        data={
            "subscriptionId": str(row.id),
            "invoice": stored.stripe_invoice_id,
            "amountMinor": stored.amount_minor,
            "currency": stored.currency,
            "attempt": attempt,
            "graceEndsAt": None if row.grace_ends_at is None else row.grace_ends_at.isoformat(),
            "hostedInvoiceUrl": stored.hosted_invoice_url,
        },
        now=now,
    )
    if created is not None:
        await audit.record(
            session,
            "stripe",
            action="subscription.payment_failed",
            organization_id=row.organization_id,
            target_type="subscription",
            target_id=row.id,
            after={"invoice": stored.stripe_invoice_id, "attempt": attempt, "status": row.status},
        )
    return "payment_failed"


# ---------------------------------------------------------------- the wallet, suspended and back


async def _wallet_status(session: AsyncSession, wallet_id: uuid.UUID) -> str | None:
    return await session.scalar(select(col(Wallet.status)).where(col(Wallet.id) == wallet_id))


async def _reactivate(session: AsyncSession, row: Subscription, wallet_id: uuid.UUID, now: datetime) -> None:
    """A payment after an unpaid grace period suspended the wallet (this subscription's, or an
    earlier one's: the organization subscribed again): active again, unless platform staff
    took the wallet's status over meanwhile (``wallets.set_wallet_status`` cleared the marks)."""
    released = (
        await session.execute(
            update(Subscription)
            .where(
                col(Subscription.organization_id) == row.organization_id,
                col(Subscription.wallet_suspended_at).is_not(None),
            )
            .values(wallet_suspended_at=None)
            .returning(col(Subscription.id))
        )
    ).all()
    if not released:
        return
    row.wallet_suspended_at = None
    await wallets.change_status(
        session,
        "stripe",
        row.organization_id,
        wallet_id,
        WalletStatus.ACTIVE,
        "the subscription's invoice was paid",
        now=now,
    )


def grace_period(runtime: Runtime) -> timedelta:
    return timedelta(days=runtime.settings.subscription_grace_days)


async def end_grace(runtime: Runtime, now: datetime) -> str:
    """Past-due subscriptions past their grace: canceled through Stripe (no transaction open;
    one idempotency key per subscription, so workers running this at once send one
    cancellation), then the wallet suspended, once (the row's ``grace_expired_at``). One that
    ended unpaid before its grace did (Stripe gave up first, or it was canceled) only has the
    wallet suspended."""
    async with runtime.sessions() as session:
        due = list(
            (
                await session.execute(
                    select(col(Subscription.id), col(Subscription.stripe_subscription_id)).where(
                        col(Subscription.status).in_(
                            (SubscriptionStatus.PAST_DUE.value, SubscriptionStatus.CANCELED.value)
                        ),
                        col(Subscription.grace_expired_at).is_(None),
                        col(Subscription.grace_ends_at) <= now,
                    )
                )
            ).all()
        )
    ended = 0
    for subscription_id, stripe_id in due:
        if stripe_id is None:
            continue
        seq = await next_seq(runtime.sessions)
        try:
            obj = as_json(await runtime.gateway.retrieve_subscription(stripe_id))
            if _status(obj) == SubscriptionStatus.PAST_DUE:
                obj = as_json(
                    await runtime.gateway.cancel_subscription(
                        stripe_id, idempotency_key=f"subscription-{subscription_id}-grace"
                    )
                )
        except stripe.StripeError as error:
            log.warning("could not cancel subscription %s past its grace: %s", subscription_id, error)
            continue
        async with transaction(runtime.sessions) as session:
            ended += await _grace_expired(session, subscription_id, obj, seq, now, grace_period(runtime))
    return f"ended {ended} of {len(due)}"


async def _grace_expired(
    session: AsyncSession,
    subscription_id: uuid.UUID,
    obj: JsonObject,
    seq: int,
    now: datetime,
    grace: timedelta,
) -> int:
    row = await session.get(Subscription, subscription_id, with_for_update=True, populate_existing=True)
    if row is None or row.grace_expired_at is not None:
        return 0
    await apply_subscription(session, obj, seq=seq, now=now, grace=grace, actor=GRACE_ACTOR)
    await session.refresh(row)
    if row.grace_ends_at is None:
        return 0  # paid meanwhile
    if row.status != SubscriptionStatus.CANCELED.value:
        return 0  # paid meanwhile: Stripe's subscription is live again
    row.grace_expired_at = now
    wallet_id = await wallets.wallet_id_of(session, row.organization_id)
    suspend = await _wallet_status(session, wallet_id) == "active"
    if suspend:
        row.wallet_suspended_at = now
    await session.flush()
    await audit.record(
        session,
        GRACE_ACTOR,
        action="subscription.grace_expired",
        organization_id=row.organization_id,
        target_type="subscription",
        target_id=row.id,
        after={"status": row.status, "wallet_suspended": suspend},
    )
    if suspend:
        await wallets.change_status(
            session,
            GRACE_ACTOR,
            row.organization_id,
            wallet_id,
            WalletStatus.SUSPENDED,
            "the subscription's renewal was not paid within the grace period",
            now=now,
        )
    return 1


# ---------------------------------------------------------------- reminders


_DUE_REMINDERS = text(
    """
    UPDATE subscriptions s SET reminded_period_end = s.current_period_end
    FROM subscription_plans p
    WHERE p.id = coalesce(s.scheduled_plan_id, s.plan_id)
      AND s.status IN ('active', 'trialing') AND NOT s.cancel_at_period_end
      AND s.current_period_end > :now AND s.current_period_end <= :until
      AND s.reminded_period_end IS DISTINCT FROM s.current_period_end
    RETURNING s.id, s.organization_id, s.current_period_end, s.renewal_amount_minor, s.currency,
              p.name, p.code, p.price_minor
    """
)


async def send_reminders(runtime: Runtime, now: datetime) -> str:
    """Each subscription renewing within ``subscription_reminder_days`` is announced once per
    period (the row's ``reminded_period_end``), with the amount Stripe will charge."""
    until = now + timedelta(days=runtime.settings.subscription_reminder_days)
    async with transaction(runtime.sessions) as session:
        due = list((await session.execute(_DUE_REMINDERS, {"now": now, "until": until})).all())
        for row in due:
            amount = row.renewal_amount_minor if row.renewal_amount_minor is not None else row.price_minor
            await notifications.notify(
                session,
                row.organization_id,
                NotificationKind.SUBSCRIPTION_RENEWAL_UPCOMING,
                key=f"subscription-renewal:{row.id}:{row.current_period_end.isoformat()}",
                title="Subscription renews soon",
                body=(
                    f"{row.name} renews on {row.current_period_end:%Y-%m-%d %H:%M} UTC: "
                    f"{amount / 100:.2f} {row.currency} will be charged."
                ),
                data={
                    "subscriptionId": str(row.id),
                    "plan": row.code,
                    "amountMinor": amount,
                    "currency": row.currency,
                    "renewsAt": row.current_period_end.isoformat(),
                },
                now=now,
            )
    return f"reminded {len(due)}"


# ---------------------------------------------------------------- changes asked by members


@dataclass(frozen=True, slots=True)
class Asked:
    """A member's request to change a subscription: who asks, the database and Stripe, and the
    runtime's time and grace period."""

    sessions: async_sessionmaker[AsyncSession]
    principal: Principal
    gateway: StripeGateway
    now: datetime
    grace: timedelta


#: How long a member's change holds its subscription (it holds no database lock while Stripe
#: answers); a process that died holding it lets go after this long.
CHANGE_LEASE = timedelta(minutes=5)


@asynccontextmanager
async def _changing(asked: Asked, subscription_id: uuid.UUID) -> AsyncIterator[Subscription]:
    """The subscription, for a holder of tokens.configure in its organization (another
    organization's is not found), held for one change at a time: a second change while one is
    with Stripe is ``Conflict(SUBSCRIPTION_CHANGING)``. Two changes decided on the same state
    (two upgrades from one plan) would each be billed as if the other had not happened."""
    async with transaction(asked.sessions) as session:
        row = await session.get(Subscription, subscription_id, populate_existing=True)
        if row is None:
            raise NotFound("subscription not found")
        try:
            await access.authorize(session, asked.principal, row.organization_id, Permission.TOKENS_CONFIGURE)
        except NotFound as error:
            raise NotFound("subscription not found") from error
        held = (
            await session.execute(
                text(
                    "UPDATE subscriptions SET changing_until = now() + :lease WHERE id = :id"
                    " AND (changing_until IS NULL OR changing_until < now()) RETURNING id"
                ),
                {"id": subscription_id, "lease": CHANGE_LEASE},
            )
        ).first()
        if held is None:
            raise Conflict(
                "another change of this subscription is in progress: try again in a moment",
                code="SUBSCRIPTION_CHANGING",
            )
        row = await session.get(Subscription, subscription_id, populate_existing=True)
        assert row is not None
    try:
        yield row
    finally:
        async with transaction(asked.sessions) as session:
            await session.execute(
                text("UPDATE subscriptions SET changing_until = NULL WHERE id = :id"), {"id": subscription_id}
            )


def _not_live(row: Subscription) -> Conflict:
    if row.status == SubscriptionStatus.CANCELED.value:
        return Conflict("the subscription is canceled", code="SUBSCRIPTION_CANCELED")
    return Conflict(
        f"the subscription is {row.status.upper()}: only an ACTIVE one can do that",
        code="SUBSCRIPTION_NOT_ACTIVE",
    )


async def _changed(
    asked: Asked,
    row: Subscription,
    obj: JsonObject,
    seq: int,
    action: str,
    detail: dict[str, Any] | None = None,
) -> Subscription:
    """Stripe's answer applied, and the member's request audited."""
    principal = asked.principal
    async with transaction(asked.sessions) as session:
        before = _snapshot(row)
        await apply_subscription(
            session, obj, seq=seq, now=asked.now, grace=asked.grace, actor=principal, audited=False
        )
        changed = await session.get(Subscription, row.id, populate_existing=True)
        assert changed is not None
        await audit.record(
            session,
            principal,
            action=action,
            organization_id=row.organization_id,
            target_type="subscription",
            target_id=row.id,
            before=before,
            after=_snapshot(changed) | (detail or {}),
        )
        return changed


async def _stripe(call: Any) -> JsonObject:
    try:
        return as_json(await call)
    except stripe.CardError as error:
        raise declined(error) from error
    except stripe.StripeError as error:
        raise PaymentProviderError(purchases.provider_failure(error) + "; nothing was changed") from error


async def change_plan(asked: Asked, subscription_id: uuid.UUID, plan_id: uuid.UUID) -> Subscription:
    """An upgrade (a plan costing more per period than the subscription pays) now, charged by
    proration (a declined card is ``PaymentDeclined`` and changes nothing); a downgrade at the
    next renewal. Back to the current plan cancels a scheduled downgrade."""
    async with _changing(asked, subscription_id) as row:
        return await _change_plan(asked, row, plan_id)


async def _change_plan(asked: Asked, row: Subscription, plan_id: uuid.UUID) -> Subscription:
    if row.status not in LIVE or row.stripe_subscription_id is None or row.stripe_item_id is None:
        raise _not_live(row)
    async with transaction(asked.sessions) as session:
        try:
            target = await _sold_plan(session, plan_id)
        except NotFound:
            raise NotFound("plan not found") from None
        current_plan = await _plan(session, row.plan_id)
    if (target.currency, target.interval, target.interval_count) != (
        current_plan.currency,
        current_plan.interval,
        current_plan.interval_count,
    ):
        raise InvalidInput(
            "the plan bills another period or currency: cancel, then subscribe to it", field="planId"
        )
    if row.scheduled_plan_id is not None:
        if target.id == row.scheduled_plan_id:
            raise InvalidInput("that change is already scheduled for the next renewal", field="planId")
        if target.id != row.plan_id:
            raise Conflict(
                "a change is scheduled for the next renewal: change back to the current plan first",
                code="CHANGE_SCHEDULED",
            )
        upgrade = False  # back to the plan in force: nothing billed
    elif target.id == row.plan_id:
        raise InvalidInput("the subscription is on this plan already", field="planId")
    else:
        paying = row.renewal_amount_minor
        if paying is None:
            paying = plans.organization_plan_price(current_plan, row.organization_id)
        upgrade = _costs_more(plans.organization_plan_price(target, row.organization_id), paying)
    assert target.stripe_price_id is not None
    seq = await next_seq(asked.sessions)
    obj = await _stripe(
        asked.gateway.change_subscription_price(
            row.stripe_subscription_id,
            item_id=row.stripe_item_id,
            price_id=target.stripe_price_id,
            now=upgrade,
            idempotency_key=f"subscription-{row.id}-plan-{uuid7()}",
        )
    )
    return await _changed(
        asked,
        row,
        obj,
        seq,
        "subscription.change_plan",
        {"to_plan": target.code, "from_plan": current_plan.code, "when": "now" if upgrade else "renewal"},
    )


async def pause(asked: Asked, subscription_id: uuid.UUID) -> Subscription:
    """Collection paused: renewals are voided (nothing charged, nothing granted) until resumed."""
    async with _changing(asked, subscription_id) as row:
        return await _pause(asked, row)


async def _pause(asked: Asked, row: Subscription) -> Subscription:
    if row.status == SubscriptionStatus.PAUSED.value:
        raise Conflict("the subscription is paused already", code="SUBSCRIPTION_PAUSED")
    if row.status not in LIVE or row.stripe_subscription_id is None:
        raise _not_live(row)
    seq = await next_seq(asked.sessions)
    obj = await _stripe(
        asked.gateway.pause_subscription_collection(
            row.stripe_subscription_id, paused=True, idempotency_key=f"subscription-{row.id}-pause-{uuid7()}"
        )
    )
    return await _changed(asked, row, obj, seq, "subscription.pause")


async def resume(asked: Asked, subscription_id: uuid.UUID) -> Subscription:
    """A paused subscription collects again; one canceling at the period's end goes on."""
    async with _changing(asked, subscription_id) as row:
        return await _resume(asked, row)


async def _resume(asked: Asked, row: Subscription) -> Subscription:
    if row.stripe_subscription_id is None or row.status in (
        SubscriptionStatus.CANCELED.value,
        SubscriptionStatus.INCOMPLETE.value,
    ):
        raise _not_live(row)
    paused = row.status == SubscriptionStatus.PAUSED.value
    if not paused and not row.cancel_at_period_end:
        raise Conflict("the subscription is neither paused nor canceling", code="SUBSCRIPTION_NOT_PAUSED")
    seq = await next_seq(asked.sessions)
    obj: JsonObject | None = None
    if paused:
        obj = await _stripe(
            asked.gateway.pause_subscription_collection(
                row.stripe_subscription_id,
                paused=False,
                idempotency_key=f"subscription-{row.id}-resume-{uuid7()}",
            )
        )
    if row.cancel_at_period_end:
        obj = await _stripe(
            asked.gateway.cancel_subscription_at_period_end(
                row.stripe_subscription_id,
                cancel=False,
                idempotency_key=f"subscription-{row.id}-uncancel-{uuid7()}",
            )
        )
    assert obj is not None
    return await _changed(asked, row, obj, seq, "subscription.resume")


async def cancel(asked: Asked, subscription_id: uuid.UUID, *, at_period_end: bool) -> Subscription:
    """At the period's end (the default: the period was paid for) or now. Tokens already
    granted stay, until their lots expire. A Checkout never paid is simply abandoned."""
    async with _changing(asked, subscription_id) as row:
        return await _cancel(asked, row, at_period_end)


async def _cancel(asked: Asked, row: Subscription, at_period_end: bool) -> Subscription:
    if row.status == SubscriptionStatus.CANCELED.value:
        raise _not_live(row)
    if row.stripe_subscription_id is None:
        await _abandon_checkout(asked.sessions, asked.gateway, row)
        async with transaction(asked.sessions) as session:
            canceled = await session.get(Subscription, row.id, populate_existing=True)
            assert canceled is not None
            await audit.record(
                session,
                asked.principal,
                action="subscription.cancel",
                organization_id=row.organization_id,
                target_type="subscription",
                target_id=row.id,
                before=_snapshot(row),
                after=_snapshot(canceled),
            )
            return canceled
    if at_period_end and row.cancel_at_period_end:
        return row
    seq = await next_seq(asked.sessions)
    if at_period_end:
        obj = await _stripe(
            asked.gateway.cancel_subscription_at_period_end(
                row.stripe_subscription_id,
                cancel=True,
                idempotency_key=f"subscription-{row.id}-cancel-{uuid7()}",
            )
        )
    else:
        obj = await _stripe(
            asked.gateway.cancel_subscription(
                row.stripe_subscription_id, idempotency_key=f"subscription-{row.id}-end"
            )
        )
    return await _changed(
        asked,
        row,
        obj,
        seq,
        "subscription.cancel",
        {"at_period_end": at_period_end},
    )


# ---------------------------------------------------------------- the forecast


@dataclass(frozen=True, slots=True)
class Outlook:
    """What the organization's subscription will do to its wallet: the next grants (time,
    tokens) within the horizon, and whether an unlimited plan covers consumption."""

    grants: Sequence[tuple[datetime, int]]
    unlimited: bool


async def outlook(connection: Any, organization_id: uuid.UUID, now: datetime, horizon: timedelta) -> Outlook:
    """On an asyncpg connection: the renewals until ``now + horizon`` of a subscription that
    renews (ACTIVE or TRIALING, not canceling), each granting the plan it will be on."""
    row = await connection.fetchrow(
        """
        SELECT s.status, s.cancel_at_period_end, s.current_period_end, s.grace_ends_at,
               p.unlimited, coalesce(n.tokens_per_period, p.tokens_per_period) AS tokens,
               coalesce(n."interval", p."interval") AS plan_interval,
               coalesce(n.interval_count, p.interval_count) AS interval_count
        FROM subscriptions s
        JOIN subscription_plans p ON p.id = s.plan_id
        LEFT JOIN subscription_plans n ON n.id = s.scheduled_plan_id
        WHERE s.organization_id = $1 AND s.status <> 'canceled'
        """,
        organization_id,
    )
    if row is None:
        return Outlook([], False)
    covering = row["status"] in COVERED_STATUSES or (
        row["status"] == SubscriptionStatus.PAST_DUE.value
        and row["grace_ends_at"] is not None
        and row["grace_ends_at"] > now
    )
    if row["unlimited"] and covering:
        return Outlook([], True)
    if (
        row["status"] not in COVERED_STATUSES
        or row["cancel_at_period_end"]
        or row["current_period_end"] is None
    ):
        return Outlook([], False)
    grants: list[tuple[datetime, int]] = []
    at: datetime = row["current_period_end"]
    while at <= now + horizon and row["tokens"] > 0 and len(grants) < 400:
        if at > now:
            grants.append((at, int(row["tokens"])))
        at = plans.next_period_end(at, row["plan_interval"], row["interval_count"])
    return Outlook(grants, False)
