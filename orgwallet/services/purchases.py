"""Buying tokens: Checkout and saved-card purchases, saving a card, the purchase history, and
what Stripe's verified events do to a purchase.

Tokens are credited in one place, ``credit_purchase``, called only for a verified webhook
event that shows the payment paid, with the amount and currency of the purchase. It locks the
purchase row, and credits through ``ledger.credit`` with the key ``purchase:<id>``: whatever
arrives twice, concurrently or out of order, a purchase is credited once. Refunds and disputes
take back, through ``ledger.clawback``, what is left of the purchase's lot, and record on the
purchase what had been spent already (the shortfall).

Stripe is called with idempotency keys derived from the purchase (``purchase-<id>-checkout``,
``purchase-<id>-charge``), so a retried request never pays twice.

Stripe is never called inside a transaction (the gateway refuses): a call that hangs must hold
no pool connection and no lock. A purchase is committed PENDING first, Stripe is called, and
what it answered is written in another short transaction. An event's handler reads (or does)
in Stripe what it needs before the event's transaction (``awaits_credit``,
``make_default_in_stripe``) and is handed the result.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import stripe
from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.db.engine import driver_connection, transaction
from orgwallet.db.models import (
    Organization,
    PaymentAlert,
    Purchase,
    PurchaseMethod,
    PurchaseStatus,
    StripeCustomer,
    TokenPackage,
)
from orgwallet.errors import IdempotencyConflict, InvalidInput, NotFound, OrgWalletError
from orgwallet.money import format_amount
from orgwallet.payments import fields
from orgwallet.payments.gateway import CheckoutLink, PaymentDeclined, StripeGateway
from orgwallet.services import access, audit, autotopup, notifications, pricing, validation, wallets
from orgwallet.services.notifications import NotificationKind

log = logging.getLogger(__name__)

#: The actor of everything Stripe's events do (ledger entries, audit rows).
STRIPE_ACTOR = audit.STRIPE_ACTOR
MAX_PAGE = 500
MAX_URL_LENGTH = 2048

PAID_STATES = frozenset(
    {PurchaseStatus.PAID, PurchaseStatus.REFUNDED, PurchaseStatus.PARTIALLY_REFUNDED, PurchaseStatus.DISPUTED}
)
CLOSED_DISPUTE_STATES = frozenset({"won", "lost", "warning_closed"})
#: Closed with the money the merchant's: the dispute's tokens are given back.
MERCHANT_KEPT_STATES = frozenset({"won", "warning_closed"})


class PaymentMethodRequired(OrgWalletError):
    """The organization has no saved card to charge (``setupPaymentMethod`` saves one)."""

    code = "PAYMENT_METHOD_REQUIRED"

    def __init__(self, organization_id: uuid.UUID) -> None:
        super().__init__("the organization has no saved payment method: save one with setupPaymentMethod")
        self.organization_id = organization_id


@dataclass(frozen=True, slots=True)
class CheckoutStarted:
    purchase: Purchase
    checkout_url: str
    replayed: bool = False


class PaymentProviderError(OrgWalletError):
    """Stripe (or the way to it) failed on a call that was not a decline: the purchase it was
    for is FAILED with the reason (never left PENDING with nobody to finish it)."""

    code = "PAYMENT_PROVIDER_ERROR"

    def __init__(self, message: str, purchase: Purchase | None = None) -> None:
        super().__init__(message)
        self.purchase = purchase


def provider_failure(error: stripe.StripeError) -> str:
    """What a failed call to Stripe tells the buyer. After a lost connection or a server error
    Stripe may have charged all the same: then its webhook credits the purchase as usual."""
    detail = error.user_message or type(error).__name__
    if indeterminate(error):
        return (
            f"the payment provider could not be reached or failed ({detail}); if the payment went "
            "through after all, the tokens are added when the provider confirms it"
        )
    return f"the payment provider refused the request ({detail})"


def indeterminate(error: stripe.StripeError) -> bool:
    """Whether Stripe may have done what it was asked (the answer was lost, or it failed)."""
    return isinstance(error, stripe.APIConnectionError | stripe.APIError | stripe.RateLimitError)


#: A Checkout purchase whose session Stripe never confirmed is removed after this long.
ABANDONED_AFTER = timedelta(hours=1)
#: The actor of the duty that removes them (``purchases.abandoned``).
ABANDONED_ACTOR = "system:purchases.abandoned"


async def remove_abandoned(sessions: async_sessionmaker[AsyncSession], now: datetime) -> int:
    """Removes Checkout purchases left without a session (Stripe failed, and nobody came back
    with the same key): they hold no money, no tokens and no page anyone could pay."""
    async with transaction(sessions) as session:
        removed = (
            (
                await session.execute(
                    delete(Purchase)
                    .where(
                        col(Purchase.status) == PurchaseStatus.PENDING,
                        col(Purchase.method) == PurchaseMethod.CHECKOUT,
                        col(Purchase.checkout_session_id).is_(None),
                        col(Purchase.created_at) < now - ABANDONED_AFTER,
                    )
                    .returning(Purchase)
                )
            )
            .scalars()
            .all()
        )
        for purchase in removed:
            await audit.record(
                session,
                ABANDONED_ACTOR,
                action="purchase.remove_abandoned",
                organization_id=purchase.organization_id,
                target_type="purchase",
                target_id=purchase.id,
                before=_purchase_snapshot(purchase),
            )
    return len(removed)


@contextmanager
def _provider_call() -> Iterator[None]:
    """Stripe calls made before any purchase exists: a failure is a typed error, nothing more."""
    try:
        yield
    except stripe.StripeError as error:
        raise PaymentProviderError(provider_failure(error)) from error


@dataclass(frozen=True, slots=True)
class SavedCardOutcome:
    """The purchase after the charge; ``declined`` when the card was declined (the purchase
    is then FAILED with the reason), ``provider_error`` when Stripe itself failed (FAILED too)."""

    purchase: Purchase
    declined: PaymentDeclined | None = None
    provider_error: PaymentProviderError | None = None


@dataclass(frozen=True, slots=True)
class _Priced:
    package_id: uuid.UUID | None
    tokens: int
    amount_minor: int
    currency: str


# ---------------------------------------------------------------- starting a purchase


def return_url(value: str, field: str) -> str:
    cleaned = (value or "").strip()
    parts = urlsplit(cleaned)
    if len(cleaned) > MAX_URL_LENGTH or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"{field} must be an http(s) URL", field=field)
    return cleaned


async def _price(
    session: AsyncSession,
    settings: Settings,
    organization_id: uuid.UUID,
    package_id: uuid.UUID | None,
    tokens: object | None,
) -> _Priced:
    if (package_id is None) == (tokens is None):
        raise InvalidInput("give exactly one of packageId and tokens", field="packageId")
    if package_id is not None:
        priced = await pricing.price_package(session, organization_id, package_id)
        return _Priced(
            package_id=priced.package.id,
            tokens=priced.package.tokens,
            amount_minor=priced.price_minor,
            currency=priced.package.currency,
        )
    quote = await pricing.price_tokens(session, settings, organization_id, tokens)
    return _Priced(
        package_id=None,
        tokens=quote.tokens,
        amount_minor=quote.price_minor,
        currency=quote.currency,
    )


async def _by_key(session: AsyncSession, organization_id: uuid.UUID, key: str) -> Purchase | None:
    statement = (
        select(Purchase)
        .where(col(Purchase.organization_id) == organization_id, col(Purchase.idempotency_key) == key)
        .execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalars().one_or_none()


async def _same_request(
    session: AsyncSession,
    existing: Purchase,
    method: PurchaseMethod,
    key: str,
    *,
    package_id: uuid.UUID | None,
    tokens: object | None,
) -> Purchase:
    """A purchase already made under the key: the same request again is answered with it
    (whatever the prices are now); another request under the same key is a conflict."""
    same = (
        existing.method == method
        and existing.package_id == package_id
        and (
            package_id is not None
            or (tokens is not None and not isinstance(tokens, bool) and existing.tokens == tokens)
        )
    )
    if not same:
        wallet_id = await wallets.wallet_id_of(session, existing.organization_id)
        raise IdempotencyConflict(wallet_id, key)
    return existing


async def _insert(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    priced: _Priced,
    method: PurchaseMethod,
    key: str | None,
) -> Purchase | None:
    """The new PENDING purchase; None when a purchase under ``key`` exists (a concurrent
    request inserted it first: the insert waited for it)."""
    statement = insert(Purchase).values(
        id=uuid7(),  # time-ordered: the history pages on it
        organization_id=organization_id,
        package_id=priced.package_id,
        tokens=priced.tokens,
        amount_minor=priced.amount_minor,
        currency=priced.currency,
        status=PurchaseStatus.PENDING.value,
        method=method.value,
        idempotency_key=key,
        created_by=principal.actor,
    )
    if key is not None:
        statement = statement.on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
    inserted = await session.execute(statement.returning(Purchase))
    return inserted.scalar_one_or_none()


def _purchase_snapshot(purchase: Purchase) -> dict[str, Any]:
    return {
        "reference": purchase.reference,
        "method": purchase.method,
        "status": purchase.status,
        "tokens": purchase.tokens,
        "amount_minor": purchase.amount_minor,
        "currency": purchase.currency,
        "package_id": str(purchase.package_id) if purchase.package_id else None,
    }


async def stripe_customer(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    organization_id: uuid.UUID,
    *,
    replace: str | None = None,
) -> str:
    """The organization's Stripe customer, created on first need: read in a short transaction,
    created in Stripe outside any (under the organization's key, so concurrent first needs get
    one customer), recorded in another. ``replace``: a customer id Stripe no longer knows
    (deleted in the dashboard, or a restarted simulator): make a new one."""
    async with transaction(sessions) as session:
        row = await session.get(StripeCustomer, organization_id, populate_existing=True)
        if row is not None and row.customer_id != replace:
            return row.customer_id
        organization = await session.get(Organization, organization_id)
        if organization is None:
            raise NotFound("organization not found")
    key = (
        f"org-{organization_id}-customer"
        if replace is None
        else f"org-{organization_id}-customer-{uuid.uuid4()}"
    )
    customer = await gateway.create_customer(
        name=organization.name,
        email=None,
        metadata={"organization_id": str(organization_id), "slug": organization.slug},
        idempotency_key=key,
    )
    upsert = insert(StripeCustomer).values(organization_id=organization_id, customer_id=customer.id)
    async with transaction(sessions) as session:
        if replace is None:
            # A concurrent first need may have recorded it meanwhile: the same customer (same key),
            # and maybe already its card, which must stay.
            await session.execute(upsert.on_conflict_do_nothing(index_elements=["organization_id"]))
        else:
            await session.execute(
                upsert.on_conflict_do_update(
                    index_elements=["organization_id"],
                    set_={"customer_id": customer.id, "default_payment_method": None, "updated_at": _now()},
                    where=col(StripeCustomer.customer_id) == replace,
                )
            )
        row = await session.get(StripeCustomer, organization_id, populate_existing=True)
        assert row is not None
        return row.customer_id


def missing_customer(error: stripe.InvalidRequestError) -> bool:
    return error.code == "resource_missing" and error.param == "customer"


async def _product_name(session: AsyncSession, purchase: Purchase) -> str:
    """The Checkout line item: the package's name, or the number of tokens. Read from the
    purchase, so a checkout finished by a replay sends Stripe the same parameters."""
    if purchase.package_id is None:
        return f"{purchase.tokens} tokens"
    package = await session.get(TokenPackage, purchase.package_id)
    assert package is not None  # a purchase's package can be archived, not deleted
    return package.name


async def start_checkout(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    settings: Settings,
    organization_id: uuid.UUID,
    *,
    package_id: uuid.UUID | None,
    tokens: object | None,
    success_url: str,
    cancel_url: str,
    idempotency_key: str | None,
) -> CheckoutStarted:
    """A PENDING purchase and its Stripe Checkout Session (mode payment, the purchase id in
    its metadata). With an idempotency key, the same request again returns the same purchase.

    Runs its own transactions, as ``purchase_with_saved_card`` does: the purchase is committed,
    then the customer and the session are made in Stripe, then the session is recorded on the
    purchase. The same key again finishes a purchase left without a session (a crash or a
    Stripe failure in between) under the same Stripe idempotency key, so Stripe answers the
    session it made, never a second one. Without a key, a purchase whose session could not be
    made is deleted: no request can come back for it."""
    method = PurchaseMethod.CHECKOUT
    async with transaction(sessions) as session:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_PURCHASE)
        key = None if idempotency_key is None else validation.idempotency_key(idempotency_key)
        success = return_url(success_url, "successUrl")
        cancel = return_url(cancel_url, "cancelUrl")
        purchase = None if key is None else await _by_key(session, organization_id, key)
        replayed = purchase is not None
        if purchase is None:
            priced = await _price(session, settings, organization_id, package_id, tokens)
            purchase = await _insert(session, principal, organization_id, priced, method, key)
            if purchase is None:  # a concurrent request with the key committed it meanwhile
                assert key is not None
                purchase = await _by_key(session, organization_id, key)
                assert purchase is not None
                replayed = True
        if replayed:
            assert key is not None
            purchase = await _same_request(
                session, purchase, method, key, package_id=package_id, tokens=tokens
            )
            if purchase.checkout_url is not None:
                return CheckoutStarted(purchase, purchase.checkout_url, replayed=True)
        product_name = await _product_name(session, purchase)

    try:
        link = await _payment_checkout(sessions, gateway, purchase, product_name, success, cancel)
    except Exception as error:
        # Without a key, or when Stripe surely made nothing (it refused the request), nobody can
        # come back for the purchase: the failed request leaves nothing behind. With a key, after
        # a lost answer or a server error Stripe may have made the session: the purchase waits
        # for the same key (the same Stripe idempotency key gives the same session), and the
        # ``purchases.abandoned`` duty removes it if nobody comes back.
        maybe_made = not isinstance(error, stripe.StripeError) or indeterminate(error)
        if key is None or not maybe_made:
            async with transaction(sessions) as session:
                await session.execute(delete(Purchase).where(col(Purchase.id) == purchase.id))
        if not isinstance(error, stripe.StripeError):
            raise
        reason = provider_failure(error)
        if key is not None and maybe_made:
            reason += "; try again with the same idempotency key"
        raise PaymentProviderError(reason) from error

    async with transaction(sessions) as session:
        purchase = await _lock(session, purchase.id)
        if purchase.checkout_url is not None:  # a concurrent replay recorded the same session
            return CheckoutStarted(purchase, purchase.checkout_url, replayed=True)
        purchase.checkout_session_id = link.session_id
        purchase.checkout_url = link.url
        purchase.updated_at = _now()
        await session.flush()
        await audit.record(
            session,
            principal,
            action="purchase.start_checkout",
            organization_id=organization_id,
            target_type="purchase",
            target_id=purchase.id,
            after=_purchase_snapshot(purchase) | {"checkout_session_id": link.session_id},
        )
    return CheckoutStarted(purchase, link.url, replayed=replayed)


async def _payment_checkout(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    purchase: Purchase,
    product_name: str,
    success_url: str,
    cancel_url: str,
) -> CheckoutLink:
    """The purchase's Checkout Session, made in Stripe (no transaction open) under keys derived
    from the purchase."""
    organization_id = purchase.organization_id
    customer_id = await stripe_customer(sessions, gateway, organization_id)
    arguments: dict[str, Any] = {
        "purchase_id": str(purchase.id),
        "amount_minor": purchase.amount_minor,
        "currency": purchase.currency,
        "product_name": product_name,
        "success_url": success_url,
        "cancel_url": cancel_url,
        # What the hosted pages and receipts show besides the amount (as Stripe carries it).
        "metadata": {
            "organization_id": str(organization_id),
            "reference": purchase.reference,
            "tokens": str(purchase.tokens),
        },
    }
    try:
        return await gateway.create_payment_checkout(
            customer_id=customer_id, idempotency_key=f"purchase-{purchase.id}-checkout", **arguments
        )
    except stripe.InvalidRequestError as error:
        if not missing_customer(error):
            raise
        customer_id = await stripe_customer(sessions, gateway, organization_id, replace=customer_id)
        return await gateway.create_payment_checkout(
            customer_id=customer_id, idempotency_key=f"purchase-{purchase.id}-checkout-2", **arguments
        )


async def _saved_card(session: AsyncSession, organization_id: uuid.UUID) -> tuple[str, str | None]:
    """The customer to charge off-session, and its card as recorded here (None when the setup's
    webhook has not arrived yet); ``PaymentMethodRequired`` if the organization has no customer."""
    row = await session.get(StripeCustomer, organization_id, populate_existing=True)
    if row is None:
        raise PaymentMethodRequired(organization_id)
    return row.customer_id, row.default_payment_method


async def _stripe_default_card(gateway: StripeGateway, organization_id: uuid.UUID, customer_id: str) -> str:
    """The customer's default card as Stripe has it, when none is recorded here: the setup's
    webhook may not have arrived yet, and Stripe's own word is the truth. Asked with no
    transaction open; ``PaymentMethodRequired`` if there is none."""
    try:
        method = await gateway.default_payment_method_id(customer_id)
    except stripe.InvalidRequestError as error:
        if error.code == "resource_missing":
            raise PaymentMethodRequired(organization_id) from error
        raise
    if method is None:
        raise PaymentMethodRequired(organization_id)
    return method


async def purchase_with_saved_card(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    settings: Settings,
    organization_id: uuid.UUID,
    *,
    package_id: uuid.UUID | None,
    tokens: object | None,
    idempotency_key: str,
    method: PurchaseMethod = PurchaseMethod.SAVED_CARD,
) -> SavedCardOutcome:
    """Charges the organization's default card off-session.

    Runs its own transactions: the request is checked and priced, and the card looked up, in a
    first one (Stripe is asked for the card after it, if none is recorded); the PENDING purchase
    is committed BEFORE Stripe is charged, so the payment's webhook events (which may arrive
    before this call returns) always find it; the outcome of the charge is written afterwards.
    Without a card, nothing is written. Tokens come from the webhook. The same key again
    returns the purchase, and charges a purchase left uncharged (a crash between the two) with
    the same Stripe idempotency key, so it is never charged twice."""
    priced: _Priced | None = None
    async with transaction(sessions) as session:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_PURCHASE)
        key = validation.idempotency_key(idempotency_key)
        purchase = await _by_key(session, organization_id, key)
        if purchase is not None:
            purchase = await _same_request(
                session, purchase, method, key, package_id=package_id, tokens=tokens
            )
            if purchase.status != PurchaseStatus.PENDING or purchase.payment_intent_id is not None:
                return SavedCardOutcome(purchase)
        else:
            priced = await _price(session, settings, organization_id, package_id, tokens)
        customer_id, payment_method = await _saved_card(session, organization_id)
    if not payment_method:
        with _provider_call():
            payment_method = await _stripe_default_card(gateway, organization_id, customer_id)
    if priced is not None:
        async with transaction(sessions) as session:
            purchase = await _insert(session, principal, organization_id, priced, method, key)
            if purchase is None:  # a concurrent request with the key committed it meanwhile
                existing = await _by_key(session, organization_id, key)
                assert existing is not None
                return SavedCardOutcome(
                    await _same_request(session, existing, method, key, package_id=package_id, tokens=tokens)
                )
            await audit.record(
                session,
                principal,
                action="purchase.saved_card"
                if method == PurchaseMethod.SAVED_CARD
                else "purchase.auto_top_up",
                organization_id=organization_id,
                target_type="purchase",
                target_id=purchase.id,
                after=_purchase_snapshot(purchase) | {"payment_method": payment_method},
            )
    assert purchase is not None
    return await charge_saved_card(sessions, gateway, purchase, customer_id, payment_method)


async def charge_saved_card(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    purchase: Purchase,
    customer_id: str,
    payment_method: str,
    now: datetime | None = None,
) -> SavedCardOutcome:
    """Charges a committed PENDING purchase off-session (no transaction open while Stripe is
    called; the purchase's own Stripe idempotency key), then records the outcome. A decline
    fails the purchase, except a card that needs its holder (``needs_action``): that purchase
    stays PENDING for a payment page."""
    try:
        intent = await gateway.charge_saved_payment_method(
            customer_id=customer_id,
            payment_method_id=payment_method,
            amount_minor=purchase.amount_minor,
            currency=purchase.currency,
            metadata={
                "purchase_id": str(purchase.id),
                "organization_id": str(purchase.organization_id),
                "reference": purchase.reference,
                "tokens": str(purchase.tokens),
            },
            idempotency_key=f"purchase-{purchase.id}-charge",
            description=f"{purchase.tokens} tokens ({purchase.reference})",
        )
    except PaymentDeclined as declined:
        async with transaction(sessions) as session:
            failed = await _lock(session, purchase.id)
            link_payment_intent(failed, declined.payment_intent_id)
            reason = decline_reason(declined.message, declined.decline_code or declined.stripe_code)
            before = _purchase_snapshot(failed)
            if declined.stripe_code == ACTION_REQUIRED and failed.method == PurchaseMethod.AUTO_TOP_UP:
                await note_action_required(session, failed, reason)
            elif _fail(failed, reason):
                await _stripe_audit(
                    session, failed, "purchase.failed", before=before, after=_purchase_snapshot(failed)
                )
                await _failed(session, failed, now)
            await session.flush()
        return SavedCardOutcome(failed, declined)
    except stripe.StripeError as error:
        reason = provider_failure(error)
        async with transaction(sessions) as session:
            failed = await _lock(session, purchase.id)
            if failed.payment_intent_id is None:  # a webhook may have linked (or paid) it meanwhile
                await fail_purchase(session, failed, reason, now)
            await session.flush()
        return SavedCardOutcome(failed, provider_error=PaymentProviderError(reason, failed))
    async with transaction(sessions) as session:
        charged = await _lock(session, purchase.id)
        link_payment_intent(charged, intent.id)
        await session.flush()
    return SavedCardOutcome(charged)


#: Stripe's code for an off-session payment that needs the card holder (authentication).
ACTION_REQUIRED = "authentication_required"


def needs_action(purchase: Purchase) -> bool:
    """A PENDING automatic top-up whose card asked for its holder: it waits for a payment page."""
    return (
        purchase.status == PurchaseStatus.PENDING
        and purchase.method == PurchaseMethod.AUTO_TOP_UP
        and ACTION_REQUIRED in (purchase.failure_reason or "")
    )


async def note_action_required(session: AsyncSession, purchase: Purchase, reason: str) -> str:
    """An automatic top-up's card needs its holder: not a failure to retry in a loop. The
    purchase stays PENDING (in flight: no other top-up starts) until its payment page is paid
    or expires."""
    if purchase.status != PurchaseStatus.PENDING:
        return "ignored"
    noted = reason[:1000] if ACTION_REQUIRED in reason else f"{reason} ({ACTION_REQUIRED})"
    if purchase.failure_reason != noted:  # the charge's answer, then its event: one change
        purchase.failure_reason = noted
        purchase.updated_at = _now()
        await session.flush()
        await _stripe_audit(session, purchase, "purchase.action_required", after={"failure_reason": noted})
    return "action_required"


async def open_action_page(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, purchase: Purchase
) -> str:
    """A Checkout page for a top-up whose card needs its holder, and the notification that
    links to it (PAYMENT_ACTION_REQUIRED); paying it credits the purchase like any other."""
    back = (settings.app_url or settings.public_url).rstrip("/")
    link = await _payment_checkout(
        sessions,
        gateway,
        purchase,
        f"{purchase.tokens} tokens (automatic top-up {purchase.reference})",
        f"{back}/?top-up={purchase.reference}",
        f"{back}/?top-up={purchase.reference}&cancelled=1",
    )
    async with transaction(sessions) as session:
        locked = await _lock(session, purchase.id)
        if locked.checkout_session_id is None:
            locked.checkout_session_id = link.session_id
            locked.action_url = link.url
            locked.updated_at = _now()
            await session.flush()
            await audit.record(
                session,
                autotopup.ACTOR,
                action="purchase.action_page",
                organization_id=locked.organization_id,
                target_type="purchase",
                target_id=locked.id,
                after={"checkout_session_id": link.session_id, "action_url": link.url},
            )
            await notifications.notify(
                session,
                locked.organization_id,
                NotificationKind.PAYMENT_ACTION_REQUIRED,
                key=f"action-required:{locked.id}",
                title="Your card needs you to complete a top-up",
                body=(
                    f"The bank asks the card holder to confirm the automatic top-up {locked.reference} "
                    f"({locked.tokens:,} tokens, {format_amount(locked.amount_minor, locked.currency)}). "
                    f"Complete it here: {link.url}"
                ),
                data=_notice_data(locked) | {"url": link.url},
            )
    return link.url


async def purchase_by_key(session: AsyncSession, organization_id: uuid.UUID, key: str) -> Purchase | None:
    return await _by_key(session, organization_id, key)


async def insert_auto_top_up(
    session: AsyncSession,
    organization_id: uuid.UUID,
    *,
    tokens: int,
    amount_minor: int,
    currency: str,
    package_id: uuid.UUID | None,
    key: str,
    actor: str,
    trigger: str,
) -> Purchase:
    """The PENDING purchase of an automatic top-up (unique in flight per organization)."""
    purchase = (
        await session.execute(
            insert(Purchase)
            .values(
                id=uuid7(),
                organization_id=organization_id,
                package_id=package_id,
                tokens=tokens,
                amount_minor=amount_minor,
                currency=currency,
                status=PurchaseStatus.PENDING.value,
                method=PurchaseMethod.AUTO_TOP_UP.value,
                idempotency_key=key,
                created_by=actor,
            )
            .returning(Purchase)
        )
    ).scalar_one()
    await audit.record(
        session,
        actor,
        action="purchase.auto_top_up",
        organization_id=organization_id,
        target_type="purchase",
        target_id=purchase.id,
        after=_purchase_snapshot(purchase) | {"trigger": trigger},
    )
    return purchase


async def _setup_checkout(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    organization_id: uuid.UUID,
    success: str,
    cancel: str,
) -> tuple[str, CheckoutLink]:
    customer_id = await stripe_customer(sessions, gateway, organization_id)
    metadata = {"organization_id": str(organization_id)}
    attempt = uuid.uuid4()
    try:
        link = await gateway.create_setup_checkout(
            customer_id=customer_id,
            success_url=success,
            cancel_url=cancel,
            idempotency_key=f"org-{organization_id}-setup-{attempt}",
            metadata=metadata,
        )
    except stripe.InvalidRequestError as error:
        if not missing_customer(error):
            raise
        customer_id = await stripe_customer(sessions, gateway, organization_id, replace=customer_id)
        link = await gateway.create_setup_checkout(
            customer_id=customer_id,
            success_url=success,
            cancel_url=cancel,
            idempotency_key=f"org-{organization_id}-setup-{attempt}-2",
            metadata=metadata,
        )
    return customer_id, link


async def setup_payment_method(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    organization_id: uuid.UUID,
    *,
    success_url: str,
    cancel_url: str,
) -> CheckoutLink:
    """A Checkout Session in setup mode: the card saved there becomes the organization's
    default payment method when its webhook arrives. Stripe is called between two short
    transactions: the authorization, and the audit row."""
    async with transaction(sessions) as session:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_PURCHASE)
    success = return_url(success_url, "successUrl")
    cancel = return_url(cancel_url, "cancelUrl")
    with _provider_call():
        customer_id, link = await _setup_checkout(sessions, gateway, organization_id, success, cancel)
    async with transaction(sessions) as session:
        await audit.record(
            session,
            principal,
            action="payment_method.setup_started",
            organization_id=organization_id,
            target_type="stripe_customer",
            target_id=customer_id,
            after={"checkout_session_id": link.session_id},
        )
    return link


# ---------------------------------------------------------------- reads


async def get_purchase(
    session: AsyncSession, principal: Principal, purchase_id: uuid.UUID
) -> Purchase | None:
    """The purchase, or None when it does not exist or is another organization's."""
    row = await session.get(Purchase, purchase_id, populate_existing=True)
    if row is None:
        return None
    if not await access.can_view(session, principal, row.organization_id):
        return None
    return row


@dataclass(frozen=True, slots=True)
class PurchasePage:
    purchases: list[Purchase]
    has_next: bool


def encode_cursor(purchase_id: uuid.UUID) -> str:
    return validation.id_cursor("purchase", purchase_id)


async def list_purchases(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    first: int,
    after: str | None,
    statuses: Sequence[PurchaseStatus] | None,
) -> PurchasePage:
    """Newest first. Ids are time-ordered (UUID v7), so a page never shifts when purchases
    are added."""
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    if not 0 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 0 and {MAX_PAGE}", field="first")
    statement = select(Purchase).where(col(Purchase.organization_id) == organization_id)
    if after is not None:
        statement = statement.where(col(Purchase.id) < validation.id_after("purchase", after))
    if statuses:
        statement = statement.where(col(Purchase.status).in_([s.value for s in statuses]))
    rows = list(
        (
            await session.execute(
                statement.order_by(col(Purchase.id).desc())
                .limit(first + 1)
                .execution_options(populate_existing=True)
            )
        ).scalars()
    )
    return PurchasePage(purchases=rows[:first], has_next=len(rows) > first)


# ---------------------------------------------------------------- what Stripe's events do


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment a verified Stripe event reports as paid, with the figures it carried."""

    event_id: str
    object_id: str  # the cs_, pi_ or ch_ the figures come from
    amount_minor: int
    currency: str
    payment_intent_id: str | None = None
    charge_id: str | None = None
    receipt_url: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


async def _lock(session: AsyncSession, purchase_id: uuid.UUID) -> Purchase:
    row = await session.get(Purchase, purchase_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise NotFound("purchase not found")
    return row


async def find_purchase(
    session: AsyncSession,
    *,
    purchase_id: object = None,
    checkout_session_id: str | None = None,
    payment_intent_id: str | None = None,
    charge_id: str | None = None,
    lock: bool = True,
) -> Purchase | None:
    """The purchase a Stripe object belongs to, locked (``FOR UPDATE``) for the rest of the
    transaction unless ``lock=False``: by the Stripe ids recorded on it, else by the
    ``purchase_id`` in metadata."""
    lookups = [
        (col(Purchase.checkout_session_id), checkout_session_id),
        (col(Purchase.payment_intent_id), payment_intent_id),
        (col(Purchase.charge_id), charge_id),
        (col(Purchase.id), fields.uuid_in(purchase_id)),
    ]
    for column, value in lookups:
        if value is None:
            continue
        statement = select(Purchase).where(column == value).execution_options(populate_existing=True)
        row = (await session.execute(statement.with_for_update() if lock else statement)).scalar_one_or_none()
        if row is not None:
            return row
    return None


@asynccontextmanager
async def _autocommit(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session whose statements each run on their own (autocommit): reads made before a call
    to Stripe, which then holds no transaction and no lock."""
    async with sessions() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


async def awaits_credit(
    sessions: async_sessionmaker[AsyncSession],
    *,
    purchase_id: object = None,
    checkout_session_id: str | None = None,
    payment_intent_id: str | None = None,
    charge_id: str | None = None,
) -> bool:
    """Whether the purchase a Stripe object belongs to (found as ``find_purchase`` finds it)
    exists and is not credited yet. Read before an event's transaction, so that Stripe is
    asked for the payment's charge only when the event may credit it (of the two events of a
    payment, the second asks nothing)."""
    async with _autocommit(sessions) as session:
        purchase = await find_purchase(
            session,
            purchase_id=purchase_id,
            checkout_session_id=checkout_session_id,
            payment_intent_id=payment_intent_id,
            charge_id=charge_id,
            lock=False,
        )
    return purchase is not None and purchase.lot_id is None


def link_payment_intent(purchase: Purchase, payment_intent_id: str | None) -> None:
    if payment_intent_id and purchase.payment_intent_id is None:
        purchase.payment_intent_id = payment_intent_id
        purchase.updated_at = _now()


async def await_delayed_payment(
    session: AsyncSession, purchase: Purchase, payment_intent_id: str | None, event_id: str
) -> str:
    """A Checkout completed with a delayed method (a bank debit): the purchase stays PENDING
    until Stripe reports the payment's outcome."""
    link_payment_intent(purchase, payment_intent_id)
    await session.flush()
    await _stripe_audit(
        session,
        purchase,
        "purchase.awaiting_payment",
        after={"payment_intent_id": purchase.payment_intent_id, "stripe_event": event_id},
    )
    return "awaiting_payment"


def decline_reason(message: str | None, code: str | None) -> str:
    reason = (message or "The payment failed.").strip()
    if code and code not in reason:
        reason = f"{reason} ({code})"
    return reason[:1000]


def _fail(purchase: Purchase, reason: str) -> bool:
    if purchase.status != PurchaseStatus.PENDING:
        return False
    purchase.status = PurchaseStatus.FAILED
    purchase.failure_reason = reason
    purchase.updated_at = _now()
    return True


async def _stripe_audit(
    session: AsyncSession,
    purchase: Purchase,
    action: str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """The audit row of a change Stripe's answer made to a purchase."""
    await audit.record(
        session,
        STRIPE_ACTOR,
        action=action,
        organization_id=purchase.organization_id,
        target_type="purchase",
        target_id=purchase.id,
        before=before,
        after=after,
    )


async def _alert_mismatch(session: AsyncSession, purchase: Purchase, payment: Payment) -> str:
    kind = "currency_mismatch" if payment.currency.upper() != purchase.currency else "amount_mismatch"
    session.add(
        PaymentAlert(
            kind=kind,
            organization_id=purchase.organization_id,
            purchase_id=purchase.id,
            stripe_event_id=payment.event_id,
            stripe_object_id=payment.object_id,
            expected_amount_minor=purchase.amount_minor,
            expected_currency=purchase.currency,
            received_amount_minor=payment.amount_minor,
            received_currency=payment.currency,
        )
    )
    await _stripe_audit(
        session,
        purchase,
        f"purchase.{kind}",
        before=_purchase_snapshot(purchase),
        after={
            "stripe_event": payment.event_id,
            "stripe_object": payment.object_id,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
        },
    )
    log.error(
        "payment %s for purchase %s (%s) does not match it: paid %s %s, expected %s %s; nothing credited",
        payment.object_id,
        purchase.reference,
        purchase.id,
        payment.amount_minor,
        payment.currency,
        purchase.amount_minor,
        purchase.currency,
    )
    await session.flush()
    return "mismatch"


#: Marks a credited purchase paid, with its lot, and writes its audit row: one statement, sent
#: on the driver (the transaction has begun). The jsonb values are sent as text.
_PAID_AUDIT = audit.driver_insert(
    8, after_extra="jsonb_build_object('lot_id', coalesce(paid.lot_id::text, 'None'))", source="FROM paid"
)
_MARK_PAID = f"""
    WITH paid AS (
        UPDATE purchases
        SET status = $2, lot_id = (SELECT id FROM credit_lots WHERE entry_id = $3),
            paid_at = $4, updated_at = $4, receipt_url = $5, charge_id = $6,
            failure_reason = NULL, payment_intent_id = $7
        WHERE id = $1
        RETURNING lot_id
    ), audited AS (
        {_PAID_AUDIT}
    )
    SELECT lot_id FROM paid
"""  # noqa: S608 (constant SQL)
_WALLET_OF = "SELECT id FROM wallets WHERE organization_id = $1"


async def credit_purchase(
    session: AsyncSession, purchase: Purchase, payment: Payment, latest_charge: stripe.Charge | None = None
) -> str:
    """Credits a paid purchase once (``purchase`` locked by ``find_purchase``). A payment whose
    amount or currency is not the purchase's is recorded as an alert and credits nothing.
    ``latest_charge``: the payment's charge, read from Stripe before the transaction when the
    event carries no receipt; its id and receipt are recorded on the purchase."""
    if purchase.lot_id is not None:
        link_payment_intent(purchase, payment.payment_intent_id)
        await session.flush()
        return "already_credited"
    if payment.amount_minor != purchase.amount_minor or payment.currency.upper() != purchase.currency:
        return await _alert_mismatch(session, purchase, payment)
    charge_id, receipt_url = payment.charge_id, payment.receipt_url
    if receipt_url is None and latest_charge is not None:
        charge_id, receipt_url = charge_id or latest_charge.id, latest_charge.receipt_url
    # Plain statements on the driver: the transaction has begun (the purchase is locked in it).
    driver = await driver_connection(session)
    wallet_id = await driver.fetchval(_WALLET_OF, purchase.organization_id)
    if wallet_id is None:
        raise NotFound("wallet not found")
    posting = await ledger.credit(
        session,
        wallet_id,
        amount=purchase.tokens,
        source=ledger.GrantSource.PURCHASE,
        actor=STRIPE_ACTOR,
        key=f"purchase:{purchase.id}",
        cost_minor=purchase.amount_minor,
        currency=purchase.currency,
        reason=f"purchase {purchase.reference}",
        reference_id=purchase.id,
    )
    assert posting.entry is not None
    before = _purchase_snapshot(purchase)
    now = _now()
    paid = {
        "status": PurchaseStatus.PAID,
        "paid_at": now,
        "updated_at": now,
        "receipt_url": receipt_url or purchase.receipt_url,
        "charge_id": purchase.charge_id or charge_id,
        "failure_reason": None,
        "payment_intent_id": purchase.payment_intent_id
        if purchase.payment_intent_id is not None
        else payment.payment_intent_id or None,
    }
    # The lot, the purchase and its audit row in one statement (no ORM flush): the purchase
    # object is brought up to date as loaded, so nothing is written twice.
    lot_id = await driver.fetchval(
        _MARK_PAID,
        purchase.id,
        PurchaseStatus.PAID.value,
        posting.entry.id,
        now,
        paid["receipt_url"],
        paid["charge_id"],
        paid["payment_intent_id"],
        *audit.driver_values(
            audit.entry(
                STRIPE_ACTOR,
                action="purchase.paid",
                organization_id=purchase.organization_id,
                target_type="purchase",
                target_id=purchase.id,
                before=before,
                after=before | {"status": PurchaseStatus.PAID, "stripe_event": payment.event_id},
            )
        ),
    )
    for name, value in (paid | {"lot_id": lot_id}).items():
        set_committed_value(purchase, name, value)
    if purchase.method == PurchaseMethod.AUTO_TOP_UP:
        await autotopup.on_paid(session, purchase)
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.PURCHASE_PAID,
        key=f"purchase-paid:{purchase.id}",
        title=f"{purchase.tokens:,} tokens added",
        body=f"Purchase {purchase.reference} is paid: {purchase.tokens:,} tokens were added to the wallet.",
        data=_notice_data(purchase),
    )
    return "credited"


async def fail_purchase(
    session: AsyncSession, purchase: Purchase, reason: str, now: datetime | None = None
) -> str:
    """A payment that did not go through: a PENDING purchase becomes FAILED (no tokens)."""
    before = _purchase_snapshot(purchase)
    if not _fail(purchase, reason[:1000]):
        return "ignored"
    await session.flush()
    await _stripe_audit(
        session, purchase, "purchase.failed", before=before, after=_purchase_snapshot(purchase)
    )
    await _failed(session, purchase, now)
    return "failed"


def _notice_data(purchase: Purchase) -> dict[str, Any]:
    return {
        "purchaseId": str(purchase.id),
        "reference": purchase.reference,
        "tokens": purchase.tokens,
        "amountMinor": purchase.amount_minor,
        "currency": purchase.currency,
    }


async def _failed(session: AsyncSession, purchase: Purchase, now: datetime | None) -> None:
    """What follows a purchase that did not get paid: the organization is told, and an automatic
    top-up's policy backs off."""
    if purchase.method == PurchaseMethod.AUTO_TOP_UP:
        await autotopup.on_failed(session, purchase, now)
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.PURCHASE_FAILED,
        key=f"purchase-failed:{purchase.id}",
        title="A payment did not go through",
        body=f"The payment of purchase {purchase.reference} failed: {purchase.failure_reason}",
        data=_notice_data(purchase) | {"reason": purchase.failure_reason},
    )


async def note_declined_attempt(session: AsyncSession, purchase: Purchase, reason: str) -> str:
    """A declined attempt on a Checkout page: the session stays open (the buyer may try
    another card), so the purchase stays PENDING; the reason is kept for the history."""
    if purchase.status != PurchaseStatus.PENDING:
        return "ignored"
    purchase.failure_reason = reason[:1000]
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session, purchase, "purchase.attempt_declined", after={"failure_reason": purchase.failure_reason}
    )
    return "attempt_declined"


async def expire_purchase(session: AsyncSession, purchase: Purchase, now: datetime | None = None) -> str:
    if purchase.status != PurchaseStatus.PENDING:
        return "ignored"
    before = _purchase_snapshot(purchase)
    purchase.status = PurchaseStatus.EXPIRED
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session, purchase, "purchase.expired", before=before, after=_purchase_snapshot(purchase)
    )
    if purchase.method == PurchaseMethod.AUTO_TOP_UP:  # its payment page was never paid
        await autotopup.on_failed(session, purchase, now)
    return "expired"


def _refunded_status(purchase: Purchase) -> PurchaseStatus:
    """A credited purchase's status as its refunds leave it (no dispute standing)."""
    if purchase.refunded_minor >= purchase.amount_minor:
        return PurchaseStatus.REFUNDED
    return PurchaseStatus.PARTIALLY_REFUNDED if purchase.refunded_minor > 0 else PurchaseStatus.PAID


async def _claw_back(
    session: AsyncSession, purchase: Purchase, tokens: int, *, key: str, reason: str
) -> tuple[int, int]:
    """Takes back up to ``tokens`` from the purchase's lot: (taken, shortfall)."""
    if tokens <= 0:
        return 0, 0
    assert purchase.lot_id is not None
    posting = await ledger.clawback(
        session,
        purchase.lot_id,
        amount=tokens,
        key=key,
        actor=STRIPE_ACTOR,
        reason=reason,
        reference_id=purchase.id,
    )
    taken = -posting.entry.amount if posting.entry is not None else 0
    return taken, tokens - taken


async def apply_refund(
    session: AsyncSession, purchase: Purchase, charge: dict[str, Any], event_id: str
) -> str:
    """``charge.refunded``: takes back the refunded share of the tokens (refunded amount /
    amount * tokens, rounded down; all of them for a full refund) as far as they are left in
    the lot; the rest is recorded as the shortfall. ``amount_refunded`` is cumulative, so a
    late or repeated event takes nothing more."""
    if purchase.lot_id is None:
        # The refund arrived before the payment's own event: the charge shows it was paid (and
        # carries its receipt).
        if not (charge.get("paid") and charge.get("status") == "succeeded"):
            return "ignored"
        outcome = await credit_purchase(session, purchase, _charge_payment(charge, event_id))
        if outcome == "mismatch":
            return outcome
    refunded = min(int(charge.get("amount_refunded") or 0), purchase.amount_minor)
    if refunded <= purchase.refunded_minor:
        return "already_refunded"
    before = _purchase_snapshot(purchase)
    target = refunded * purchase.tokens // purchase.amount_minor
    owed = target - purchase.tokens_clawed_back - purchase.shortfall
    taken, short = await _claw_back(
        session,
        purchase,
        owed,
        key=f"purchase:{purchase.id}:refund:{refunded}",
        reason=f"refund of purchase {purchase.reference}",
    )
    purchase.refunded_minor = refunded
    purchase.tokens_clawed_back += taken
    purchase.shortfall += short
    if purchase.status != PurchaseStatus.DISPUTED:
        purchase.status = _refunded_status(purchase)
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session,
        purchase,
        "purchase.refunded",
        before=before,
        after=_purchase_snapshot(purchase)
        | {"refunded_minor": refunded, "clawed_back": taken, "shortfall": short, "stripe_event": event_id},
    )
    await _tell_taken_back(
        session,
        purchase,
        key=f"purchase-refunded:{purchase.id}:{refunded}",
        title=f"Purchase {purchase.reference} refunded",
        what=f"{format_amount(refunded, purchase.currency)} of purchase {purchase.reference} was refunded",
        taken=taken,
        short=short,
        data={"refundedMinor": refunded},
    )
    return "refunded"


async def _tell_taken_back(
    session: AsyncSession,
    purchase: Purchase,
    *,
    key: str,
    title: str,
    what: str,
    taken: int,
    short: int,
    data: dict[str, Any],
) -> None:
    """PURCHASE_REFUNDED, for a refund or a dispute: what happened, and the tokens it took back."""
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.PURCHASE_REFUNDED,
        key=key,
        title=title,
        body=f"{what}; {taken:,} tokens were taken back from the wallet"
        + (f" ({short:,} had been spent already)." if short else "."),
        data=_notice_data(purchase) | data | {"tokensTakenBack": taken, "shortfall": short},
    )


class StripeNotRead(RuntimeError):
    """An event's transaction needs from Stripe what was not read before it (the purchase became
    findable, uncredited, in between): the event fails, and is handled again when retried."""


def _dispute_key(purchase: Purchase, dispute_id: str) -> str:
    """The ledger key of what a dispute took back (``ledger.reinstate`` gives it back)."""
    return f"purchase:{purchase.id}:dispute:{dispute_id}"


def _note_dispute(purchase: Purchase, dispute: dict[str, Any]) -> None:
    """The dispute's amount and opening time, from the first of its events that is applied."""
    dispute_id = str(dispute.get("id"))
    if purchase.dispute_id == dispute_id and purchase.dispute_opened_at is not None:
        return
    amount, created = dispute.get("amount"), dispute.get("created")
    purchase.dispute_id = dispute_id
    purchase.dispute_amount_minor = (
        amount if isinstance(amount, int) and amount >= 0 else purchase.amount_minor - purchase.refunded_minor
    )
    purchase.dispute_opened_at = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else _now()
    purchase.dispute_tokens_taken = purchase.dispute_shortfall = purchase.dispute_tokens_returned = 0


def _dispute_snapshot(purchase: Purchase) -> dict[str, Any]:
    return {
        "dispute_id": purchase.dispute_id,
        "dispute_status": purchase.dispute_status,
        "dispute_tokens_taken": purchase.dispute_tokens_taken,
        "dispute_tokens_returned": purchase.dispute_tokens_returned,
        "tokens_clawed_back": purchase.tokens_clawed_back,
        "shortfall": purchase.shortfall,
    }


async def apply_dispute(
    session: AsyncSession,
    purchase: Purchase,
    dispute: dict[str, Any],
    event_id: str,
    charge: stripe.Charge | None,
) -> str:
    """``charge.dispute.created`` (or a closed dispute seen first): takes back everything left
    of the purchase's tokens; what was spent is the shortfall. Both are recorded as the
    dispute's, for a won dispute to give back. ``charge``: the disputed charge, read from
    Stripe before the transaction when the purchase was not credited yet."""
    dispute_id = str(dispute.get("id"))
    status = str(dispute.get("status") or "")
    if purchase.dispute_id == dispute_id and purchase.dispute_status in CLOSED_DISPUTE_STATES:
        return "already_closed"  # a late 'created' after its 'closed'
    if purchase.lot_id is None:
        charge_id = dispute.get("charge")
        if not isinstance(charge_id, str):
            return "ignored"
        if charge is None:
            raise StripeNotRead(f"charge {charge_id} of the dispute of purchase {purchase.id}")
        paid = charge.to_dict()
        if not (paid.get("paid") and paid.get("status") == "succeeded"):
            return "ignored"
        outcome = await credit_purchase(session, purchase, _charge_payment(paid, event_id))
        if outcome == "mismatch":
            return outcome
    before = _purchase_snapshot(purchase)
    owed = purchase.tokens - purchase.tokens_clawed_back - purchase.shortfall
    taken, short = await _claw_back(
        session,
        purchase,
        owed,
        key=_dispute_key(purchase, dispute_id),
        reason=f"dispute of purchase {purchase.reference}",
    )
    _note_dispute(purchase, dispute)
    purchase.tokens_clawed_back += taken
    purchase.shortfall += short
    purchase.dispute_tokens_taken += taken
    purchase.dispute_shortfall += short
    purchase.status = PurchaseStatus.DISPUTED
    if purchase.dispute_status not in CLOSED_DISPUTE_STATES:
        purchase.dispute_status = status or None
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session,
        purchase,
        "purchase.disputed",
        before=before,
        after=_purchase_snapshot(purchase)
        | {"dispute": dispute_id, "clawed_back": taken, "shortfall": short, "stripe_event": event_id},
    )
    await _tell_taken_back(
        session,
        purchase,
        key=f"purchase-disputed:{purchase.id}:{dispute_id}",
        title=f"Purchase {purchase.reference} disputed",
        what=f"The payment of purchase {purchase.reference} is disputed with the bank",
        taken=taken,
        short=short,
        data={"dispute": dispute_id},
    )
    return "disputed"


async def close_dispute(
    session: AsyncSession,
    purchase: Purchase,
    dispute: dict[str, Any],
    event_id: str,
    charge: stripe.Charge | None,
    now: datetime | None = None,
) -> str:
    """``charge.dispute.closed`` (and ``funds_reinstated``): records the outcome. Won, or an
    inquiry closed without a chargeback (``warning_closed``: the bank kept no money): what the
    dispute took back is given back (``_win_dispute``). Lost: the tokens stay taken back; a
    lost dispute seen before its opening is applied (``charge`` as for ``apply_dispute``)."""
    dispute_id = str(dispute.get("id"))
    status = str(dispute.get("status") or "")
    if status in MERCHANT_KEPT_STATES:
        return await _win_dispute(session, purchase, dispute, event_id, now)
    if purchase.dispute_id != dispute_id:
        await apply_dispute(session, purchase, dispute, event_id, charge)
    before = {"dispute_id": purchase.dispute_id, "dispute_status": purchase.dispute_status}
    _note_dispute(purchase, dispute)
    purchase.dispute_status = status
    if status in CLOSED_DISPUTE_STATES and purchase.dispute_closed_at is None:
        purchase.dispute_closed_at = now or _now()
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session,
        purchase,
        "purchase.dispute_closed",
        before=before,
        after={"dispute_id": dispute_id, "dispute_status": status, "stripe_event": event_id},
    )
    return f"dispute_{status}" if status else "dispute_closed"


async def _win_dispute(
    session: AsyncSession, purchase: Purchase, dispute: dict[str, Any], event_id: str, now: datetime | None
) -> str:
    """A dispute closed in our favour: the tokens its opening took back return, through the
    ledger, to the lot they came from (once: the key is derived from the dispute, and the
    ledger never gives back more than that clawback took, so a refund's clawback stays),
    the purchase is again PAID or PARTIALLY_REFUNDED, and the organization is told. Won
    before its opening was seen, nothing was taken and nothing is given back; the late
    opening is then ignored (``apply_dispute``), so either order ends with the same balance."""
    dispute_id = str(dispute.get("id"))
    if purchase.dispute_id == dispute_id and purchase.dispute_status == "won":
        return "already_won"
    before = _purchase_snapshot(purchase) | _dispute_snapshot(purchase)
    returned = 0
    if purchase.dispute_id == dispute_id and purchase.lot_id is not None:
        key = _dispute_key(purchase, dispute_id)
        posting = await ledger.reinstate(
            session,
            purchase.lot_id,
            clawback_key=key,
            key=f"{key}:won",
            actor=STRIPE_ACTOR,
            reason=f"dispute of purchase {purchase.reference} won",
        )
        returned = posting.entry.amount if posting.entry is not None and not posting.replayed else 0
        purchase.tokens_clawed_back -= returned
        purchase.shortfall -= purchase.dispute_shortfall
        purchase.dispute_tokens_returned += returned
        if purchase.status == PurchaseStatus.DISPUTED:
            purchase.status = _refunded_status(purchase)
    _note_dispute(purchase, dispute)
    purchase.dispute_status = "won"
    purchase.dispute_closed_at = now or _now()
    purchase.updated_at = _now()
    await session.flush()
    await _stripe_audit(
        session,
        purchase,
        "purchase.dispute_won",
        before=before,
        after=_purchase_snapshot(purchase)
        | _dispute_snapshot(purchase)
        | {"tokens_returned": returned, "stripe_event": event_id},
    )
    taken = purchase.dispute_tokens_taken
    await notifications.notify(
        session,
        purchase.organization_id,
        NotificationKind.PURCHASE_DISPUTE_WON,
        key=f"purchase-dispute-won:{purchase.id}:{dispute_id}",
        title=f"Dispute of purchase {purchase.reference} won",
        body=f"The bank dispute of purchase {purchase.reference} was decided in your favour: "
        + (
            f"the {returned:,} tokens it had taken back were given back to the wallet."
            if returned
            else "it had taken no tokens back, so none were given back."
        ),
        data=_notice_data(purchase)
        | {"dispute": dispute_id, "tokensTakenBack": taken, "tokensReturned": returned},
    )
    return "dispute_won"


def _charge_payment(charge: dict[str, Any], event_id: str) -> Payment:
    intent = charge.get("payment_intent")
    return Payment(
        event_id=event_id,
        object_id=str(charge.get("id")),
        amount_minor=int(charge.get("amount") or 0),
        currency=str(charge.get("currency") or ""),
        payment_intent_id=intent if isinstance(intent, str) else None,
        charge_id=str(charge.get("id")),
        receipt_url=charge.get("receipt_url"),
    )


async def make_default_in_stripe(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    *,
    customer_id: str,
    payment_method_id: str,
) -> None:
    """The Stripe half of ``save_default_payment_method``, before the event's transaction: the
    card becomes the customer's default in Stripe (for off-session charges) when the customer
    is one of ours and another card, or none, is recorded here. Stripe's update is idempotent,
    so concurrent events of one setup may both make it."""
    async with _autocommit(sessions) as session:
        row = (
            await session.execute(
                select(StripeCustomer).where(col(StripeCustomer.customer_id) == customer_id)
            )
        ).scalar_one_or_none()
    if row is not None and row.default_payment_method != payment_method_id:
        await gateway.set_default_payment_method(customer_id, payment_method_id)


async def save_default_payment_method(
    session: AsyncSession, *, customer_id: str, payment_method_id: str, event_id: str
) -> str:
    """A card saved through a setup Checkout becomes the customer's default here, once Stripe
    has it as the default (``make_default_in_stripe``, before the transaction)."""
    row = (
        await session.execute(
            select(StripeCustomer)
            .where(col(StripeCustomer.customer_id) == customer_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if row is None:
        return "unknown_customer"
    if row.default_payment_method == payment_method_id:
        return "already_saved"
    before = row.default_payment_method
    await session.execute(
        update(StripeCustomer)
        .where(col(StripeCustomer.organization_id) == row.organization_id)
        .values(default_payment_method=payment_method_id, updated_at=_now())
    )
    await audit.record(
        session,
        STRIPE_ACTOR,
        action="payment_method.saved",
        organization_id=row.organization_id,
        target_type="stripe_customer",
        target_id=customer_id,
        before={"default_payment_method": before},
        after={"default_payment_method": payment_method_id, "stripe_event": event_id},
    )
    return "payment_method_saved"
