"""Stripe is never called while a database transaction (or a row lock) is open: a Stripe that
hangs holds no pool connection and no lock. Watched at the HTTP transport between the app's
gateway and its simulator: every request to Stripe first counts the test database's sessions
inside a transaction, and a request can be made to hang there, or to lose its answer.

Stripe's events are held back, and handed to the webhook's handling (with the watched gateway)
by the test, one at a time: nothing else touches the database while a request is watched."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.pool import QueuePool
from strawberry.relay import GlobalID

from orgwallet.config import Settings
from orgwallet.db.engine import RemoteCallInTransaction, assert_no_transaction, transaction
from orgwallet.payments.gateway import StripeGateway, TransportHTTPClient
from orgwallet.payments.runtime import INTERNAL_BASE_URL, SIMULATOR_MOUNT
from orgwallet.payments.simulator.delivery import encode_event
from orgwallet.webhooks import handle_event
from tests.payments.test_purchases import buy_with_saved_card
from tests.purchasing import CANCEL_URL, SETUP_PAYMENT_METHOD, START_CHECKOUT, SUCCESS_URL, Shop, session_id

MAX_WAIT = 10.0
IN_TRANSACTION = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'
"""


@dataclass
class Call:
    method: str
    path: str
    open_transactions: int  # sessions of the database inside a transaction when it was sent


@dataclass
class WatchedStripe(httpx.AsyncBaseTransport):
    """The app's way to its Stripe (an ASGI transport into the simulator it mounts), watched.
    ``hold(method, path)``: matching requests wait for ``release``. ``lose_answer(method, path)``:
    matching requests reach Stripe, and their answer is lost on the way back."""

    inner: httpx.AsyncBaseTransport
    watcher: asyncpg.Connection  # the test's own connection to the database
    gateway: StripeGateway = field(init=False)
    calls: list[Call] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)  # bodies Stripe sent, lost ones too
    handed: set[str] = field(default_factory=set)  # the events handed to the webhook's handling
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # the watcher runs one query at a time
    _hold: tuple[str, str] | None = None
    _lose: tuple[str, str] | None = None

    def hold(self, method: str, path: str) -> None:
        self._hold = (method, path)

    def lose_answer(self, method: str, path: str) -> None:
        self._lose = (method, path)

    def keep_answers(self) -> None:
        self._lose = None

    async def wait_held(self) -> None:
        await asyncio.wait_for(self.held.wait(), MAX_WAIT)

    async def open_transactions(self) -> int:
        async with self.lock:
            return int(await self.watcher.fetchval(IN_TRANSACTION))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(Call(request.method, request.url.path, await self.open_transactions()))
        if _matches(self._hold, request):
            self.held.set()
            await self.release.wait()
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self.answers.append(json.loads(body))
        if _matches(self._lose, request):
            raise httpx.ReadError("the connection dropped before the answer came", request=request)
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    def requests(self, method: str, path: str) -> list[Call]:
        return [call for call in self.calls if call.method == method and re.search(path, call.path)]


def _matches(pattern: tuple[str, str] | None, request: httpx.Request) -> bool:
    return (
        pattern is not None and request.method == pattern[0] and bool(re.search(pattern[1], request.url.path))
    )


@pytest.fixture
async def stripe(shop: Shop, settings: Settings) -> AsyncIterator[WatchedStripe]:
    """The app's gateway, replaced for the test by one that goes through ``WatchedStripe`` (no
    retries of its own: a lost answer is an error at once); Stripe's events held back."""
    shop.simulator.enabled_events = frozenset()
    watcher = await asyncpg.connect(
        settings.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    )
    watched = WatchedStripe(httpx.ASGITransport(app=shop.app), watcher)
    watched.gateway = StripeGateway(
        settings.simulator_secret_key,
        settings.webhook_secret,
        api_base=INTERNAL_BASE_URL + SIMULATOR_MOUNT,
        http_client=TransportHTTPClient(watched),
        max_network_retries=0,
    )
    connection = shop.app.state.runtime.stripe
    original, connection.gateway = connection.gateway, watched.gateway
    try:
        yield watched
    finally:
        watched.release.set()
        connection.gateway = original
        await watched.gateway.close()
        await watcher.close()


async def handle(shop: Shop, stripe: WatchedStripe, event_type: str) -> list[tuple[int, str]]:
    """Stripe's events of that type not handed yet, handled as the webhook route does, with the
    watched gateway: (status, outcome) of each."""
    handled = []
    for event in await shop.simulator.events(event_type):
        if event["id"] in stripe.handed:
            continue
        stripe.handed.add(event["id"])
        payload = encode_event(event)
        handled.append(
            await handle_event(
                shop.app.state.runtime.sessions, stripe.gateway, json.loads(payload), payload.decode()
            )
        )
    return handled


async def assert_nothing_held(shop: Shop, stripe: WatchedStripe) -> None:
    """While a call to Stripe hangs: no session of the database is inside a transaction, the
    app's pool lends no connection, and the organization and its wallet can be locked at once."""
    pool = shop.app.state.runtime.engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 0
    assert await stripe.open_transactions() == 0
    async with stripe.lock, stripe.watcher.transaction():
        for table, column in (("wallets", "organization_id"), ("organizations", "id")):
            locked = await stripe.watcher.fetch(
                f"SELECT 1 FROM {table} WHERE {column} = $1 FOR UPDATE NOWAIT",  # noqa: S608 (constants)
                shop.org_id,
            )
            assert len(locked) == 1, table


async def save_card(shop: Shop, stripe: WatchedStripe) -> None:
    variables = {"input": {"organizationId": shop.org, "successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL}}
    started = (await shop.client.data(SETUP_PAYMENT_METHOD, variables, as_=shop.owner))["setupPaymentMethod"]
    assert (await shop.press(started["checkoutUrl"])).status_code == 303
    assert await handle(shop, stripe, "checkout.session.completed") == [(200, "payment_method_saved")]


def assert_outside_transactions(stripe: WatchedStripe) -> None:
    assert stripe.calls
    assert [call for call in stripe.calls if call.open_transactions] == []


class TestTheGuard:
    async def test_no_remote_call_inside_a_transaction(self, shop: Shop) -> None:
        assert_no_transaction("a call outside")
        async with transaction(shop.app.state.runtime.sessions):
            with pytest.raises(RemoteCallInTransaction, match="SMTP send called while a database"):
                assert_no_transaction("SMTP send")
            with pytest.raises(RemoteCallInTransaction, match="Stripe create_customer called"):
                await shop.gateway.create_customer(name="in", email=None, metadata={}, idempotency_key="in")
        assert_no_transaction("a call after it")
        assert await shop.simulator.events("customer.created") == []

    async def test_every_stripe_call_of_the_gateway_refuses_a_transaction(
        self, shop: Shop, stripe: WatchedStripe
    ) -> None:
        remote = [
            name
            for name, method in inspect.getmembers(StripeGateway, inspect.iscoroutinefunction)
            if not name.startswith("_") and name != "close"
        ]
        assert {"create_customer", "create_payment_checkout", "latest_charge", "retrieve_event"} <= set(
            remote
        )
        async with transaction(shop.app.state.runtime.sessions):
            for name in remote:
                method = getattr(stripe.gateway, name)
                # Whatever the arguments: the guard refuses before anything is sent.
                arguments = {
                    parameter.name: None
                    for parameter in inspect.signature(method).parameters.values()
                    if parameter.default is inspect.Parameter.empty
                }
                with pytest.raises(RemoteCallInTransaction, match=f"Stripe {name} called"):
                    await method(**arguments)
        assert stripe.calls == []
        customer = await stripe.gateway.create_customer(
            name="after", email=None, metadata={}, idempotency_key="after-the-transaction"
        )
        assert customer.id.startswith("cus_")


class TestAHangingStripe:
    @pytest.mark.parametrize(
        "endpoint", ["/v1/customers$", "/v1/checkout/sessions$"], ids=["the customer", "the session"]
    )
    async def test_start_checkout(self, shop: Shop, stripe: WatchedStripe, endpoint: str) -> None:
        balance = await shop.balance()
        stripe.hold("POST", endpoint)
        started = asyncio.create_task(shop.checkout(tokens=20, key="buy-1"))
        await stripe.wait_held()
        await assert_nothing_held(shop, stripe)
        [row] = await shop.sql("SELECT status, checkout_url FROM purchases")
        assert (row.status, row.checkout_url) == ("pending", None)  # committed before Stripe

        stripe.release.set()
        purchase, url = await started
        assert (purchase["status"], purchase["tokens"]) == ("PENDING", 20)
        assert (await shop.press(url)).status_code == 303
        assert await handle(shop, stripe, "checkout.session.completed") == [(200, "credited")]
        assert (await shop.purchase(purchase["id"]))["status"] == "PAID"
        assert await shop.balance() == balance + 20
        assert_outside_transactions(stripe)

    @pytest.mark.parametrize(
        ("method", "endpoint"),
        [("GET", "/v1/customers/cus_\\w+$"), ("POST", "/v1/payment_intents$")],
        ids=["the card", "the charge"],
    )
    async def test_purchase_with_saved_card(
        self, shop: Shop, stripe: WatchedStripe, method: str, endpoint: str
    ) -> None:
        await save_card(shop, stripe)
        if method == "GET":  # the setup's webhook is late: the card is asked of Stripe
            await shop.sql_write("UPDATE stripe_customers SET default_payment_method = NULL")
        balance = await shop.balance()
        stripe.hold(method, endpoint)
        bought = asyncio.create_task(buy_with_saved_card(shop, "k1", tokens=30))
        await stripe.wait_held()
        await assert_nothing_held(shop, stripe)

        stripe.release.set()
        result = await bought
        assert result["__typename"] == "PurchaseStarted", result
        assert await handle(shop, stripe, "payment_intent.succeeded") == [(200, "credited")]
        paid = await shop.purchase(result["purchase"]["id"])
        assert (paid["status"], paid["tokens"]) == ("PAID", 30)
        assert await shop.balance() == balance + 30
        assert_outside_transactions(stripe)


class TestAnAnswerLost:
    """Stripe made the Checkout Session, and its answer was lost on the way back: the purchase
    was committed before, and has no session."""

    async def start(self, shop: Shop, key: str | None) -> dict[str, Any]:
        """startCheckout, expected to fail: its raw answer."""
        variables = {
            "organizationId": shop.org,
            "tokens": 20,
            "successUrl": SUCCESS_URL,
            "cancelUrl": CANCEL_URL,
            "idempotencyKey": key,
        }
        return await shop.client.raw(START_CHECKOUT, {"input": variables}, as_=shop.owner)

    def sessions_made(self, stripe: WatchedStripe) -> list[str]:
        return [answer["id"] for answer in stripe.answers if answer.get("object") == "checkout.session"]

    async def test_the_same_key_again_gets_the_same_session(self, shop: Shop, stripe: WatchedStripe) -> None:
        stripe.lose_answer("POST", "/v1/checkout/sessions$")
        lost_answer = (await self.start(shop, "buy-1"))["data"]["startCheckout"]
        assert lost_answer["__typename"] == "PaymentProviderError", lost_answer
        assert "try again with the same idempotency key" in lost_answer["message"]
        [lost] = self.sessions_made(stripe)
        [row] = await shop.sql("SELECT id, status, checkout_url FROM purchases")
        assert (row.status, row.checkout_url) == ("pending", None)

        stripe.keep_answers()
        purchase, url = await shop.checkout(tokens=20, key="buy-1")
        assert purchase["id"] == str(GlobalID("Purchase", str(row.id)))
        # The same Stripe idempotency key: Stripe answered the session it had made.
        assert session_id(url) == lost
        assert self.sessions_made(stripe) == [lost, lost]
        assert len(stripe.requests("POST", "/v1/customers$")) == 1
        [audit] = await shop.sql("SELECT after FROM audit_log WHERE action = 'purchase.start_checkout'")
        assert audit.after["checkout_session_id"] == lost
        # Finished: the same key again is answered from the purchase, Stripe is not asked.
        again, again_url = await shop.checkout(tokens=20, key="buy-1")
        assert (again["id"], again_url) == (purchase["id"], url)
        assert len(stripe.requests("POST", "/v1/checkout/sessions$")) == 2
        assert (await shop.press(url)).status_code == 303
        assert await handle(shop, stripe, "checkout.session.completed") == [(200, "credited")]
        assert_outside_transactions(stripe)

    async def test_without_a_key_nothing_is_left(self, shop: Shop, stripe: WatchedStripe) -> None:
        """As before Stripe was called outside the transaction: a failed request writes nothing."""
        stripe.lose_answer("POST", "/v1/checkout/sessions$")
        answer = (await self.start(shop, None))["data"]["startCheckout"]
        assert answer["__typename"] == "PaymentProviderError", answer
        assert len(self.sessions_made(stripe)) == 1
        assert await shop.sql("SELECT id FROM purchases") == []


class TestWebhooksAskStripeFirst:
    """What a handler needs from Stripe is asked before the event's transaction, and only then."""

    async def test_a_card_saved_by_a_setup_checkout(self, shop: Shop, stripe: WatchedStripe) -> None:
        await save_card(shop, stripe)  # checkout.session.completed, in setup mode
        [customer] = await shop.sql("SELECT customer_id, default_payment_method FROM stripe_customers")
        assert customer.default_payment_method.startswith("pm_")
        assert await stripe.gateway.default_payment_method_id(customer.customer_id) == (
            customer.default_payment_method
        )
        # The setup's other event: the card is recorded already, Stripe is not told again.
        assert await handle(shop, stripe, "setup_intent.succeeded") == [(200, "already_saved")]
        assert len(stripe.requests("GET", "/v1/setup_intents/")) == 1
        assert len(stripe.requests("POST", f"/v1/customers/{customer.customer_id}$")) == 1
        assert_outside_transactions(stripe)

    async def test_a_dispute_of_a_purchase_never_credited(self, shop: Shop, stripe: WatchedStripe) -> None:
        await save_card(shop, stripe)
        result = await buy_with_saved_card(shop, "k1", tokens=40)
        [row] = await shop.sql("SELECT payment_intent_id, lot_id FROM purchases")
        assert row.payment_intent_id and row.lot_id is None  # paid; Stripe's events not handled yet
        await shop.simulator.open_dispute({"payment_intent": row.payment_intent_id})
        assert await handle(shop, stripe, "charge.dispute.created") == [(200, "disputed")]
        assert len(stripe.requests("GET", "/v1/charges/")) == 1  # was it paid? Stripe's word
        assert await shop.purchase_entries() == [("purchase", 40), ("clawback", -40)]
        disputed = await shop.purchase(result["purchase"]["id"])
        assert (disputed["status"], disputed["tokensClawedBack"]) == ("DISPUTED", 40)
        assert disputed["receiptUrl"]
        assert await handle(shop, stripe, "payment_intent.succeeded") == [(200, "already_credited")]
        assert await shop.purchase_entries() == [("purchase", 40), ("clawback", -40)]
        assert await shop.violations() == {}
        assert_outside_transactions(stripe)

    async def test_the_receipt_is_asked_once_per_payment(self, shop: Shop, stripe: WatchedStripe) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        assert (await shop.press(url)).status_code == 303
        assert await handle(shop, stripe, "checkout.session.completed") == [(200, "credited")]
        paid = await shop.purchase(purchase["id"])
        assert paid["status"] == "PAID" and paid["receiptUrl"]
        # The payment's other event finds it credited: nothing to ask Stripe.
        assert await handle(shop, stripe, "payment_intent.succeeded") == [(200, "already_credited")]
        assert len(stripe.requests("GET", "/v1/payment_intents/")) == 1
        assert_outside_transactions(stripe)
