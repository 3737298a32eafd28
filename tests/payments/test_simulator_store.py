"""The offline Stripe is safe to leave running: it accepts only this installation's secret
key, its hosted pages show only their own object, and its state is in PostgreSQL, so a restart
loses nothing and several processes on one database share one simulated account."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
import stripe
from fastapi import FastAPI

from orgwallet.app import create_app
from orgwallet.config import Settings
from orgwallet.payments.gateway import STRIPE_API_VERSION, TransportHTTPClient
from orgwallet.payments.runtime import INTERNAL_BASE_URL, SIMULATOR_MOUNT
from orgwallet.payments.simulator import Simulator
from orgwallet.payments.simulator.store import LOCK_CLASS
from orgwallet.runtime import Runtime
from tests.helpers import GraphQLClient, eventually
from tests.payments.conftest import API_BASE, SECRET_KEY, StripeWorld
from tests.payments.test_purchases import buy_with_saved_card, save_card
from tests.purchasing import FAST_RETRIES, Shop, new_shop, session_id
from tests.test_serve import free_port, orgwallet_command

API = INTERNAL_BASE_URL + SIMULATOR_MOUNT
OTHER_KEY = "sk_test_" + "0" * 40 + "beef"


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


def simulator_of(app: FastAPI) -> Simulator:
    simulator = runtime_of(app).simulator
    assert simulator is not None
    return simulator


@asynccontextmanager
async def opened(app: FastAPI) -> AsyncIterator[tuple[GraphQLClient, httpx.AsyncClient]]:
    """The app's GraphQL client and a browser (no key), both in-process."""
    simulator_of(app).webhooks.retry_delays = FAST_RETRIES
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        httpx.AsyncClient(transport=transport) as browser,
    ):
        yield GraphQLClient(http, runtime_of(app).settings), browser


@asynccontextmanager
async def sdk(app: FastAPI, key: str) -> AsyncIterator[stripe.StripeClient]:
    """The plain ``stripe`` SDK on the app's simulator, with ``key``."""
    http_client = TransportHTTPClient(httpx.ASGITransport(app=app))
    try:
        yield stripe.StripeClient(
            key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": API},
            http_client=http_client,
            max_network_retries=0,
        )
    finally:
        await http_client.close_async()


async def paid_purchase(shop: Shop) -> tuple[dict[str, object], str]:
    """A checkout paid on the hosted page: (the purchase, its checkout URL)."""
    purchase, url = await shop.checkout(package="tokens-50")
    await shop.pay(url)
    paid = await shop.purchase(str(purchase["id"]))
    assert paid["status"] == "PAID", paid
    return paid, url


class TestOnlyThisInstallationsKey:
    async def test_the_api_refuses_another_key_and_none(self, app: FastAPI, settings: Settings) -> None:
        async with sdk(app, OTHER_KEY) as other:
            with pytest.raises(stripe.AuthenticationError) as refused:
                await other.v1.customers.create_async({"name": "Mallory"})
        assert refused.value.http_status == 401
        assert refused.value.user_message == "Invalid API Key provided: sk_test_****beef"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            anonymous = await http.post(f"{API}/v1/customers", data={"name": "Mallory"})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "invalid_request_error"
        assert "did not provide an API key" in anonymous.json()["error"]["message"]

        async with sdk(app, settings.simulator_secret_key) as ours:
            customer = await ours.v1.customers.create_async({"name": "Acme"})
            assert (await ours.v1.customers.retrieve_async(customer.id)).name == "Acme"
        # The refused calls made nothing.
        created = await simulator_of(app).events("customer.created")
        assert [event["data"]["object"]["name"] for event in created] == ["Acme"]

    async def test_another_key_cannot_read_a_session(self, shop: Shop, settings: Settings) -> None:
        _, url = await shop.checkout(package="tokens-50")
        async with sdk(shop.app, OTHER_KEY) as other:
            with pytest.raises(stripe.AuthenticationError):
                await other.v1.checkout.sessions.retrieve_async(session_id(url))
        async with sdk(shop.app, settings.simulator_secret_key) as ours:
            assert (await ours.v1.checkout.sessions.retrieve_async(session_id(url))).status == "open"

    async def test_the_test_controls_need_the_key(self, shop: Shop, settings: Settings) -> None:
        paid, url = await paid_purchase(shop)
        session = await shop.gateway.retrieve_checkout_session(session_id(url))
        refund = {"payment_intent": session.payment_intent}
        for headers in ({}, {"Authorization": f"Bearer {OTHER_KEY}"}, {"Authorization": "Basic x"}):
            listed = await shop.browser.get(f"{API}/test/events", headers=headers)
            assert listed.status_code == 401, listed.text
            assert "checkout.session" not in listed.text
            refunded = await shop.browser.post(f"{API}/test/refunds", json=refund, headers=headers)
            assert refunded.status_code == 401
        await shop.drain()
        assert (await shop.purchase(str(paid["id"])))["status"] == "PAID"
        assert await shop.simulator.events("charge.refunded") == []

        keyed = {"Authorization": f"Bearer {settings.simulator_secret_key}"}
        listed = await shop.browser.get(f"{API}/test/events?type=checkout.session.completed", headers=keyed)
        assert listed.status_code == 200
        [event] = listed.json()["data"]
        assert [attempt["succeeded"] for attempt in event["deliveries"]] == [True]


class TestHostedPagesAreOpen:
    async def test_checkout_and_receipt_open_without_a_key_unknown_ids_are_404(self, shop: Shop) -> None:
        _, open_url = await shop.checkout(package="tokens-50")
        assert (await shop.browser.get(open_url)).status_code == 200
        # The same browser, without the key, gets nothing from the API about that session.
        api = await shop.browser.get(f"{API}/v1/checkout/sessions/{session_id(open_url)}")
        assert api.status_code == 401 and "$45.00" not in api.text and "4500" not in api.text
        paid, _ = await paid_purchase(shop)
        receipt = str(paid["receiptUrl"])
        assert (await shop.browser.get(receipt)).status_code == 200
        base, charge_id = receipt.split("/receipts/")
        for missing in (
            f"{base}/checkout/cs_test_nope",
            f"{base}/receipts/ch_nope",
            f"{base}/receipts/{session_id(open_url)}",  # a page shows its own kind of object only
            f"{base}/checkout/{charge_id}",
        ):
            page = await shop.browser.get(missing)
            assert page.status_code == 404, missing
            assert "$45.00" not in page.text and "Buyer" not in page.text


class TestSections:
    async def test_an_operation_that_fails_half_way_writes_nothing(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        account = stripe_world.simulator.account

        def half_done() -> None:
            account.update_customer(customer_id, {"name": "Changed"})
            raise ValueError("a bug half-way")

        with pytest.raises(ValueError, match="half-way"):
            await stripe_world.simulator.run(half_done)
        assert (await stripe_world.gateway.retrieve_customer(customer_id)).name == "Acme"
        assert await stripe_world.simulator.events("customer.updated") == []

    async def test_the_account_is_not_read_outside_a_section(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        with pytest.raises(RuntimeError, match="inside a section"):
            stripe_world.simulator.account.find(customer_id)
        found = await stripe_world.simulator.run(stripe_world.simulator.account.find, customer_id)
        assert found is not None and found["name"] == "Acme"

    async def test_an_amount_it_cannot_keep_is_refused(self, stripe_world: StripeWorld) -> None:
        async with sdk_on(stripe_world) as client:
            with pytest.raises(stripe.InvalidRequestError) as refused:
                await client.v1.payment_intents.create_async({"amount": 10**30, "currency": "usd"})
        assert (refused.value.http_status, refused.value.code) == (400, "amount_too_large")
        assert await stripe_world.simulator.events("payment_intent.created") == []


@asynccontextmanager
async def sdk_on(world: StripeWorld) -> AsyncIterator[stripe.StripeClient]:
    http_client = TransportHTTPClient(world.transport)
    try:
        yield stripe.StripeClient(
            SECRET_KEY,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": API_BASE},
            http_client=http_client,
            max_network_retries=0,
        )
    finally:
        await http_client.close_async()


async def test_a_restart_loses_nothing(settings: Settings) -> None:
    """Customers, saved cards, receipts and events outlive the process that made them."""
    first = create_app(settings)
    try:
        async with opened(first) as (client, browser):
            shop = await new_shop(first, client, browser)
            await save_card(shop)
            paid, _ = await paid_purchase(shop)
            before = [event["id"] for event in await shop.simulator.events()]
    finally:
        await runtime_of(first).close()

    second = create_app(settings)
    try:
        async with opened(second) as (client, browser):
            shop = Shop(second, client, browser, shop.org, shop.owner)
            result = await buy_with_saved_card(shop, "after-the-restart")
            assert result["__typename"] == "PurchaseStarted", result
            await shop.drain()
            assert (await shop.purchase(result["purchase"]["id"]))["status"] == "PAID"
            assert (await browser.get(str(paid["receiptUrl"]))).status_code == 200
            async with sdk(second, settings.simulator_secret_key) as ours:
                listed = await ours.v1.events.list_async({"limit": 100})
                assert set(before) <= {event.id for event in listed.data}
                assert (await ours.v1.events.retrieve_async(before[0])).id == before[0]
    finally:
        await runtime_of(second).close()


async def test_two_apps_on_one_database_share_one_account(settings: Settings) -> None:
    one, two = create_app(settings), create_app(settings)
    try:
        async with (
            sdk(one, settings.simulator_secret_key) as first,
            sdk(two, settings.simulator_secret_key) as second,
        ):
            made = await first.v1.customers.create_async({"name": "Acme"}, {"idempotency_key": "k-1"})
            again = await second.v1.customers.create_async({"name": "Acme"}, {"idempotency_key": "k-1"})
            assert again.id == made.id
            assert again.last_response is not None
            assert again.last_response.headers.get("Idempotent-Replayed") == "true"
            with pytest.raises(stripe.IdempotencyError):
                await second.v1.customers.create_async({"name": "Other"}, {"idempotency_key": "k-1"})

            session = await first.v1.checkout.sessions.create_async(
                {
                    "mode": "payment",
                    "customer": made.id,
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": "usd",
                                "unit_amount": 4500,
                                "product_data": {"name": "50 tokens"},
                            },
                        }
                    ],
                    "success_url": "https://a.example/ok",
                }
            )
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=two)) as browser:
                page = await browser.post(
                    f"{API}/checkout/{session.id}", data={"card_number": "4242424242424242", "action": "pay"}
                )
            assert page.status_code == 303, page.text
            seen_by_one = await first.v1.checkout.sessions.retrieve_async(session.id)
            assert (seen_by_one.status, seen_by_one.payment_status) == ("complete", "paid")
            [method] = (await first.v1.customers.payment_methods.list_async(made.id)).data
            assert method.customer == made.id
        created = await simulator_of(one).events("customer.created")
        assert [event["data"]["object"]["id"] for event in created] == [made.id]
    finally:
        await runtime_of(one).close()
        await runtime_of(two).close()


async def test_a_delivery_pending_when_its_process_dies_is_sent_after_a_restart(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"worker": "off"})
    first = create_app(settings)
    try:
        async with opened(first) as (client, browser):
            shop = await new_shop(first, client, browser)
            simulator = shop.simulator

            async def unreachable(payload: bytes, headers: Mapping[str, str]) -> int:
                raise ConnectionError("the app is down")

            simulator.webhook_target = unreachable
            simulator.webhooks.retry_delays = (3600.0,)  # still waiting when the process goes
            purchase, url = await shop.checkout(package="tokens-50")
            assert (await shop.press(url)).status_code == 303
            await eventually(lambda: _untried(simulator), what="a first attempt of every delivery")
    finally:
        await runtime_of(first).close()  # as a death: the deliveries stay pending in the database

    # Two processes start at once: each pending delivery is resumed by one of them.
    second, third = create_app(settings), create_app(settings)
    try:
        async with AsyncExitStack() as stack:
            await asyncio.gather(
                stack.enter_async_context(second.router.lifespan_context(second)),  # its start-up
                simulator_of(third).start(),
            )
            for app in (second, third):
                await simulator_of(app).drain()
            completed = [
                (attempt.attempt, attempt.status_code)
                for app in (second, third)
                for attempt in simulator_of(app).webhooks.attempts
                if attempt.event_type == "checkout.session.completed"
            ]
            assert completed == [(2, 200)]
            async with opened(third) as (client, browser):
                shop = Shop(third, client, browser, shop.org, shop.owner)
                assert (await shop.purchase(str(purchase["id"])))["status"] == "PAID"
                keyed = {"Authorization": f"Bearer {settings.simulator_secret_key}"}
                listed = await browser.get(
                    f"{API}/test/events?type=checkout.session.completed", headers=keyed
                )
                [event] = listed.json()["data"]
                assert [(a["attempt"], a["status_code"]) for a in event["deliveries"]] == [
                    (1, None),
                    (2, 200),
                ]
    finally:
        await runtime_of(third).close()


async def _untried(simulator: Simulator) -> bool:
    async with simulator.store.pool.acquire() as connection:
        untried = await connection.fetchval(
            "SELECT count(*) FROM stripe_simulator.deliveries WHERE attempts = '[]'::jsonb"
        )
    return int(untried) == 0


def test_two_server_processes_share_one_account(settings: Settings, tmp_path: Path) -> None:
    """``orgwallet serve --workers 2``: the same Idempotency-Key sent again and again, each
    time on a new connection (to either worker), makes one customer; each worker reads what
    the other made."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORGWALLET_", "STRIPE_"))}
    env |= {
        "ORGWALLET_DATABASE_URL": str(settings.database_url),
        "ORGWALLET_HOME": str(settings.home),
        "ORGWALLET_JWT_SECRET": "test-secret-" + "x" * 40,
        "ORGWALLET_WORKER": "off",
        "ORGWALLET_DATABASE_POOL_SIZE": "4",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*orgwallet_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        headers = {"Authorization": f"Bearer {settings.simulator_secret_key}"}
        _wait_for_simulators(settings, server, log, count=2)
        ids, sessions = set(), []
        for attempt in range(12):
            with httpx.Client(base_url=f"{base}/_stripe", headers=headers, timeout=30) as fresh:
                made = fresh.post("/v1/customers", data={"name": "Acme"}, headers={"Idempotency-Key": "once"})
                assert made.status_code == 200, made.text
                ids.add(made.json()["id"])
                if attempt % 2 == 0:
                    sessions.append(
                        fresh.post(
                            "/v1/checkout/sessions",
                            data={"mode": "setup", "currency": "usd", "customer": made.json()["id"]},
                        ).json()["id"]
                    )
                else:
                    for known in sessions:
                        assert fresh.get(f"/v1/checkout/sessions/{known}").status_code == 200
        assert len(ids) == 1
        with httpx.Client(base_url=f"{base}/_stripe", headers=headers, timeout=30) as fresh:
            listed = fresh.get("/test/events", params={"type": "customer.created"}).json()["data"]
        assert [event["data"]["object"]["id"] for event in listed] == list(ids)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)


def _wait_for_simulators(settings: Settings, server: subprocess.Popen[bytes], log: Path, count: int) -> None:
    """Until ``count`` processes hold a simulator's process lock (each worker's start-up)."""
    import asyncio

    async def holders() -> int:
        connection = await asyncpg.connect(str(settings.database_url).replace("+asyncpg", ""))
        try:
            return int(
                await connection.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid"
                    " AND objid <> 0 AND objsubid = 2 AND granted",
                    LOCK_CLASS,
                )
            )
        finally:
            await connection.close()

    deadline = time.monotonic() + 60
    while asyncio.run(holders()) < count:
        assert server.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.2)
