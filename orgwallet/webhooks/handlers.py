"""One handler per Stripe event type. Each reads the event's object (plain JSON, as verified),
finds what it is about, and calls the purchases service; it returns a short outcome that is
stored on the event (``credited``, ``unknown_purchase``, ``mismatch``, ...).

Handlers run inside the transaction that stored the event, so the event and its effect are
committed together; an exception rolls both back and the route answers 5xx. They never call
Stripe: what an event needs from Stripe is read (or done) by its prefetch (``PREFETCH``), run
before that transaction, with no transaction open, and handed over in ``EventContext.fetched``.
A prefetch asks only for what its handler will use.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from orgwallet.db.models import Purchase, PurchaseMethod
from orgwallet.payments import fields
from orgwallet.payments.gateway import StripeGateway
from orgwallet.services import purchases, subscriptions
from orgwallet.services.purchases import Payment

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
UNKNOWN_PURCHASE = "unknown_purchase"
DEFAULT_GRACE = timedelta(days=7)  # Settings.subscription_grace_days


@dataclass(frozen=True, slots=True)
class Fetched:
    """What an event's prefetch read from Stripe for its handler."""

    charge: stripe.Charge | None = None  # the payment's (latest) or the disputed charge
    saved_card: str | None = None  # the card a setup saved, made the customer's default in Stripe
    subscription: JsonObject | None = None  # the event's subscription as Stripe has it now
    sync_seq: int = 0  # taken before ``subscription`` was read


@dataclass(frozen=True, slots=True)
class PrefetchContext:
    """Stripe, and the database for plain reads: no transaction is open."""

    sessions: async_sessionmaker[AsyncSession]
    gateway: StripeGateway


@dataclass(frozen=True, slots=True)
class EventContext:
    session: AsyncSession
    event_id: str
    event_type: str
    fetched: Fetched
    now: datetime  # the runtime's clock (back-off of automatic top-ups is counted from it)
    grace: timedelta = DEFAULT_GRACE  # a past-due subscription's grace period


Handler = Callable[[EventContext, JsonObject], Awaitable[str]]
Prefetch = Callable[[PrefetchContext, JsonObject], Awaitable[Fetched]]


def _unknown(ctx: EventContext, obj: JsonObject) -> str:
    log.warning("Stripe event %s (%s) for %s: no such purchase", ctx.event_id, ctx.event_type, obj.get("id"))
    return UNKNOWN_PURCHASE


def _session_ids(checkout: JsonObject) -> JsonObject:
    """How a Checkout Session leads to its purchase (``find_purchase``'s keywords)."""
    return {
        "checkout_session_id": fields.text(checkout.get("id")),
        "purchase_id": fields.metadata(checkout).get("purchase_id") or checkout.get("client_reference_id"),
    }


def _intent_ids(intent: JsonObject) -> JsonObject:
    return {
        "payment_intent_id": fields.text(intent.get("id")),
        "purchase_id": fields.metadata(intent).get("purchase_id"),
    }


def _dispute_ids(dispute: JsonObject) -> JsonObject:
    return {
        "payment_intent_id": fields.id_of(dispute.get("payment_intent")),
        "charge_id": fields.id_of(dispute.get("charge")),
    }


def _session_paid(checkout: JsonObject) -> bool:
    return checkout.get("status") == "complete" and checkout.get("payment_status") == "paid"


def _intent_receipt(intent: JsonObject) -> str | None:
    """The receipt of an intent's latest charge, when the event carries the charge expanded."""
    charge = intent.get("latest_charge")
    return fields.text(charge.get("receipt_url")) if isinstance(charge, dict) else None


async def _payment_charge(ctx: PrefetchContext, intent_id: str | None, ids: JsonObject) -> Fetched:
    """The payment's latest charge (its id and receipt, which the event does not carry), when
    the event's purchase is still to be credited."""
    if intent_id is None or not await purchases.awaits_credit(ctx.sessions, **ids):
        return Fetched()
    return Fetched(charge=await ctx.gateway.latest_charge(intent_id))


async def _session_purchase(ctx: EventContext, checkout: JsonObject) -> Purchase | None:
    return await purchases.find_purchase(ctx.session, **_session_ids(checkout))


async def _prefetch_session_payment(ctx: PrefetchContext, checkout: JsonObject) -> Fetched:
    if not _session_paid(checkout):
        return Fetched()
    return await _payment_charge(ctx, fields.id_of(checkout.get("payment_intent")), _session_ids(checkout))


async def _credit_session(ctx: EventContext, checkout: JsonObject) -> str:
    purchase = await _session_purchase(ctx, checkout)
    if purchase is None:
        return _unknown(ctx, checkout)
    intent_id = fields.id_of(checkout.get("payment_intent"))
    if not _session_paid(checkout):
        return await purchases.await_delayed_payment(ctx.session, purchase, intent_id, ctx.event_id)
    amount = checkout.get("amount_total")
    payment = Payment(
        event_id=ctx.event_id,
        object_id=str(checkout.get("id")),
        amount_minor=amount if isinstance(amount, int) else -1,
        currency=str(checkout.get("currency") or ""),
        payment_intent_id=intent_id,
    )
    return await purchases.credit_purchase(ctx.session, purchase, payment, ctx.fetched.charge)


async def prefetch_checkout_session_completed(ctx: PrefetchContext, checkout: JsonObject) -> Fetched:
    """Payment mode: the payment's charge. Setup mode: the card the session's SetupIntent saved,
    made the customer's default in Stripe. Subscription mode: the subscription it made."""
    if checkout.get("mode") == "payment":
        return await _prefetch_session_payment(ctx, checkout)
    if checkout.get("mode") == "subscription":
        return await _read_subscription(ctx, fields.id_of(checkout.get("subscription")))
    if checkout.get("mode") != "setup":
        return Fetched()
    setup_intent_id = fields.id_of(checkout.get("setup_intent"))
    customer_id = fields.id_of(checkout.get("customer"))
    if setup_intent_id is None or customer_id is None:
        return Fetched()
    setup_intent = await ctx.gateway.retrieve_setup_intent(setup_intent_id)
    method_id = fields.id_of(setup_intent.payment_method)
    if setup_intent.status != "succeeded" or method_id is None:
        return Fetched()
    await purchases.make_default_in_stripe(
        ctx.sessions, ctx.gateway, customer_id=customer_id, payment_method_id=method_id
    )
    return Fetched(saved_card=method_id)


async def checkout_session_completed(ctx: EventContext, checkout: JsonObject) -> str:
    """Payment mode: paid -> credit; unpaid (a bank debit) -> wait for the async outcome.
    Setup mode: the saved card becomes the default payment method. Subscription mode: the
    subscription as Stripe has it (its tokens come with its invoice)."""
    if checkout.get("mode") == "subscription":
        return await _sync_subscription(ctx)
    if checkout.get("mode") == "setup":
        customer_id = fields.id_of(checkout.get("customer"))
        if customer_id is None or ctx.fetched.saved_card is None:
            return "ignored"
        return await purchases.save_default_payment_method(
            ctx.session,
            customer_id=customer_id,
            payment_method_id=ctx.fetched.saved_card,
            event_id=ctx.event_id,
        )
    if checkout.get("mode") != "payment":
        return "ignored"
    return await _credit_session(ctx, checkout)


async def checkout_session_async_payment_succeeded(ctx: EventContext, checkout: JsonObject) -> str:
    return await _credit_session(ctx, checkout)


async def checkout_session_async_payment_failed(ctx: EventContext, checkout: JsonObject) -> str:
    purchase = await _session_purchase(ctx, checkout)
    if purchase is None:
        return _unknown(ctx, checkout)
    purchases.link_payment_intent(purchase, fields.id_of(checkout.get("payment_intent")))
    return await purchases.fail_purchase(
        ctx.session, purchase, purchase.failure_reason or "The delayed payment (bank debit) failed.", ctx.now
    )


async def checkout_session_expired(ctx: EventContext, checkout: JsonObject) -> str:
    if checkout.get("mode") == "subscription":
        return await subscriptions.checkout_expired(ctx.session, checkout, ctx.now)
    if checkout.get("mode") != "payment":
        return "ignored"
    purchase = await _session_purchase(ctx, checkout)
    if purchase is None:
        return _unknown(ctx, checkout)
    return await purchases.expire_purchase(ctx.session, purchase, ctx.now)


async def _intent_purchase(ctx: EventContext, intent: JsonObject) -> Purchase | None:
    return await purchases.find_purchase(ctx.session, **_intent_ids(intent))


async def prefetch_payment_intent_succeeded(ctx: PrefetchContext, intent: JsonObject) -> Fetched:
    if intent.get("status") != "succeeded" or _intent_receipt(intent) is not None:
        return Fetched()
    return await _payment_charge(ctx, fields.text(intent.get("id")), _intent_ids(intent))


async def payment_intent_succeeded(ctx: EventContext, intent: JsonObject) -> str:
    purchase = await _intent_purchase(ctx, intent)
    if purchase is None:
        return _unknown(ctx, intent)
    if intent.get("status") != "succeeded":
        return "ignored"
    received = intent.get("amount_received")
    payment = Payment(
        event_id=ctx.event_id,
        object_id=str(intent.get("id")),
        amount_minor=received if isinstance(received, int) else -1,
        currency=str(intent.get("currency") or ""),
        payment_intent_id=fields.text(intent.get("id")),
        charge_id=fields.id_of(intent.get("latest_charge")),
        receipt_url=_intent_receipt(intent),
    )
    return await purchases.credit_purchase(ctx.session, purchase, payment, ctx.fetched.charge)


async def payment_intent_payment_failed(ctx: EventContext, intent: JsonObject) -> str:
    """A saved-card (or automatic) charge that failed: FAILED with the reason. On a Checkout
    page a declined card leaves the session open for another try: the purchase stays
    PENDING (it expires with the session). An automatic top-up whose card needs its holder
    stays PENDING for the payment page that the top-up job opens."""
    purchase = await _intent_purchase(ctx, intent)
    if purchase is None:
        return _unknown(ctx, intent)
    error = intent.get("last_payment_error")
    error = error if isinstance(error, dict) else {}
    reason = purchases.decline_reason(
        fields.text(error.get("message")),
        fields.text(error.get("decline_code")) or fields.text(error.get("code")),
    )
    purchases.link_payment_intent(purchase, fields.text(intent.get("id")))
    if purchase.method == PurchaseMethod.CHECKOUT or purchase.checkout_session_id is not None:
        return await purchases.note_declined_attempt(ctx.session, purchase, reason)
    if purchase.method == PurchaseMethod.AUTO_TOP_UP and error.get("code") == purchases.ACTION_REQUIRED:
        return await purchases.note_action_required(ctx.session, purchase, reason)
    return await purchases.fail_purchase(ctx.session, purchase, reason, ctx.now)


async def _charge_purchase(ctx: EventContext, charge: JsonObject) -> Purchase | None:
    return await purchases.find_purchase(
        ctx.session,
        payment_intent_id=fields.id_of(charge.get("payment_intent")),
        charge_id=fields.text(charge.get("id")),
        purchase_id=fields.metadata(charge).get("purchase_id"),
    )


async def charge_refunded(ctx: EventContext, charge: JsonObject) -> str:
    purchase = await _charge_purchase(ctx, charge)
    if purchase is None:
        return _unknown(ctx, charge)
    return await purchases.apply_refund(ctx.session, purchase, charge, ctx.event_id)


async def _dispute_purchase(ctx: EventContext, dispute: JsonObject) -> Purchase | None:
    return await purchases.find_purchase(ctx.session, **_dispute_ids(dispute))


async def prefetch_charge_dispute_created(ctx: PrefetchContext, dispute: JsonObject) -> Fetched:
    """The disputed charge, when the purchase was never credited: it shows whether it was paid."""
    charge_id = fields.id_of(dispute.get("charge"))
    if charge_id is None or not await purchases.awaits_credit(ctx.sessions, **_dispute_ids(dispute)):
        return Fetched()
    return Fetched(charge=await ctx.gateway.retrieve_charge(charge_id))


async def charge_dispute_created(ctx: EventContext, dispute: JsonObject) -> str:
    purchase = await _dispute_purchase(ctx, dispute)
    if purchase is None:
        return _unknown(ctx, dispute)
    return await purchases.apply_dispute(ctx.session, purchase, dispute, ctx.event_id, ctx.fetched.charge)


async def prefetch_charge_dispute_closed(ctx: PrefetchContext, dispute: JsonObject) -> Fetched:
    """A won dispute reads nothing (it gives back only what its opening took); a lost one seen
    first is applied as if just opened."""
    if dispute.get("status") in purchases.MERCHANT_KEPT_STATES:
        return Fetched()
    return await prefetch_charge_dispute_created(ctx, dispute)


async def charge_dispute_closed(ctx: EventContext, dispute: JsonObject) -> str:
    """Won: the tokens the dispute took back are given back. Lost: they stay taken back."""
    purchase = await _dispute_purchase(ctx, dispute)
    if purchase is None:
        return _unknown(ctx, dispute)
    return await purchases.close_dispute(
        ctx.session, purchase, dispute, ctx.event_id, ctx.fetched.charge, ctx.now
    )


async def charge_dispute_funds_reinstated(ctx: EventContext, dispute: JsonObject) -> str:
    """Stripe gives the disputed funds back: the dispute was won. Sent with (before) its
    ``closed``; whichever comes first gives the tokens back, the other finds it done."""
    if dispute.get("status") != "won":
        return "ignored"
    return await charge_dispute_closed(ctx, dispute)


async def prefetch_setup_intent_succeeded(ctx: PrefetchContext, setup_intent: JsonObject) -> Fetched:
    """The saved card made the customer's default in Stripe (the event says which card)."""
    customer_id = fields.id_of(setup_intent.get("customer"))
    method_id = fields.id_of(setup_intent.get("payment_method"))
    if customer_id is not None and method_id is not None:
        await purchases.make_default_in_stripe(
            ctx.sessions, ctx.gateway, customer_id=customer_id, payment_method_id=method_id
        )
    return Fetched()


async def setup_intent_succeeded(ctx: EventContext, setup_intent: JsonObject) -> str:
    customer_id = fields.id_of(setup_intent.get("customer"))
    method_id = fields.id_of(setup_intent.get("payment_method"))
    if customer_id is None or method_id is None:
        return "ignored"
    return await purchases.save_default_payment_method(
        ctx.session, customer_id=customer_id, payment_method_id=method_id, event_id=ctx.event_id
    )


# -- subscriptions: every event reads the subscription from Stripe and applies that ---------------


async def _read_subscription(
    ctx: PrefetchContext, subscription_id: str | None, fallback: JsonObject | None = None
) -> Fetched:
    """The subscription as Stripe has it now, and the number taken before asking. One Stripe
    no longer knows (deleted, or a reset test mode) is taken as the event carries it."""
    if subscription_id is None:
        return Fetched()
    seq = await subscriptions.next_seq(ctx.sessions)
    try:
        found = subscriptions.as_json(await ctx.gateway.retrieve_subscription(subscription_id))
    except stripe.InvalidRequestError:
        if fallback is None:
            raise
        found = fallback
    return Fetched(subscription=found, sync_seq=seq)


async def _sync_subscription(ctx: EventContext) -> str:
    if ctx.fetched.subscription is None:
        return "ignored"
    return await subscriptions.apply_subscription(
        ctx.session, ctx.fetched.subscription, seq=ctx.fetched.sync_seq, now=ctx.now, grace=ctx.grace
    )


async def prefetch_subscription_event(ctx: PrefetchContext, subscription: JsonObject) -> Fetched:
    return await _read_subscription(ctx, fields.text(subscription.get("id")), subscription)


async def customer_subscription_changed(ctx: EventContext, subscription: JsonObject) -> str:
    """``customer.subscription.*``: whatever changed, ours becomes Stripe's object as it is now."""
    return await _sync_subscription(ctx)


async def prefetch_invoice_event(ctx: PrefetchContext, invoice: JsonObject) -> Fetched:
    return await _read_subscription(ctx, subscriptions.invoice_subscription_id(invoice))


async def invoice_paid(ctx: EventContext, invoice: JsonObject) -> str:
    """The subscription as it stands, then the invoice's tokens, once per invoice."""
    synced = await _sync_subscription(ctx)
    if synced == "unknown_subscription":
        return synced
    return await subscriptions.invoice_paid(ctx.session, invoice, ctx.now, ctx.grace)


async def invoice_payment_failed(ctx: EventContext, invoice: JsonObject) -> str:
    """The subscription (now past due, with its grace period), then the organization told."""
    synced = await _sync_subscription(ctx)
    if synced == "unknown_subscription":
        return synced
    return await subscriptions.invoice_payment_failed(ctx.session, invoice, ctx.now)


async def invoice_changed(ctx: EventContext, invoice: JsonObject) -> str:
    """Other invoice events: the invoice (and its subscription) as they now stand."""
    synced = await _sync_subscription(ctx)
    if synced == "unknown_subscription":
        return synced
    return await subscriptions.record_invoice(ctx.session, invoice)


SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
)
INVOICE_EVENTS = (
    "invoice.created",
    "invoice.finalized",
    "invoice.updated",
    "invoice.voided",
    "invoice.marked_uncollectible",
)

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": checkout_session_completed,
    "checkout.session.async_payment_succeeded": checkout_session_async_payment_succeeded,
    "checkout.session.async_payment_failed": checkout_session_async_payment_failed,
    "checkout.session.expired": checkout_session_expired,
    "payment_intent.succeeded": payment_intent_succeeded,
    "payment_intent.payment_failed": payment_intent_payment_failed,
    "charge.refunded": charge_refunded,
    "charge.dispute.created": charge_dispute_created,
    "charge.dispute.closed": charge_dispute_closed,
    "charge.dispute.funds_reinstated": charge_dispute_funds_reinstated,
    "setup_intent.succeeded": setup_intent_succeeded,
    "invoice.paid": invoice_paid,
    "invoice.payment_failed": invoice_payment_failed,
    **dict.fromkeys(SUBSCRIPTION_EVENTS, customer_subscription_changed),
    **dict.fromkeys(INVOICE_EVENTS, invoice_changed),
}

#: What a type's handler needs from Stripe, asked before the event's transaction.
PREFETCH: dict[str, Prefetch] = {
    "checkout.session.completed": prefetch_checkout_session_completed,
    "checkout.session.async_payment_succeeded": _prefetch_session_payment,
    "payment_intent.succeeded": prefetch_payment_intent_succeeded,
    "charge.dispute.created": prefetch_charge_dispute_created,
    "charge.dispute.closed": prefetch_charge_dispute_closed,
    "setup_intent.succeeded": prefetch_setup_intent_succeeded,
    "invoice.paid": prefetch_invoice_event,
    "invoice.payment_failed": prefetch_invoice_event,
    **dict.fromkeys(SUBSCRIPTION_EVENTS, prefetch_subscription_event),
    **dict.fromkeys(INVOICE_EVENTS, prefetch_invoice_event),
}
