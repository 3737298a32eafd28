"""The one door to Stripe: ``StripeGateway``, a small async facade over the official SDK.

Every call goes through ``stripe.StripeClient`` (its ``*_async`` methods) with the API version
pinned in ``STRIPE_API_VERSION``. Create calls take a caller-chosen ``idempotency_key`` (derive
it from the purchase, e.g. ``f"purchase-{purchase.id}-checkout"``, so a retried request cannot
pay twice). What comes back are the SDK's own typed objects (``stripe.Customer``,
``stripe.PaymentIntent``, ...), except two small results: ``CheckoutLink`` and the errors below.

Usage::

    gateway = StripeGateway(settings.stripe_secret_key, settings.stripe_webhook_secret)
    customer = await gateway.create_customer(name=org.name, email=None,
                                             metadata={"organization_id": str(org.id)},
                                             idempotency_key=f"org-{org.id}-customer")
    link = await gateway.create_payment_checkout(
        customer_id=customer.id, purchase_id=str(purchase.id), amount_minor=4500, currency="usd",
        product_name="50 tokens", success_url=..., cancel_url=...,
        idempotency_key=f"purchase-{purchase.id}-checkout")
    # redirect the user to link.url; credit only from the verified webhook

    try:
        intent = await gateway.charge_saved_payment_method(...)
    except PaymentDeclined as declined:
        ...  # declined.decline_code, declined.message, declined.payment_intent_id

    # in POST /webhooks/stripe:
    try:
        event = gateway.construct_event(await request.body(), request.headers.get("stripe-signature"))
    except InvalidStripeWebhook:
        return Response(status_code=400)

Errors: a card decline is ``PaymentDeclined``; a webhook that fails verification is
``InvalidStripeWebhook``; everything else Stripe answers raises the SDK's own
``stripe.StripeError`` subclasses (``InvalidRequestError``, ``APIConnectionError``, ...).

Never inside a database transaction: every method that goes to Stripe first calls
``assert_no_transaction``, so inside ``transaction(...)`` it raises ``RemoteCallInTransaction``.
A call that hangs must not hold a pool connection or a row lock meanwhile: record the intent
and commit, call Stripe, then record the outcome in another transaction (or read Stripe first).

Talking to the offline simulator: pass ``api_base`` (e.g. ``http://127.0.0.1:8000/_stripe``).
The SDK's ``stripe.HTTPXClient`` builds its own ``httpx.AsyncClient`` and takes no transport,
so to reach a simulator mounted in the same process without a network port, pass
``http_client=TransportHTTPClient(httpx.ASGITransport(app=app))``: a subclass of the SDK's
documented extension point ``stripe.HTTPClient``, so the SDK still encodes every request,
parses every answer and raises its typed errors.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import httpx
import stripe

from orgwallet.db.engine import assert_no_transaction
from orgwallet.errors import OrgWalletError

# The Stripe API version this code is written against: the one the installed SDK is generated
# for (stripe-python pins one per release). Objects and webhook events are read in this shape.
# Webhook endpoints created in the Stripe dashboard should use the same version.
STRIPE_API_VERSION = "2026-10-28.endive"

WEBHOOK_TOLERANCE_SECONDS = 300
DEFAULT_MAX_NETWORK_RETRIES = 2

P = ParamSpec("P")
R = TypeVar("R")


class PaymentDeclined(OrgWalletError):
    """The card was declined (Stripe's ``CardError``)."""

    code = "PAYMENT_DECLINED"

    def __init__(
        self,
        message: str,
        *,
        stripe_code: str | None,
        decline_code: str | None,
        payment_intent_id: str | None,
        charge_id: str | None,
    ) -> None:
        super().__init__(message)
        self.stripe_code = stripe_code  # e.g. "card_declined", "expired_card"
        self.decline_code = decline_code  # e.g. "generic_decline", "insufficient_funds"
        self.payment_intent_id = payment_intent_id
        self.charge_id = charge_id


class InvalidStripeWebhook(OrgWalletError):
    """A webhook delivery that is not a verified Stripe event (bad or missing signature, stale
    timestamp, or a body that is not an event). The route answers 400 and stores nothing."""

    code = "INVALID_STRIPE_WEBHOOK"


@dataclass(frozen=True)
class CheckoutLink:
    """A Checkout Session to send the user to."""

    session_id: str
    url: str


class TransportHTTPClient(stripe.HTTPClient):
    """An async-only ``stripe.HTTPClient`` over any httpx transport (``httpx.ASGITransport``
    to reach an in-process app, or a mock transport). The SDK keeps its own retries."""

    name = "httpx-transport"

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout: float = 80.0) -> None:
        super().__init__()
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._http.request(method, url, headers=dict(headers), content=post_data)
        except httpx.HTTPError as exc:
            self._connection_error(exc)
        return response.content, response.status_code, response.headers

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[AsyncIterable[bytes], int, Mapping[str, str]]:
        content, status, response_headers = await self.request_async(method, url, headers, post_data)

        async def chunks() -> AsyncIterable[bytes]:
            yield content

        return chunks(), status, response_headers

    async def close_async(self) -> None:
        await self._http.aclose()

    async def sleep_async(self, secs: float) -> None:
        await asyncio.sleep(secs)

    @staticmethod
    def _connection_error(exc: Exception) -> NoReturn:
        raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]  # the SDK leaves it untyped
            f"Could not reach Stripe ({type(exc).__name__}: {exc})", should_retry=True
        ) from exc


def _remote(
    method: Callable[Concatenate[StripeGateway, P], Awaitable[R]],
) -> Callable[Concatenate[StripeGateway, P], Coroutine[Any, Any, R]]:
    """Marks a method that goes to Stripe: it refuses to run inside a database transaction."""
    what = f"Stripe {method.__name__}"

    @functools.wraps(method)
    async def checked(self: StripeGateway, /, *args: P.args, **kwargs: P.kwargs) -> R:
        assert_no_transaction(what)
        return await method(self, *args, **kwargs)

    return checked


class StripeGateway:
    """Stripe for this project. ``api_base`` points the SDK elsewhere (the simulator);
    ``http_client`` defaults to ``stripe.HTTPXClient()``; the gateway owns it (``close``)."""

    def __init__(
        self,
        secret_key: str,
        webhook_secret: str,
        *,
        api_base: str | None = None,
        http_client: stripe.HTTPClient | None = None,
        max_network_retries: int = DEFAULT_MAX_NETWORK_RETRIES,
    ) -> None:
        self._webhook_secret = webhook_secret
        self._http_client = http_client or stripe.HTTPXClient()
        self._client = stripe.StripeClient(
            secret_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            http_client=self._http_client,
            max_network_retries=max_network_retries,
        )

    async def close(self) -> None:
        await self._http_client.close_async()  # type: ignore[no-untyped-call]  # untyped in the SDK

    # -- customers -----------------------------------------------------------------------------

    @_remote
    async def create_customer(
        self,
        *,
        name: str | None,
        email: str | None,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> stripe.Customer:
        params: stripe.params.CustomerCreateParams = {"metadata": dict(metadata)}
        if name:
            params["name"] = name
        if email:
            params["email"] = email
        return await self._client.v1.customers.create_async(params, {"idempotency_key": idempotency_key})

    @_remote
    async def retrieve_customer(self, customer_id: str) -> stripe.Customer:
        return await self._client.v1.customers.retrieve_async(customer_id)

    @_remote
    async def set_default_payment_method(self, customer_id: str, payment_method_id: str) -> stripe.Customer:
        """Make ``payment_method_id`` (attached to the customer) the one charged off-session."""
        return await self._client.v1.customers.update_async(
            customer_id, {"invoice_settings": {"default_payment_method": payment_method_id}}
        )

    @_remote
    async def default_payment_method_id(self, customer_id: str) -> str | None:
        customer = await self.retrieve_customer(customer_id)
        settings = customer.invoice_settings
        default = settings.default_payment_method if settings else None
        if default is None or isinstance(default, str):
            return default
        return default.id

    @_remote
    async def list_payment_methods(
        self, customer_id: str, *, type: str = "card"
    ) -> list[stripe.PaymentMethod]:
        page = await self._client.v1.customers.payment_methods.list_async(
            customer_id, {"type": type, "limit": 100}
        )
        return list(page.data)

    # -- checkout ------------------------------------------------------------------------------

    @_remote
    async def create_payment_checkout(
        self,
        *,
        customer_id: str,
        purchase_id: str,
        amount_minor: int,
        currency: str,
        product_name: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> CheckoutLink:
        """A hosted Checkout page (mode payment) for one line item. ``purchase_id`` is put in
        the session's and the PaymentIntent's metadata (``purchase_id``) and as the session's
        ``client_reference_id``, so every event of the payment leads back to the purchase.
        ``success_url`` may contain ``{CHECKOUT_SESSION_ID}``."""
        all_metadata = {**(metadata or {}), "purchase_id": purchase_id}
        session = await self._client.v1.checkout.sessions.create_async(
            {
                "mode": "payment",
                "customer": customer_id,
                "client_reference_id": purchase_id,
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": currency.lower(),
                            "unit_amount": amount_minor,
                            "product_data": {"name": product_name},
                        },
                    }
                ],
                "metadata": all_metadata,
                "payment_intent_data": {"metadata": all_metadata},
                "success_url": success_url,
                "cancel_url": cancel_url,
            },
            {"idempotency_key": idempotency_key},
        )
        return _link(session)

    @_remote
    async def create_setup_checkout(
        self,
        *,
        customer_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> CheckoutLink:
        """A hosted Checkout page (mode setup) that saves a card on the customer. The card is
        then on ``setup_intent.payment_method`` of the completed session (event
        ``checkout.session.completed`` / ``setup_intent.succeeded``); make it the default with
        ``set_default_payment_method``."""
        params: stripe.params.checkout.SessionCreateParams = {
            "mode": "setup",
            "customer": customer_id,
            "allowed_payment_method_types": ["card"],
            "metadata": dict(metadata or {}),
            "setup_intent_data": {"metadata": dict(metadata or {})},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        session = await self._client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": idempotency_key}
        )
        return _link(session)

    @_remote
    async def retrieve_checkout_session(self, session_id: str) -> stripe.checkout.Session:
        return await self._client.v1.checkout.sessions.retrieve_async(session_id)

    @_remote
    async def expire_checkout_session(self, session_id: str) -> stripe.checkout.Session:
        return await self._client.v1.checkout.sessions.expire_async(session_id)

    @_remote
    async def retrieve_setup_intent(self, setup_intent_id: str) -> stripe.SetupIntent:
        return await self._client.v1.setup_intents.retrieve_async(setup_intent_id)

    # -- payments ------------------------------------------------------------------------------

    @_remote
    async def charge_saved_payment_method(
        self,
        *,
        customer_id: str,
        payment_method_id: str,
        amount_minor: int,
        currency: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
        description: str | None = None,
    ) -> stripe.PaymentIntent:
        """Charge a saved payment method now, without the customer (``off_session``).

        Returns the PaymentIntent (``status == "succeeded"`` when paid); raises
        ``PaymentDeclined`` when the card is declined (the intent then exists, with
        ``status == "requires_payment_method"``, and ``payment_intent.payment_failed`` follows)."""
        params: stripe.params.PaymentIntentCreateParams = {
            "amount": amount_minor,
            "currency": currency.lower(),
            "customer": customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "metadata": dict(metadata),
        }
        if description:
            params["description"] = description
        try:
            return await self._client.v1.payment_intents.create_async(
                params, {"idempotency_key": idempotency_key}
            )
        except stripe.CardError as error:
            raise declined(error) from error

    @_remote
    async def retrieve_payment_intent(self, payment_intent_id: str) -> stripe.PaymentIntent:
        return await self._client.v1.payment_intents.retrieve_async(payment_intent_id)

    @_remote
    async def retrieve_charge(self, charge_id: str) -> stripe.Charge:
        return await self._client.v1.charges.retrieve_async(charge_id)

    @_remote
    async def receipt_url(self, payment_intent_id: str) -> str | None:
        """The hosted receipt of the intent's latest charge, if it has one."""
        charge = await self.latest_charge(payment_intent_id)
        return charge.receipt_url if charge is not None else None

    @_remote
    async def latest_charge(self, payment_intent_id: str) -> stripe.Charge | None:
        """The intent's latest charge (its id, status and ``receipt_url``), in one request."""
        intent = await self._client.v1.payment_intents.retrieve_async(
            payment_intent_id, {"expand": ["latest_charge"]}
        )
        charge = intent.latest_charge
        if charge is None:
            return None
        if isinstance(charge, str):
            charge = await self.retrieve_charge(charge)
        return charge

    @_remote
    async def create_refund(
        self,
        *,
        payment_intent_id: str,
        idempotency_key: str,
        amount_minor: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> stripe.Refund:
        """Refund a paid intent, fully (``amount_minor=None``) or partly."""
        params: stripe.params.RefundCreateParams = {
            "payment_intent": payment_intent_id,
            "metadata": dict(metadata or {}),
        }
        if amount_minor is not None:
            params["amount"] = amount_minor
        return await self._client.v1.refunds.create_async(params, {"idempotency_key": idempotency_key})

    # -- products and recurring prices (subscription plans) -------------------------------------

    @_remote
    async def create_product(
        self, *, name: str, metadata: Mapping[str, str], idempotency_key: str
    ) -> stripe.Product:
        return await self._client.v1.products.create_async(
            {"name": name, "metadata": dict(metadata)}, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def update_product(
        self,
        product_id: str,
        *,
        idempotency_key: str,
        name: str | None = None,
        active: bool | None = None,
    ) -> stripe.Product:
        """Renames or (un)archives a product; an archived one cannot be put on new prices or
        subscriptions. The key must be new for each change: Stripe answers a reused key with
        the first answer, without applying the request again."""
        params: stripe.params.ProductUpdateParams = {}
        if name is not None:
            params["name"] = name
        if active is not None:
            params["active"] = active
        return await self._client.v1.products.update_async(
            product_id, params, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def retrieve_product(self, product_id: str) -> stripe.Product:
        return await self._client.v1.products.retrieve_async(product_id)

    @_remote
    async def create_recurring_price(
        self,
        *,
        product_id: str,
        unit_amount: int,
        currency: str,
        interval: str,
        interval_count: int,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> stripe.Price:
        """A licensed recurring price (``interval`` day, week, month or year, every
        ``interval_count`` of them). Prices are immutable: a new amount is a new price."""
        interval_value: Any = interval  # the SDK types it as a Literal of the four
        return await self._client.v1.prices.create_async(
            {
                "product": product_id,
                "unit_amount": unit_amount,
                "currency": currency.lower(),
                "recurring": {"interval": interval_value, "interval_count": interval_count},
                "metadata": dict(metadata),
            },
            {"idempotency_key": idempotency_key},
        )

    @_remote
    async def archive_price(self, price_id: str, *, idempotency_key: str) -> stripe.Price:
        """Takes a price off sale (``active=false``): subscriptions on it keep it."""
        return await self._client.v1.prices.update_async(
            price_id, {"active": False}, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def retrieve_price(self, price_id: str) -> stripe.Price:
        return await self._client.v1.prices.retrieve_async(price_id)

    # -- subscriptions -------------------------------------------------------------------------

    @_remote
    async def create_subscription_checkout(
        self,
        *,
        customer_id: str,
        price_id: str,
        client_reference_id: str,
        metadata: Mapping[str, str],
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CheckoutLink:
        """A hosted Checkout page (mode subscription) for one recurring price. ``metadata`` is put
        on the session and on the subscription it makes (so every invoice carries it too)."""
        session = await self._client.v1.checkout.sessions.create_async(
            {
                "mode": "subscription",
                "customer": customer_id,
                "client_reference_id": client_reference_id,
                "line_items": [{"price": price_id, "quantity": 1}],
                "metadata": dict(metadata),
                "subscription_data": {"metadata": dict(metadata)},
                "success_url": success_url,
                "cancel_url": cancel_url,
            },
            {"idempotency_key": idempotency_key},
        )
        return _link(session)

    @_remote
    async def retrieve_subscription(self, subscription_id: str) -> stripe.Subscription:
        return await self._client.v1.subscriptions.retrieve_async(subscription_id)

    @_remote
    async def change_subscription_price(
        self, subscription_id: str, *, item_id: str, price_id: str, now: bool, idempotency_key: str
    ) -> stripe.Subscription:
        """The subscription's item moved to ``price_id``. ``now``: the change is prorated and
        charged at once, and Stripe refuses it (a ``CardError``, nothing changed) when the charge
        fails. Otherwise nothing is billed now and the next renewal bills the new price."""
        params: stripe.params.SubscriptionUpdateParams = {
            "items": [{"id": item_id, "price": price_id}],
            "proration_behavior": "always_invoice" if now else "none",
        }
        if now:
            params["payment_behavior"] = "error_if_incomplete"
        return await self._client.v1.subscriptions.update_async(
            subscription_id, params, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def pause_subscription_collection(
        self, subscription_id: str, *, paused: bool, idempotency_key: str
    ) -> stripe.Subscription:
        """Paused: each renewal's invoice is voided (nothing is charged, nothing granted)."""
        params: stripe.params.SubscriptionUpdateParams = {
            "pause_collection": {"behavior": "void"} if paused else "",
        }
        return await self._client.v1.subscriptions.update_async(
            subscription_id, params, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def cancel_subscription_at_period_end(
        self, subscription_id: str, *, cancel: bool, idempotency_key: str
    ) -> stripe.Subscription:
        return await self._client.v1.subscriptions.update_async(
            subscription_id, {"cancel_at_period_end": cancel}, {"idempotency_key": idempotency_key}
        )

    @_remote
    async def cancel_subscription(self, subscription_id: str, *, idempotency_key: str) -> stripe.Subscription:
        """Canceled now, without a prorated credit: the period was paid and its tokens granted."""
        return await self._client.v1.subscriptions.cancel_async(
            subscription_id, {}, {"idempotency_key": idempotency_key}
        )

    # -- events --------------------------------------------------------------------------------

    def construct_event(self, payload: bytes, sig_header: str | None) -> stripe.Event:
        """Verify a webhook delivery (``Stripe-Signature`` against the webhook secret, timestamp
        within 300 s) and parse it; ``InvalidStripeWebhook`` otherwise. Pass the raw body."""
        try:
            # StripeClient.construct_event is stripe.Webhook.construct_event, bound to this client.
            event = self._client.construct_event(
                payload, sig_header, self._webhook_secret, WEBHOOK_TOLERANCE_SECONDS
            )
        except stripe.SignatureVerificationError as error:
            raise InvalidStripeWebhook(f"signature verification failed: {error.user_message}") from error
        except (ValueError, TypeError, AttributeError) as error:
            raise InvalidStripeWebhook("the body is not a JSON Stripe event") from error
        if not isinstance(getattr(event, "id", None), str) or not isinstance(
            getattr(event, "type", None), str
        ):
            raise InvalidStripeWebhook("the body is not a Stripe event")
        return event

    def verify_event(self, payload: bytes, sig_header: str | None) -> dict[str, Any]:
        """``construct_event`` without building the SDK's ``stripe.Event``: the same signature
        check (``stripe.WebhookSignature.verify_header``, same secret and tolerance) and the same
        rejections, answering the verified body as plain JSON (what the webhook route stores and
        its handlers read). Pass the raw body."""
        try:
            stripe.WebhookSignature.verify_header(
                payload, sig_header, self._webhook_secret, WEBHOOK_TOLERANCE_SECONDS
            )
            event = json.loads(payload)
        except stripe.SignatureVerificationError as error:
            raise InvalidStripeWebhook(f"signature verification failed: {error.user_message}") from error
        except (ValueError, TypeError, AttributeError) as error:
            raise InvalidStripeWebhook("the body is not a JSON Stripe event") from error
        if not isinstance(event, dict):
            raise InvalidStripeWebhook("the body is not a JSON Stripe event")
        if not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
            raise InvalidStripeWebhook("the body is not a Stripe event")
        return event

    @_remote
    async def retrieve_event(self, event_id: str) -> stripe.Event:
        return await self._client.v1.events.retrieve_async(event_id)


def _link(session: stripe.checkout.Session) -> CheckoutLink:
    if not session.url:
        raise stripe.APIError(f"Checkout Session {session.id} came back without a url")
    return CheckoutLink(session_id=session.id, url=session.url)


def declined(error: stripe.CardError) -> PaymentDeclined:
    details = error.error
    intent = details.payment_intent if details else None
    return PaymentDeclined(
        (details.message if details else None) or error.user_message or "The card was declined.",
        stripe_code=error.code,
        decline_code=details.decline_code if details else None,
        payment_intent_id=intent.id if intent is not None else None,
        charge_id=details.charge if details else None,
    )
