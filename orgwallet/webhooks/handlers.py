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
from datetime import datetime
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from orgwallet.db.models import Purchase, PurchaseMethod
from orgwallet.payments.gateway import StripeGateway
from orgwallet.services import purchases
from orgwallet.services.purchases import Payment

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
UNKNOWN_PURCHASE = "unknown_purchase"


@dataclass(frozen=True, slots=True)
class Fetched:
    """What an event's prefetch read from Stripe for its handler."""

    charge: stripe.Charge | None = None  # the payment's (latest) or the disputed charge
    saved_card: str | None = None  # the card a setup saved, made the customer's default in Stripe


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


Handler = Callable[[EventContext, JsonObject], Awaitable[str]]
Prefetch = Callable[[PrefetchContext, JsonObject], Awaitable[Fetched]]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _id_of(value: object) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        return _str(value.get("id"))
    return _str(value)


def _metadata(obj: JsonObject) -> JsonObject:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _unknown(ctx: EventContext, obj: JsonObject) -> str:
    log.warning("Stripe event %s (%s) for %s: no such purchase", ctx.event_id, ctx.event_type, obj.get("id"))
    return UNKNOWN_PURCHASE


def _session_ids(checkout: JsonObject) -> JsonObject:
    """How a Checkout Session leads to its purchase (``find_purchase``'s keywords)."""
    return {
        "checkout_session_id": _str(checkout.get("id")),
        "purchase_id": _metadata(checkout).get("purchase_id") or checkout.get("client_reference_id"),
    }


def _intent_ids(intent: JsonObject) -> JsonObject:
    return {"payment_intent_id": _str(intent.get("id")), "purchase_id": _metadata(intent).get("purchase_id")}


def _dispute_ids(dispute: JsonObject) -> JsonObject:
    return {
        "payment_intent_id": _id_of(dispute.get("payment_intent")),
        "charge_id": _id_of(dispute.get("charge")),
    }


def _session_paid(checkout: JsonObject) -> bool:
    return checkout.get("status") == "complete" and checkout.get("payment_status") == "paid"


def _intent_receipt(intent: JsonObject) -> str | None:
    """The receipt of an intent's latest charge, when the event carries the charge expanded."""
    charge = intent.get("latest_charge")
    return _str(charge.get("receipt_url")) if isinstance(charge, dict) else None


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
    return await _payment_charge(ctx, _id_of(checkout.get("payment_intent")), _session_ids(checkout))


async def _credit_session(ctx: EventContext, checkout: JsonObject) -> str:
    purchase = await _session_purchase(ctx, checkout)
    if purchase is None:
        return _unknown(ctx, checkout)
    intent_id = _id_of(checkout.get("payment_intent"))
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
    made the customer's default in Stripe."""
    if checkout.get("mode") == "payment":
        return await _prefetch_session_payment(ctx, checkout)
    if checkout.get("mode") != "setup":
        return Fetched()
    setup_intent_id = _id_of(checkout.get("setup_intent"))
    customer_id = _id_of(checkout.get("customer"))
    if setup_intent_id is None or customer_id is None:
        return Fetched()
    setup_intent = await ctx.gateway.retrieve_setup_intent(setup_intent_id)
    method_id = _id_of(setup_intent.payment_method)
    if setup_intent.status != "succeeded" or method_id is None:
        return Fetched()
    await purchases.make_default_in_stripe(
        ctx.sessions, ctx.gateway, customer_id=customer_id, payment_method_id=method_id
    )
    return Fetched(saved_card=method_id)


async def checkout_session_completed(ctx: EventContext, checkout: JsonObject) -> str:
    """Payment mode: paid -> credit; unpaid (a bank debit) -> wait for the async outcome.
    Setup mode: the saved card becomes the default payment method."""
    if checkout.get("mode") == "setup":
        customer_id = _id_of(checkout.get("customer"))
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
    purchases.link_payment_intent(purchase, _id_of(checkout.get("payment_intent")))
    return await purchases.fail_purchase(
        ctx.session, purchase, purchase.failure_reason or "The delayed payment (bank debit) failed.", ctx.now
    )


async def checkout_session_expired(ctx: EventContext, checkout: JsonObject) -> str:
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
    return await _payment_charge(ctx, _str(intent.get("id")), _intent_ids(intent))


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
        payment_intent_id=_str(intent.get("id")),
        charge_id=_id_of(intent.get("latest_charge")),
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
        _str(error.get("message")), _str(error.get("decline_code")) or _str(error.get("code"))
    )
    purchases.link_payment_intent(purchase, _str(intent.get("id")))
    if purchase.method == PurchaseMethod.CHECKOUT or purchase.checkout_session_id is not None:
        return await purchases.note_declined_attempt(ctx.session, purchase, reason)
    if purchase.method == PurchaseMethod.AUTO_TOP_UP and error.get("code") == purchases.ACTION_REQUIRED:
        return await purchases.note_action_required(ctx.session, purchase, reason)
    return await purchases.fail_purchase(ctx.session, purchase, reason, ctx.now)


async def _charge_purchase(ctx: EventContext, charge: JsonObject) -> Purchase | None:
    return await purchases.find_purchase(
        ctx.session,
        payment_intent_id=_id_of(charge.get("payment_intent")),
        charge_id=_str(charge.get("id")),
        purchase_id=_metadata(charge).get("purchase_id"),
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
    charge_id = _id_of(dispute.get("charge"))
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
    if dispute.get("status") == "won":
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
    customer_id = _id_of(setup_intent.get("customer"))
    method_id = _id_of(setup_intent.get("payment_method"))
    if customer_id is not None and method_id is not None:
        await purchases.make_default_in_stripe(
            ctx.sessions, ctx.gateway, customer_id=customer_id, payment_method_id=method_id
        )
    return Fetched()


async def setup_intent_succeeded(ctx: EventContext, setup_intent: JsonObject) -> str:
    customer_id = _id_of(setup_intent.get("customer"))
    method_id = _id_of(setup_intent.get("payment_method"))
    if customer_id is None or method_id is None:
        return "ignored"
    return await purchases.save_default_payment_method(
        ctx.session, customer_id=customer_id, payment_method_id=method_id, event_id=ctx.event_id
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
}

#: What a type's handler needs from Stripe, asked before the event's transaction.
PREFETCH: dict[str, Prefetch] = {
    "checkout.session.completed": prefetch_checkout_session_completed,
    "checkout.session.async_payment_succeeded": _prefetch_session_payment,
    "payment_intent.succeeded": prefetch_payment_intent_succeeded,
    "charge.dispute.created": prefetch_charge_dispute_created,
    "charge.dispute.closed": prefetch_charge_dispute_closed,
    "setup_intent.succeeded": prefetch_setup_intent_succeeded,
}
