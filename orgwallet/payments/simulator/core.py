"""The simulated Stripe account: its objects, the money movements, and the events they emit.

``Account`` holds the logic: plain synchronous operations on Stripe-shaped JSON dicts (the
fields this project reads, and the usual neighbours so the SDK's objects look familiar);
callers get deep copies. Its state is a cache of records that ``store`` keeps in PostgreSQL:
the objects by id, the test card behind each payment method, each Checkout Session's line
items and payment or setup parameters, and the answers kept under idempotency keys.

An operation runs inside a *section* (``service.Simulator.run``, or a request to the
simulator's app): the account's lock taken, the records other processes changed loaded, the
operation run without an ``await`` (nothing else in the process sees it half done), then what
it touched written back and the events it emitted queued for delivery, in one transaction.
Outside a section the account refuses to be read or changed (its cache may be stale).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from orgwallet.payments.gateway import STRIPE_API_VERSION
from orgwallet.payments.simulator import cards
from orgwallet.payments.simulator.billing import CHECKOUT_SUBSCRIPTION, Billing
from orgwallet.payments.simulator.cards import Card, Decline
from orgwallet.payments.simulator.errors import StripeApiError, no_such
from orgwallet.payments.simulator.forms import (
    param_bool,
    param_dict,
    param_int,
    param_list,
    param_metadata,
    param_str,
)
from orgwallet.payments.simulator.objects import (
    MAX_AMOUNT,
    JsonObject,
    list_object,
    new_id,
    too_large,
    updated_metadata,
)

SESSION_LIFETIME_SECONDS = 24 * 3600
OPEN_DISPUTE_STATUSES = frozenset(
    {"warning_needs_response", "warning_under_review", "needs_response", "under_review"}
)
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
DISPUTE_REASONS = frozenset(
    {
        "bank_cannot_process",
        "credit_not_processed",
        "customer_initiated",
        "debit_not_authorized",
        "duplicate",
        "fraudulent",
        "general",
        "incorrect_account_details",
        "insufficient_funds",
        "product_not_received",
        "product_unacceptable",
        "subscription_canceled",
        "unrecognized",
    }
)
BANK_DEBIT_FAILURE = Decline(
    "insufficient_funds", None, "The customer's account has insufficient funds to cover this payment."
)
_CARD_EXPIRY_YEAR = 2034


def _param_off_session(params: JsonObject) -> bool:
    """A PaymentIntent's ``off_session``: a boolean, or ``one_off`` / ``recurring`` (true)."""
    raw = param_str(params, "off_session")
    if raw in (None, "false"):
        return False
    if raw in ("true", "one_off", "recurring"):
        return True
    raise StripeApiError(
        400,
        f"Invalid off_session: must be a boolean, one_off or recurring (got {raw}).",
        code="parameter_invalid_string",
        param="off_session",
    )


@dataclass(frozen=True)
class IdempotentResult:
    fingerprint: str
    status: int
    body: JsonObject


@dataclass(frozen=True)
class Delivery:
    """An event to deliver, queued by an operation: sent once its section has committed.
    ``secret`` and ``timestamp`` sign it otherwise (a test control's deliveries that must fail)."""

    event_id: str
    secret: str | None = None
    timestamp: int | None = None


# The kinds of records an account keeps, each a JSON value under (kind, key); ``billing`` adds its own.
OBJECT = "object"  # any Stripe object, by id
CARD = "card"  # payment method id -> the test card number behind it
LINE_ITEMS = "line_items"  # checkout session id -> its line items
PAYMENT_INTENT_DATA = "payment_intent_data"  # checkout session id -> the intent's metadata, description
SETUP_INTENT_METADATA = "setup_intent_metadata"  # checkout session id -> the setup intent's metadata
IDEMPOTENCY = "idempotency"  # idempotency key -> [fingerprint, status, body]


class Account(Billing):
    """One simulated Stripe account (test mode), with Stripe Billing (``billing``).

    ``delivering()``: whether a webhook target is set. ``enabled_events``: event types
    delivered, like a Stripe webhook endpoint's ``enabled_events`` (``None``: all). Every
    event is recorded and retrievable either way.
    """

    def __init__(
        self,
        *,
        public_base_url: str,
        delivering: Callable[[], bool],
        enabled_events: Collection[str] | None = None,
        api_version: str = STRIPE_API_VERSION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_base_url = public_base_url.rstrip("/")
        self.api_version = api_version
        self.clock = clock
        self.delivering = delivering
        self.enabled_events = frozenset(enabled_events) if enabled_events is not None else None
        self._objects: dict[str, JsonObject] = {}
        self._event_ids: list[str] = []
        self._cards: dict[str, Card] = {}
        self._line_items: dict[str, list[JsonObject]] = {}
        self._payment_intent_data: dict[str, JsonObject] = {}
        self._setup_intent_metadata: dict[str, dict[str, str]] = {}
        self._idempotent: dict[str, IdempotentResult] = {}
        self._records: dict[str, dict[str, Any]] = {
            OBJECT: self._objects,
            CARD: self._cards,
            LINE_ITEMS: self._line_items,
            PAYMENT_INTENT_DATA: self._payment_intent_data,
            SETUP_INTENT_METADATA: self._setup_intent_metadata,
            IDEMPOTENCY: self._idempotent,
        }
        self._init_billing()
        self._in_section = False
        self._touched: dict[tuple[str, str], bytes | None] = {}  # record -> its JSON when first touched
        self._outbox: list[Delivery] = []

    # -- the section's bookkeeping (``store``) ---------------------------------------------------

    def load(self, kind: str, key: str, value: Any) -> None:
        """A record as stored (written by another process, or by this one before a restart)."""
        if kind == OBJECT and key not in self._objects and value.get("object") == "event":
            self._event_ids.append(key)  # records come in the order they were created
        if kind == CARD:
            value = cards.lookup(value)
        elif kind == IDEMPOTENCY:
            value = IdempotentResult(*value)
        if kind in self._records:  # a kind this version does not know is left alone
            self._records[kind][key] = value

    def begin(self) -> None:
        self._in_section = True
        self._touched.clear()
        self._outbox.clear()

    def changes(self) -> list[tuple[str, str, str]]:
        """The records the section changed, as (kind, key, JSON text), in the order touched."""
        changed = []
        for (kind, key), before in self._touched.items():
            after = self._encode(kind, key)
            if after is not None and after != before:
                changed.append((kind, key, after.decode()))
        return changed

    def outbox(self) -> list[Delivery]:
        """The deliveries the section queued."""
        return list(self._outbox)

    def end(self) -> None:
        self._in_section = False
        self._touched.clear()
        self._outbox.clear()

    def forget(self) -> None:
        """Drop the cache (a section that did not commit may have changed it); the store loads
        every record again in the next section."""
        for records in self._records.values():
            records.clear()
        self._event_ids.clear()

    def _encode(self, kind: str, key: str) -> bytes | None:
        value = self._records[kind].get(key)
        if value is None:
            return None
        if isinstance(value, Card):
            return orjson.dumps(value.number)
        if isinstance(value, IdempotentResult):
            return orjson.dumps([value.fingerprint, value.status, value.body])
        return orjson.dumps(value)

    def _check(self) -> None:
        if not self._in_section:
            raise RuntimeError(
                "the simulated account is read and changed inside a section: "
                "`await simulator.run(...)`, or a request to the simulator's app"
            )

    def _touch(self, kind: str, key: str) -> None:
        """Mark a record the operation may change: written back at the end if it did."""
        self._check()
        if (kind, key) not in self._touched:
            self._touched[kind, key] = self._encode(kind, key)

    def _put(self, kind: str, key: str, value: Any) -> None:
        self._touch(kind, key)
        self._records[kind][key] = value

    # -- plumbing ------------------------------------------------------------------------------

    def _now(self) -> int:
        # Billing's due work runs at the instant it was due (a test clock's, or one caught up on).
        return self._frozen_at if self._frozen_at is not None else int(self.clock())

    def _store(self, obj: JsonObject) -> JsonObject:
        self._put(OBJECT, obj["id"], obj)
        return obj

    def _get(self, object_id: str, object_name: str, *, param: str = "id") -> JsonObject:
        self._check()
        obj = self._objects.get(object_id)
        if obj is None or obj["object"] != object_name or obj.get("deleted"):
            if param == "id":
                raise no_such(object_name, object_id)
            # A reference in the parameters to something missing is a 400 on Stripe.
            raise StripeApiError(
                400, f"No such {object_name}: '{object_id}'", code="resource_missing", param=param
            )
        self._touch(OBJECT, object_id)
        return obj

    def retrieve(self, object_id: str, object_name: str) -> JsonObject:
        return copy.deepcopy(self._get(object_id, object_name))

    def find(self, object_id: str) -> JsonObject | None:
        """Any object by id (a copy), or None."""
        self._check()
        obj = self._objects.get(object_id)
        return copy.deepcopy(obj) if obj is not None else None

    def refunds_of(self, charge_id: str) -> list[JsonObject]:
        """A charge's refunds, oldest first (copies): its receipt lists them."""
        self._check()
        found = [
            obj for obj in self._objects.values() if obj["object"] == "refund" and obj["charge"] == charge_id
        ]
        return copy.deepcopy(sorted(found, key=lambda refund: refund["created"]))

    def expand(self, obj: JsonObject, paths: Sequence[str]) -> JsonObject:
        self._check()
        for path in paths:
            self._expand(obj, path.split("."))
        return obj

    def _expand(self, obj: JsonObject, parts: list[str]) -> None:
        head, rest = parts[0], parts[1:]
        if head == "line_items" and obj.get("object") == "checkout.session":
            obj["line_items"] = self.checkout_line_items(obj["id"])
            return
        if head == "payments" and obj.get("object") == "invoice":
            obj["payments"] = self.invoice_payments(obj["id"])
            return
        value = obj.get(head)
        if isinstance(value, str) and value in self._objects:
            value = copy.deepcopy(self._objects[value])
            obj[head] = value
        if isinstance(value, dict) and rest:
            self._expand(value, rest)
        if isinstance(value, list) and rest:  # through a list: "items.data.price.product"
            for entry in value:
                if isinstance(entry, dict):
                    self._expand(entry, rest)

    def idempotent_result(self, key: str) -> IdempotentResult | None:
        """The answer kept under an idempotency key, if any."""
        self._check()
        return self._idempotent.get(key)

    def keep_result(self, key: str, result: IdempotentResult) -> None:
        self._put(IDEMPOTENCY, key, result)

    # -- events --------------------------------------------------------------------------------

    def _emit(self, event_type: str, obj: JsonObject, previous: JsonObject | None = None) -> JsonObject:
        deliver = self.delivering() and (self.enabled_events is None or event_type in self.enabled_events)
        data: JsonObject = {"object": copy.deepcopy(obj)}
        if previous:
            data["previous_attributes"] = previous
        event = self._store(
            {
                "id": new_id("evt_"),
                "object": "event",
                "api_version": self.api_version,
                "created": self._now(),
                "data": data,
                "livemode": False,
                "pending_webhooks": 1 if deliver else 0,
                "request": {"id": None, "idempotency_key": None},
                "type": event_type,
            }
        )
        self._event_ids.append(event["id"])
        if deliver:
            self._outbox.append(Delivery(event["id"]))
        return event

    def events(self, event_type: str | None = None) -> list[JsonObject]:
        """Events in the order they happened (copies)."""
        self._check()
        return [
            copy.deepcopy(self._objects[event_id])
            for event_id in self._event_ids
            if event_type is None or self._objects[event_id]["type"] == event_type
        ]

    def event(self, event_id: str) -> JsonObject | None:
        """An event as it is (not a copy: events never change), for its delivery."""
        self._check()
        found = self._objects.get(event_id)
        return found if found is not None and found["object"] == "event" else None

    def list_events(self, params: JsonObject) -> JsonObject:
        event_type = param_str(params, "type")
        limit = param_int(params, "limit") or 10
        newest_first = list(reversed(self.events(event_type)))
        return list_object(newest_first[:limit], "/v1/events")

    def redeliver(
        self, event_id: str, *, times: int = 1, secret: str | None = None, timestamp: int | None = None
    ) -> JsonObject:
        """Deliver an existing event again, ``times`` copies at once (concurrently).

        ``secret``/``timestamp`` override the signature, to send deliveries that must fail."""
        event = self._get(event_id, "event")
        if not 1 <= times <= 1000:
            raise StripeApiError(400, "times must be between 1 and 1000", param="times")
        if timestamp is not None and not 0 <= timestamp < 2**40:
            raise StripeApiError(400, "timestamp must be a Unix time in seconds", param="timestamp")
        if not self.delivering():
            raise StripeApiError(400, "No webhook target is configured.")
        self._outbox.extend(Delivery(event_id, secret, timestamp) for _ in range(times))
        return copy.deepcopy(event)

    # -- customers -----------------------------------------------------------------------------

    def create_customer(self, params: JsonObject) -> JsonObject:
        customer_id = new_id("cus_", 14)
        clock = self._customer_test_clock(params)  # a customer may live in a test clock's time
        customer = self._store(
            {
                "id": customer_id,
                "object": "customer",
                "address": None,
                "balance": 0,
                "created": clock["frozen_time"] if clock else self._now(),
                "currency": None,
                "default_source": None,
                "delinquent": False,
                "description": param_str(params, "description"),
                "email": param_str(params, "email"),
                "invoice_prefix": customer_id[-8:].upper(),
                "invoice_settings": {
                    "custom_fields": None,
                    "default_payment_method": None,
                    "footer": None,
                    "rendering_options": None,
                },
                "livemode": False,
                "metadata": param_metadata(params),
                "name": param_str(params, "name"),
                "phone": param_str(params, "phone"),
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": clock["id"] if clock else None,
            }
        )
        self._apply_invoice_settings(customer, params)
        self._emit("customer.created", customer)
        return copy.deepcopy(customer)

    def update_customer(self, customer_id: str, params: JsonObject) -> JsonObject:
        customer = self._get(customer_id, "customer")
        before = copy.deepcopy(customer)
        for field in ("description", "email", "name", "phone"):
            if field in params:
                customer[field] = param_str(params, field)
        if "metadata" in params:
            customer["metadata"] = updated_metadata(customer["metadata"], params)
        self._apply_invoice_settings(customer, params)
        previous = {key: before[key] for key in customer if customer[key] != before[key]}
        if previous:
            self._emit("customer.updated", customer, previous)
        return copy.deepcopy(customer)

    def _apply_invoice_settings(self, customer: JsonObject, params: JsonObject) -> None:
        settings = param_dict(params, "invoice_settings")
        if "default_payment_method" not in settings:
            return
        payment_method_id = param_str(settings, "default_payment_method")
        if payment_method_id is not None:
            param = "invoice_settings[default_payment_method]"
            payment_method = self._get(payment_method_id, "payment_method", param=param)
            if payment_method["customer"] != customer["id"]:
                raise StripeApiError(
                    400,
                    f"The customer does not have a payment method with the ID {payment_method_id}. "
                    "The payment method must be attached to the customer.",
                    code="resource_missing",
                    param=param,
                )
        customer["invoice_settings"] = {
            **customer["invoice_settings"],
            "default_payment_method": payment_method_id,
        }

    # -- payment methods -----------------------------------------------------------------------

    def _new_card_payment_method(self, card: Card) -> JsonObject:
        payment_method = self._store(
            {
                "id": new_id("pm_"),
                "object": "payment_method",
                "allow_redisplay": "unspecified",
                "billing_details": {"address": None, "email": None, "name": None, "phone": None},
                "card": {
                    "brand": card.brand,
                    "checks": {
                        "address_line1_check": None,
                        "address_postal_code_check": None,
                        "cvc_check": "pass",
                    },
                    "country": "US",
                    "display_brand": card.brand,
                    "exp_month": 12,
                    "exp_year": _CARD_EXPIRY_YEAR,
                    "fingerprint": hashlib.sha256(card.number.encode()).hexdigest()[:16],
                    "funding": "credit",
                    "last4": card.last4,
                    "wallet": None,
                },
                "created": self._now(),
                "customer": None,
                "livemode": False,
                "metadata": {},
                "type": "card",
            }
        )
        self._put(CARD, payment_method["id"], card)
        return payment_method

    def _new_bank_payment_method(self) -> JsonObject:
        return self._store(
            {
                "id": new_id("pm_"),
                "object": "payment_method",
                "allow_redisplay": "unspecified",
                "billing_details": {"address": None, "email": None, "name": "Test Account", "phone": None},
                "created": self._now(),
                "customer": None,
                "livemode": False,
                "metadata": {},
                "type": "us_bank_account",
                "us_bank_account": {
                    "account_holder_type": "individual",
                    "account_type": "checking",
                    "bank_name": "STRIPE TEST BANK",
                    "fingerprint": new_id("", 16),
                    "last4": "6789",
                    "routing_number": "110000000",
                },
            }
        )

    def _attach(self, payment_method: JsonObject, customer_id: str) -> None:
        payment_method["customer"] = customer_id
        self._emit("payment_method.attached", payment_method)

    def _lookup_card(self, number: str) -> Card:
        try:
            return cards.lookup(number)
        except ValueError:
            decline = cards.INCORRECT_NUMBER
            raise StripeApiError(
                402, decline.message, type="card_error", code=decline.code, param="number"
            ) from None

    def add_test_card(self, customer_id: str, card_number: str) -> JsonObject:
        """Save a test card on a customer, as a setup would (test control)."""
        customer = self._get(customer_id, "customer")
        card = self._lookup_card(card_number)
        if card.decline is not None and card.declines_when_saved:
            raise self._decline_error(card.decline)
        payment_method = self._new_card_payment_method(card)
        self._attach(payment_method, customer["id"])
        return copy.deepcopy(payment_method)

    def list_payment_methods(self, customer_id: str, params: JsonObject) -> JsonObject:
        self._get(customer_id, "customer", param="customer")
        method_type = param_str(params, "type")
        limit = param_int(params, "limit") or 10
        found = [
            copy.deepcopy(obj)
            for obj in reversed(self._objects.values())
            if obj["object"] == "payment_method"
            and obj["customer"] == customer_id
            and (method_type is None or obj["type"] == method_type)
        ]
        return list_object(found[:limit], f"/v1/customers/{customer_id}/payment_methods")

    # -- payment intents and charges -----------------------------------------------------------

    def _new_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer: str | None,
        metadata: dict[str, str],
        description: str | None,
        payment_method_types: list[str],
    ) -> JsonObject:
        intent_id = new_id("pi_")
        intent = self._store(
            {
                "id": intent_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_capturable": 0,
                "amount_received": 0,
                "canceled_at": None,
                "cancellation_reason": None,
                "capture_method": "automatic_async",
                "client_secret": f"{intent_id}_secret_{new_id('')}",
                "confirmation_method": "automatic",
                "created": self._now(),
                "currency": currency,
                "customer": customer,
                "description": description,
                "last_payment_error": None,
                "latest_charge": None,
                "livemode": False,
                "metadata": metadata,
                "next_action": None,
                "payment_method": None,
                "payment_method_types": payment_method_types,
                "receipt_email": None,
                "setup_future_usage": None,
                "status": "requires_payment_method",
            }
        )
        self._emit("payment_intent.created", intent)
        return intent

    def _charge(self, intent: JsonObject, payment_method: JsonObject, decline: Decline | None) -> JsonObject:
        """Record a charge of ``intent`` on ``payment_method`` that succeeds, or fails with
        ``decline``; update the intent and emit the events. Never raises."""
        succeeded = decline is None
        charge_id = new_id("ch_")
        if payment_method["type"] == "card":
            details: JsonObject = {
                "type": "card",
                "card": {
                    key: payment_method["card"][key]
                    for key in (
                        "brand",
                        "country",
                        "exp_month",
                        "exp_year",
                        "fingerprint",
                        "funding",
                        "last4",
                    )
                },
            }
        else:
            details = {
                "type": payment_method["type"],
                payment_method["type"]: payment_method[payment_method["type"]],
            }
        charge = self._store(
            {
                "id": charge_id,
                "object": "charge",
                "amount": intent["amount"],
                "amount_captured": intent["amount"] if succeeded else 0,
                "amount_refunded": 0,
                "balance_transaction": new_id("txn_") if succeeded else None,
                "billing_details": payment_method["billing_details"],
                "captured": succeeded,
                "created": self._now(),
                "currency": intent["currency"],
                "customer": intent["customer"],
                "description": intent["description"],
                "disputed": False,
                "failure_code": decline.code if decline else None,
                "failure_message": decline.message if decline else None,
                "livemode": False,
                "metadata": dict(intent["metadata"]),
                "outcome": {
                    "network_status": "approved_by_network" if succeeded else "declined_by_network",
                    "reason": decline.decline_code if decline else None,
                    "risk_level": "normal",
                    "seller_message": "Payment complete."
                    if succeeded
                    else "The bank did not return any further details with this decline.",
                    "type": "authorized" if succeeded else "issuer_declined",
                },
                "paid": succeeded,
                "payment_intent": intent["id"],
                "payment_method": payment_method["id"],
                "payment_method_details": details,
                "receipt_email": None,
                "receipt_number": None,
                "receipt_url": f"{self.public_base_url}/receipts/{charge_id}" if succeeded else None,
                "refunded": False,
                "status": "succeeded" if succeeded else "failed",
            }
        )
        intent["latest_charge"] = charge_id
        if decline is None:
            intent.update(
                status="succeeded",
                amount_received=intent["amount"],
                payment_method=payment_method["id"],
                last_payment_error=None,
            )
            self._emit("charge.succeeded", charge)
            self._emit("payment_intent.succeeded", intent)
        else:
            intent.update(
                status="requires_payment_method",
                payment_method=None,
                last_payment_error={
                    "type": "card_error" if payment_method["type"] == "card" else "invalid_request_error",
                    "charge": charge_id,
                    "code": decline.code,
                    "decline_code": decline.decline_code,
                    "message": decline.message,
                    "payment_method": copy.deepcopy(payment_method),
                },
            )
            self._emit("charge.failed", charge)
            self._emit("payment_intent.payment_failed", intent)
        return charge

    def _decline_error(self, decline: Decline, **objects: JsonObject | str) -> StripeApiError:
        return StripeApiError(
            402,
            decline.message,
            type="card_error",
            code=decline.code,
            decline_code=decline.decline_code,
            extra={key: copy.deepcopy(value) for key, value in objects.items()},
        )

    def _charge_card(
        self, intent: JsonObject, payment_method: JsonObject, *, off_session: bool
    ) -> JsonObject:
        """Charge a card payment method now (``off_session``: without the customer, who cannot
        authenticate); a decline raises Stripe's card error (402)."""
        if payment_method["type"] != "card":
            raise StripeApiError(
                400, "The simulator charges only card payment methods directly.", param="payment_method"
            )
        decline = self._cards[payment_method["id"]].charge_decline(off_session=off_session)
        charge = self._charge(intent, payment_method, decline)
        if decline is not None:
            raise self._decline_error(
                decline, charge=charge["id"], payment_intent=intent, payment_method=payment_method
            )
        return charge

    def create_payment_intent(self, params: JsonObject) -> JsonObject:
        amount = param_int(params, "amount", required=True)
        currency = param_str(params, "currency", required=True)
        assert amount is not None and currency is not None
        if amount < 1:
            raise StripeApiError(400, "Amount must be at least 1.", code="amount_too_small", param="amount")
        if amount > MAX_AMOUNT:
            raise too_large("amount")
        customer_id = param_str(params, "customer")
        if customer_id is not None:
            self._get(customer_id, "customer", param="customer")
        payment_method = self._usable_payment_method(param_str(params, "payment_method"), customer_id)
        intent = self._new_payment_intent(
            amount=amount,
            currency=currency.lower(),
            customer=customer_id,
            metadata=param_metadata(params),
            description=param_str(params, "description"),
            payment_method_types=[str(t) for t in param_list(params, "payment_method_types")] or ["card"],
        )
        if payment_method is not None:
            intent.update(payment_method=payment_method["id"], status="requires_confirmation")
        off_session = _param_off_session(params)
        if param_bool(params, "confirm"):
            self._confirm(intent, off_session=off_session)
        return copy.deepcopy(intent)

    def confirm_payment_intent(self, intent_id: str, params: JsonObject) -> JsonObject:
        intent = self._get(intent_id, "payment_intent")
        if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
            raise StripeApiError(
                400,
                f"This PaymentIntent's status is {intent['status']}; it cannot be confirmed.",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(intent)},
            )
        payment_method = self._usable_payment_method(param_str(params, "payment_method"), intent["customer"])
        if payment_method is not None:
            intent["payment_method"] = payment_method["id"]
        self._confirm(intent, off_session=_param_off_session(params))
        return copy.deepcopy(intent)

    def _confirm(self, intent: JsonObject, *, off_session: bool) -> None:
        if intent["payment_method"] is None:
            raise StripeApiError(
                400,
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(intent)},
            )
        self._charge_card(
            intent, self._get(intent["payment_method"], "payment_method"), off_session=off_session
        )

    def _usable_payment_method(
        self, payment_method_id: str | None, customer_id: str | None
    ) -> JsonObject | None:
        if payment_method_id is None:
            return None
        payment_method = self._get(payment_method_id, "payment_method", param="payment_method")
        owner = payment_method["customer"]
        if owner is not None and owner != customer_id:
            raise StripeApiError(
                400,
                f"The provided PaymentMethod {payment_method_id} belongs to another Customer "
                "(or to a Customer you did not pass). Pass the Customer it is attached to.",
                param="payment_method",
            )
        return payment_method

    # -- checkout sessions ---------------------------------------------------------------------

    def create_checkout_session(self, params: JsonObject) -> JsonObject:
        mode = param_str(params, "mode", required=True)
        if mode not in ("payment", "setup", "subscription"):
            raise StripeApiError(
                400, f"The simulator supports mode payment, setup and subscription, not {mode}.", param="mode"
            )
        customer_id = param_str(params, "customer")
        customer = self._get(customer_id, "customer", param="customer") if customer_id else None
        now = self._now()
        expires_at = param_int(params, "expires_at") or now + SESSION_LIFETIME_SECONDS
        if not now < expires_at <= now + SESSION_LIFETIME_SECONDS:
            raise StripeApiError(
                400, "expires_at must be in the future, at most 24 hours away.", param="expires_at"
            )
        session_id = new_id("cs_test_", 40)
        amount: int | None = None
        currency = param_str(params, "currency")
        items: list[JsonObject] = []
        subscription_data: JsonObject | None = None
        if mode == "subscription":  # recurring prices, and what the subscription gets (``billing``)
            items = self._recurring_line_items(params)
            subscription_data = self._subscription_data(params)
        elif mode == "payment":
            items = self._line_items_of(params)
        if items:
            currency = items[0]["currency"]
            amount = sum(int(item["amount_total"]) for item in items)
        allowed_types = [str(t) for t in param_list(params, "allowed_payment_method_types")]
        if mode == "setup" and not allowed_types and currency is None:
            raise StripeApiError(
                400,
                "currency is required in setup mode when allowed_payment_method_types is not set.",
                code="parameter_missing",
                param="currency",
            )
        payment_method_types = allowed_types or (
            ["card", "us_bank_account"] if mode == "payment" else ["card"]
        )
        self._put(SETUP_INTENT_METADATA, session_id, param_metadata(param_dict(params, "setup_intent_data")))
        payment_intent_data = param_dict(params, "payment_intent_data")
        self._put(
            PAYMENT_INTENT_DATA,
            session_id,
            {
                "metadata": param_metadata(payment_intent_data),
                "description": param_str(payment_intent_data, "description")
                or ", ".join(str(item["description"]) for item in items)
                or None,
            },
        )
        self._put(LINE_ITEMS, session_id, items)
        if subscription_data is not None:
            self._put(CHECKOUT_SUBSCRIPTION, session_id, subscription_data)
        session = self._store(
            {
                "id": session_id,
                "object": "checkout.session",
                "after_expiration": None,
                "allow_promotion_codes": None,
                "allowed_payment_method_types": allowed_types or None,
                "amount_subtotal": amount,
                "amount_total": amount,
                "cancel_url": param_str(params, "cancel_url"),
                "client_reference_id": param_str(params, "client_reference_id"),
                "created": now,
                "currency": currency.lower() if currency else None,
                "customer": customer_id,
                "customer_creation": None if customer_id else "if_required",
                "customer_details": {"email": customer["email"], "name": customer["name"]}
                if customer
                else None,
                "customer_email": param_str(params, "customer_email"),
                "expires_at": expires_at,
                "invoice": None,
                "livemode": False,
                "locale": None,
                "metadata": param_metadata(params),
                "mode": mode,
                "payment_intent": None,
                "payment_method_types": payment_method_types,
                "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
                "setup_intent": None,
                "status": "open",
                "submit_type": None,
                "subscription": None,
                "success_url": param_str(params, "success_url"),
                "ui_mode": "hosted",
                "url": f"{self.public_base_url}/checkout/{session_id}",
            }
        )
        return copy.deepcopy(session)

    def _line_items_of(self, params: JsonObject) -> list[JsonObject]:
        raw_items = param_list(params, "line_items")
        if not raw_items:
            raise StripeApiError(
                400, "line_items is required in payment mode.", code="parameter_missing", param="line_items"
            )
        items: list[JsonObject] = []
        for index, raw in enumerate(raw_items):
            param = f"line_items[{index}]"
            if not isinstance(raw, dict):
                raise StripeApiError(400, f"Invalid object: {param}", param=param)
            if "price" in raw:
                raise StripeApiError(
                    400,
                    "The simulator supports line_items[].price_data only, not prices.",
                    param=f"{param}[price]",
                )
            quantity = param_int(raw, "quantity") or 1
            price_data = param_dict(raw, "price_data")
            currency = param_str(price_data, "currency", required=True)
            unit_amount = param_int(price_data, "unit_amount", required=True)
            name = param_str(param_dict(price_data, "product_data"), "name", required=True)
            assert currency is not None and unit_amount is not None
            if unit_amount < 0 or quantity < 1:
                raise StripeApiError(400, f"Invalid amount or quantity in {param}.", param=param)
            if unit_amount * quantity > MAX_AMOUNT:
                raise too_large(param)
            items.append(
                {
                    "id": new_id("li_"),
                    "object": "item",
                    "amount_subtotal": unit_amount * quantity,
                    "amount_total": unit_amount * quantity,
                    "currency": currency.lower(),
                    "description": name,
                    "price": {
                        "id": new_id("price_"),
                        "object": "price",
                        "currency": currency.lower(),
                        "product": new_id("prod_", 14),
                        "type": "one_time",
                        "unit_amount": unit_amount,
                    },
                    "quantity": quantity,
                }
            )
        if len({item["currency"] for item in items}) > 1:
            raise StripeApiError(400, "All line items must use the same currency.", param="line_items")
        if sum(item["amount_total"] for item in items) > MAX_AMOUNT:
            raise too_large("line_items")
        return items

    def checkout_line_items(self, session_id: str) -> JsonObject:
        self._get(session_id, "checkout.session")
        return list_object(
            copy.deepcopy(self._line_items.get(session_id, [])),
            f"/v1/checkout/sessions/{session_id}/line_items",
        )

    def _open_session(self, session_id: str) -> JsonObject:
        session = self._get(session_id, "checkout.session")
        if session["status"] != "open":
            raise StripeApiError(
                400,
                f"This Checkout Session is {session['status']}; it can no longer be paid.",
                code="checkout_session_not_open",
            )
        return session

    def _session_intent(self, session: JsonObject) -> JsonObject:
        if session["payment_intent"] is not None:
            return self._get(session["payment_intent"], "payment_intent")
        data = self._payment_intent_data[session["id"]]
        intent = self._new_payment_intent(
            amount=session["amount_total"],
            currency=session["currency"],
            customer=session["customer"],
            metadata=dict(data["metadata"]),
            description=data["description"],
            payment_method_types=list(session["payment_method_types"]),
        )
        session["payment_intent"] = intent["id"]
        return intent

    def pay_checkout_session(
        self, session_id: str, card_number: str = "4242424242424242", *, async_payment: bool = False
    ) -> JsonObject:
        """What the hosted page does on Pay: charge the card (or start a bank debit that settles
        later when ``async_payment``), save the payment method on the session's customer, and
        complete the session. A declined card raises the card error and leaves it open."""
        session = self._open_session(session_id)
        if session["mode"] == "setup":
            return self._complete_setup(session, card_number)
        if session["mode"] == "subscription":  # ``billing``
            return self._complete_subscription_checkout(session, card_number, async_payment=async_payment)
        if async_payment and "us_bank_account" not in session["payment_method_types"]:
            raise StripeApiError(400, "This Checkout Session does not accept bank debits.")
        intent = self._session_intent(session)
        if async_payment:
            payment_method = self._new_bank_payment_method()
            intent.update(status="processing", payment_method=payment_method["id"], last_payment_error=None)
            self._emit("payment_intent.processing", intent)
            payment_status = "unpaid"
        else:
            payment_method = self._new_card_payment_method(self._lookup_card(card_number))
            self._charge_card(intent, payment_method, off_session=False)
            payment_status = "paid"
        if session["customer"] is not None:
            self._attach(payment_method, session["customer"])
        session.update(status="complete", payment_status=payment_status, url=None)
        self._emit("checkout.session.completed", session)
        return copy.deepcopy(session)

    def _complete_setup(self, session: JsonObject, card_number: str) -> JsonObject:
        card = self._lookup_card(card_number)
        if session["setup_intent"] is not None:
            setup_intent = self._get(session["setup_intent"], "setup_intent")
        else:
            setup_intent = self._store(
                {
                    "id": new_id("seti_"),
                    "object": "setup_intent",
                    "cancellation_reason": None,
                    "client_secret": None,
                    "created": self._now(),
                    "customer": session["customer"],
                    "description": None,
                    "last_setup_error": None,
                    "latest_attempt": None,
                    "livemode": False,
                    "metadata": dict(self._setup_intent_metadata.get(session["id"], {})),
                    "next_action": None,
                    "payment_method": None,
                    "payment_method_types": ["card"],
                    "status": "requires_payment_method",
                    "usage": "off_session",
                }
            )
            setup_intent["client_secret"] = f"{setup_intent['id']}_secret_{new_id('')}"
            session["setup_intent"] = setup_intent["id"]
        payment_method = self._new_card_payment_method(card)
        if card.decline is not None and card.declines_when_saved:
            setup_intent["last_setup_error"] = {
                "type": "card_error",
                "code": card.decline.code,
                "decline_code": card.decline.decline_code,
                "message": card.decline.message,
                "payment_method": copy.deepcopy(payment_method),
            }
            self._emit("setup_intent.setup_failed", setup_intent)
            raise self._decline_error(card.decline, setup_intent=setup_intent, payment_method=payment_method)
        if session["customer"] is not None:
            self._attach(payment_method, session["customer"])
        setup_intent.update(status="succeeded", payment_method=payment_method["id"], last_setup_error=None)
        session.update(status="complete", url=None)
        self._emit("setup_intent.succeeded", setup_intent)
        self._emit("checkout.session.completed", session)
        return copy.deepcopy(session)

    def settle_async_payment(self, session_id: str, *, succeeded: bool) -> JsonObject:
        """The bank debit started by ``pay_checkout_session(async_payment=True)`` settles."""
        session = self._get(session_id, "checkout.session")
        intent = self._get(session["payment_intent"], "payment_intent") if session["payment_intent"] else None
        if session["status"] != "complete" or intent is None or intent["status"] != "processing":
            raise StripeApiError(400, "This Checkout Session has no payment waiting to settle.")
        payment_method = self._get(intent["payment_method"], "payment_method")
        self._charge(intent, payment_method, None if succeeded else BANK_DEBIT_FAILURE)
        if succeeded:
            session["payment_status"] = "paid"
            self._emit("checkout.session.async_payment_succeeded", session)
        else:
            self._emit("checkout.session.async_payment_failed", session)
        return copy.deepcopy(session)

    def expire_checkout_session(self, session_id: str) -> JsonObject:
        session = self._get(session_id, "checkout.session")
        if session["status"] != "open":
            raise StripeApiError(400, 'Only Checkout Sessions with a status in ["open"] can be expired.')
        session.update(status="expired", url=None)
        if session["payment_intent"] is not None:
            intent = self._get(session["payment_intent"], "payment_intent")
            intent.update(status="canceled", canceled_at=self._now(), cancellation_reason="abandoned")
            self._emit("payment_intent.canceled", intent)
        self._emit("checkout.session.expired", session)
        return copy.deepcopy(session)

    # -- refunds and disputes ------------------------------------------------------------------

    def _paid_charge(self, params: JsonObject) -> JsonObject:
        charge_id = param_str(params, "charge")
        intent_id = param_str(params, "payment_intent")
        if charge_id is None and intent_id is None:
            raise StripeApiError(
                400,
                "One of the following params should be provided for this request: payment_intent or charge.",
                code="parameter_missing",
            )
        if charge_id is None:
            assert intent_id is not None
            intent = self._get(intent_id, "payment_intent", param="payment_intent")
            if intent["status"] != "succeeded" or intent["latest_charge"] is None:
                raise StripeApiError(
                    400,
                    f"PaymentIntent {intent_id} does not have a successful charge.",
                    code="charge_not_refundable",
                    param="payment_intent",
                )
            charge_id = intent["latest_charge"]
        charge = self._get(charge_id, "charge", param="charge")
        if charge["status"] != "succeeded":
            raise StripeApiError(400, f"Charge {charge_id} did not succeed.", param="charge")
        return charge

    def _open_dispute_of(self, charge_id: str) -> JsonObject | None:
        for obj in self._objects.values():
            if (
                obj["object"] == "dispute"
                and obj["charge"] == charge_id
                and obj["status"] in OPEN_DISPUTE_STATUSES
            ):
                return obj
        return None

    def create_refund(self, params: JsonObject) -> JsonObject:
        charge = self._paid_charge(params)
        if self._open_dispute_of(charge["id"]) is not None:
            raise StripeApiError(
                400,
                f"Charge {charge['id']} has been charged back; cannot issue a refund.",
                code="charge_disputed",
            )
        remaining = charge["amount"] - charge["amount_refunded"]
        if remaining <= 0:
            raise StripeApiError(
                400, f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded"
            )
        amount = param_int(params, "amount")
        amount = remaining if amount is None else amount
        if amount < 1:
            raise StripeApiError(400, "Refund amount must be positive.", param="amount")
        if amount > remaining:
            raise StripeApiError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
                param="amount",
            )
        reason = param_str(params, "reason")
        if reason is not None and reason not in REFUND_REASONS:
            raise StripeApiError(400, f"Invalid reason: {reason}", param="reason")
        refund = self._store(
            {
                "id": new_id("re_"),
                "object": "refund",
                "amount": amount,
                "balance_transaction": new_id("txn_"),
                "charge": charge["id"],
                "created": self._now(),
                "currency": charge["currency"],
                "metadata": param_metadata(params),
                "payment_intent": charge["payment_intent"],
                "reason": reason,
                "receipt_number": None,
                "status": "succeeded",
            }
        )
        previous = {"amount_refunded": charge["amount_refunded"], "refunded": charge["refunded"]}
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        self._emit("refund.created", refund)
        self._emit("charge.refunded", charge, previous)
        return copy.deepcopy(refund)

    def open_dispute(self, params: JsonObject) -> JsonObject:
        """The card holder disputes a paid charge (by ``charge`` or ``payment_intent``;
        optional ``amount``, default what is not refunded, and ``reason``). ``inquiry``: the
        bank only asks (Stripe's inquiry: status ``warning_needs_response``, no funds withdrawn);
        closed in the merchant's favour it is ``warning_closed``."""
        charge = self._paid_charge(params)
        if charge["disputed"]:
            raise StripeApiError(400, f"Charge {charge['id']} is already disputed.", param="charge")
        amount = param_int(params, "amount")
        remaining = charge["amount"] - charge["amount_refunded"]
        amount = remaining if amount is None else amount
        if not 1 <= amount <= remaining:
            raise StripeApiError(400, f"Dispute amount must be between 1 and {remaining}.", param="amount")
        inquiry = param_bool(params, "inquiry")
        reason = param_str(params, "reason") or "fraudulent"
        if reason not in DISPUTE_REASONS:
            raise StripeApiError(400, f"Invalid reason: {reason}", param="reason")
        now = self._now()
        dispute = self._store(
            {
                "id": new_id("dp_"),
                "object": "dispute",
                "amount": amount,
                "balance_transactions": [],
                "charge": charge["id"],
                "created": now,
                "currency": charge["currency"],
                "evidence_details": {
                    "due_by": now + 7 * 24 * 3600,
                    "has_evidence": False,
                    "past_due": False,
                    "submission_count": 0,
                },
                "is_charge_refundable": False,
                "livemode": False,
                "metadata": {},
                "payment_intent": charge["payment_intent"],
                "reason": reason,
                "status": "warning_needs_response" if inquiry else "needs_response",
            }
        )
        charge["disputed"] = True
        self._emit("charge.dispute.created", dispute)
        if not inquiry:
            self._emit("charge.dispute.funds_withdrawn", dispute)
        return copy.deepcopy(dispute)

    def close_dispute(self, dispute_id: str, *, won: bool) -> JsonObject:
        dispute = self._get(dispute_id, "dispute")
        if dispute["status"] not in OPEN_DISPUTE_STATUSES:
            raise StripeApiError(400, f"Dispute {dispute_id} is already closed ({dispute['status']}).")
        previous = {"status": dispute["status"]}
        if dispute["status"].startswith("warning_"):
            # An inquiry closes without a chargeback, or becomes one (not modelled).
            if not won:
                raise StripeApiError(
                    400, "An inquiry closes in the merchant's favour (won) in the simulator."
                )
            dispute["status"] = "warning_closed"
            self._emit("charge.dispute.closed", dispute, previous)
            return copy.deepcopy(dispute)
        dispute["status"] = "won" if won else "lost"
        if won:
            self._emit("charge.dispute.funds_reinstated", dispute)
        self._emit("charge.dispute.closed", dispute, previous)
        return copy.deepcopy(dispute)
