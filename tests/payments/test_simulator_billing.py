"""The simulator's Stripe Billing, through the real ``stripe`` SDK: products and recurring
prices, Checkout in subscription mode paid on the hosted page, renewals on a test clock,
plan changes with prorations, failed renewals and their retries, pause, cancel, the hosted
invoice page, and a restart on the same database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import httpx
import pytest
import stripe

from orgwallet.payments.gateway import STRIPE_API_VERSION, TransportHTTPClient
from orgwallet.payments.simulator.billing import shifted
from tests.payments.conftest import (
    API_BASE,
    KEYED,
    SECRET_KEY,
    StripeWorld,
    key,
    simulated_stripe,
)

DAY = 24 * 3600
HOUR = 3600
START = int(datetime(2027, 1, 15, 12, tzinfo=UTC).timestamp())
SUCCESS_URL = "https://app.example/subscriptions/done?session={CHECKOUT_SESSION_ID}"
GOOD_CARD = "4242424242424242"
DECLINES_LATER = "4000000000000341"  # attaches, then every charge is declined
DECLINED = "4000000000000002"


def month(n: int, anchor: int = START) -> int:
    return shifted(anchor, "month", n)


def stripe_rounded(value: Fraction) -> int:
    """Half away from zero, as the simulator documents Stripe's proration rounding."""
    magnitude = int(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


@pytest.fixture
async def sdk(stripe_world: StripeWorld) -> AsyncIterator[stripe.StripeClient]:
    http_client = TransportHTTPClient(stripe_world.transport)
    yield _client(http_client)
    await http_client.close_async()


def _client(http_client: TransportHTTPClient) -> stripe.StripeClient:
    return stripe.StripeClient(
        SECRET_KEY,
        stripe_version=STRIPE_API_VERSION,
        base_addresses={"api": API_BASE},
        http_client=http_client,
        max_network_retries=0,
    )


async def event_types(world: StripeWorld, after: int = 0) -> list[str]:
    return [event["type"] for event in (await world.simulator.events())[after:]]


async def in_order(types: list[str], *expected: str) -> None:
    """``expected`` appear in ``types`` in this order (others may come between)."""
    position = 0
    for wanted in expected:
        assert wanted in types[position:], (wanted, types)
        position = types.index(wanted, position) + 1


class Billing:
    """Small factories on the SDK for one test."""

    def __init__(self, world: StripeWorld, sdk: stripe.StripeClient) -> None:
        self.world = world
        self.sdk = sdk

    async def price(
        self, amount: int = 1000, *, interval: str = "month", name: str = "Pro", **extra: Any
    ) -> stripe.Price:
        product = await self.sdk.v1.products.create_async({"name": name}, {"idempotency_key": key("prod")})
        return await self.sdk.v1.prices.create_async(
            {
                "product": product.id,
                "unit_amount": amount,
                "currency": "usd",
                "recurring": {"interval": interval},
                **extra,
            },
            {"idempotency_key": key("price")},
        )

    async def clock(self, frozen_time: int = START) -> stripe.test_helpers.TestClock:
        return await self.sdk.v1.test_helpers.test_clocks.create_async(
            {"frozen_time": frozen_time, "name": "billing test"}
        )

    async def customer(self, clock: str | None, *, card: str | None = None) -> str:
        """A customer on ``clock``; ``card``: saved and made its default payment method."""
        params: dict[str, Any] = {"name": "Acme", "email": "billing@acme.test"}
        if clock is not None:
            params["test_clock"] = clock
        customer = await self.sdk.v1.customers.create_async(params, {"idempotency_key": key("cus")})
        if card is not None:
            await self.default_card(customer.id, card)
        return customer.id

    async def save_card(self, customer_id: str, card: str) -> str:
        saved = await self.world.browser.post(
            f"{API_BASE}/test/customers/{customer_id}/payment_methods",
            json={"card_number": card},
            headers=KEYED,
        )
        assert saved.status_code == 200, saved.text
        return str(saved.json()["id"])

    async def default_card(self, customer_id: str, card: str) -> str:
        payment_method = await self.save_card(customer_id, card)
        await self.sdk.v1.customers.update_async(
            customer_id, {"invoice_settings": {"default_payment_method": payment_method}}
        )
        return payment_method

    async def subscribe(self, customer_id: str, price_id: str, **extra: Any) -> stripe.Subscription:
        return await self.sdk.v1.subscriptions.create_async(
            {"customer": customer_id, "items": [{"price": price_id}], **extra},
            {"idempotency_key": key("sub")},
        )

    async def checkout(self, customer_id: str, price_id: str) -> stripe.checkout.Session:
        return await self.sdk.v1.checkout.sessions.create_async(
            {
                "mode": "subscription",
                "customer": customer_id,
                "line_items": [{"price": price_id, "quantity": 1}],
                "success_url": SUCCESS_URL,
                "cancel_url": "https://app.example/subscriptions/cancelled",
                "metadata": {"organization_id": "org-1"},
                "subscription_data": {"metadata": {"organization_id": "org-1", "plan": "pro"}},
            },
            {"idempotency_key": key("checkout")},
        )

    async def press(self, url: str, card: str) -> httpx.Response:
        """Pay on a hosted page as a browser posts its form (no key)."""
        return await self.world.browser.post(url, data={"card_number": card, "action": "pay"})

    async def advance(self, clock_id: str, frozen_time: int) -> None:
        answer = await self.sdk.v1.test_helpers.test_clocks.advance_async(
            clock_id, {"frozen_time": frozen_time}
        )
        assert answer.status == "advancing"
        clock = await self.sdk.v1.test_helpers.test_clocks.retrieve_async(clock_id)
        assert (clock.status, clock.frozen_time) == ("ready", frozen_time)

    async def subscription(self, subscription_id: str) -> stripe.Subscription:
        return await self.sdk.v1.subscriptions.retrieve_async(subscription_id)

    async def invoices(self, subscription_id: str) -> list[stripe.Invoice]:
        """Oldest first."""
        listed = await self.sdk.v1.invoices.list_async({"subscription": subscription_id, "limit": 100})
        return list(reversed(listed.data))


@pytest.fixture
def billing(stripe_world: StripeWorld, sdk: stripe.StripeClient) -> Billing:
    return Billing(stripe_world, sdk)


def period(subscription: stripe.Subscription) -> tuple[int, int]:
    item = subscription["items"].data[0]
    return item.current_period_start, item.current_period_end


def subscription_of(invoice: stripe.Invoice) -> str:
    assert invoice.parent is not None and invoice.parent.subscription_details is not None
    subscription = invoice.parent.subscription_details.subscription
    assert isinstance(subscription, str)
    return subscription


class TestProductsAndPrices:
    async def test_create_retrieve_update_list(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        price = await billing.price(1500, lookup_key="pro-monthly", metadata={"tokens": "1000"})
        assert (price.type, price.unit_amount, price.currency, price.active) == (
            "recurring",
            1500,
            "usd",
            True,
        )
        assert price.recurring is not None
        assert (price.recurring.interval, price.recurring.interval_count) == ("month", 1)
        product = await sdk.v1.products.retrieve_async(str(price.product))
        assert (product.name, product.active) == ("Pro", True)

        archived = await sdk.v1.prices.update_async(price.id, {"active": False, "metadata": {"tokens": ""}})
        assert (archived.active, archived.metadata.to_dict()) == (False, {})
        renamed = await sdk.v1.products.update_async(product.id, {"name": "Pro plan", "active": False})
        assert (renamed.name, renamed.active) == ("Pro plan", False)
        [updated] = await billing.world.simulator.events("price.updated")
        assert updated["data"]["previous_attributes"] == {"active": True, "metadata": {"tokens": "1000"}}

        yearly = await billing.price(15000, interval="year", name="Pro yearly")
        by_key = await sdk.v1.prices.list_async({"lookup_keys": ["pro-monthly"]})
        assert [p.id for p in by_key.data] == [price.id]
        active = await sdk.v1.prices.list_async({"active": True, "type": "recurring"})
        assert [p.id for p in active.data] == [yearly.id]
        assert (await sdk.v1.prices.retrieve_async(yearly.id)).recurring.interval == "year"

    async def test_bad_input_is_a_typed_error_and_writes_nothing(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        product = await sdk.v1.products.create_async({"name": "Pro"})
        before = await event_types(billing.world)
        for params in (
            {
                "product": product.id,
                "unit_amount": 1000,
                "currency": "usd",
                "recurring": {"interval": "fortnight"},
            },
            {
                "product": product.id,
                "unit_amount": 1000,
                "currency": "usd",
                "recurring": {"interval": "year", "interval_count": 4},
            },
            {"product": "prod_nope", "unit_amount": 1000, "currency": "usd"},
            {"product": product.id, "currency": "usd"},
        ):
            with pytest.raises(stripe.InvalidRequestError) as refused:
                await sdk.v1.prices.create_async(params)
            assert refused.value.http_status == 400 and refused.value.param
        assert await event_types(billing.world) == before
        assert (await sdk.v1.prices.list_async({"product": product.id})).data == []

    async def test_lookup_keys_are_unique_unless_transferred(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        first = await billing.price(1000, lookup_key="pro")
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await billing.price(2000, lookup_key="pro")
        assert refused.value.param == "lookup_key"
        second = await billing.price(2000, lookup_key="pro", transfer_lookup_key=True)
        assert (await sdk.v1.prices.retrieve_async(first.id)).lookup_key is None
        assert [p.id for p in (await sdk.v1.prices.list_async({"lookup_keys": ["pro"]})).data] == [second.id]

    async def test_idempotency_keys_on_create_calls(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        product = await sdk.v1.products.create_async({"name": "Pro"}, {"idempotency_key": "prod-1"})
        again = await sdk.v1.products.create_async({"name": "Pro"}, {"idempotency_key": "prod-1"})
        assert again.id == product.id
        assert (
            again.last_response is not None and again.last_response.headers["Idempotent-Replayed"] == "true"
        )
        with pytest.raises(stripe.IdempotencyError):
            await sdk.v1.products.create_async({"name": "Other"}, {"idempotency_key": "prod-1"})

        price_params: dict[str, Any] = {
            "product": product.id,
            "unit_amount": 1000,
            "currency": "usd",
            "recurring": {"interval": "month"},
        }
        price = await sdk.v1.prices.create_async(price_params, {"idempotency_key": "price-1"})
        assert (await sdk.v1.prices.create_async(price_params, {"idempotency_key": "price-1"})).id == price.id

        clock = await sdk.v1.test_helpers.test_clocks.create_async(
            {"frozen_time": START}, {"idempotency_key": "clk-1"}
        )
        same_clock = await sdk.v1.test_helpers.test_clocks.create_async(
            {"frozen_time": START}, {"idempotency_key": "clk-1"}
        )
        assert same_clock.id == clock.id
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await sdk.v1.subscriptions.create_async(
            {"customer": customer, "items": [{"price": price.id}]}, {"idempotency_key": "sub-1"}
        )
        replayed = await sdk.v1.subscriptions.create_async(
            {"customer": customer, "items": [{"price": price.id}]}, {"idempotency_key": "sub-1"}
        )
        assert replayed.id == subscription.id
        assert [s.id for s in (await sdk.v1.subscriptions.list_async({"customer": customer})).data] == [
            subscription.id
        ]
        assert len(await billing.world.simulator.events("customer.subscription.created")) == 1
        assert len(await billing.world.simulator.events("test_helpers.test_clock.created")) == 1


class TestSubscriptionCheckout:
    async def test_subscribe_on_the_hosted_page(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        price = await billing.price(1000)
        clock = await billing.clock()
        customer_id = await billing.customer(clock.id)
        session = await billing.checkout(customer_id, price.id)
        assert (session.mode, session.status, session.amount_total, session.subscription) == (
            "subscription",
            "open",
            1000,
            None,
        )
        assert session.url is not None
        page = await billing.world.browser.get(session.url)
        assert page.status_code == 200
        for text in ("Subscribe to Pro", "$10.00", "per month", "Acme", "4242 4242 4242 4242", "TEST MODE"):
            assert text in page.text, text
        before = len(await billing.world.simulator.events())

        paid = await billing.press(session.url, GOOD_CARD)
        assert (paid.status_code, paid.headers["location"]) == (
            303,
            SUCCESS_URL.replace("{CHECKOUT_SESSION_ID}", session.id),
        )
        session = await sdk.v1.checkout.sessions.retrieve_async(session.id)
        assert (session.status, session.payment_status) == ("complete", "paid")
        assert isinstance(session.subscription, str) and isinstance(session.invoice, str)
        subscription = await billing.subscription(session.subscription)
        assert (subscription.status, subscription.customer, subscription.test_clock) == (
            "active",
            customer_id,
            clock.id,
        )
        assert subscription.metadata.to_dict() == {"organization_id": "org-1", "plan": "pro"}
        assert period(subscription) == (START, month(1))
        assert subscription["items"].data[0].price.id == price.id
        assert subscription.latest_invoice == session.invoice
        invoice = await sdk.v1.invoices.retrieve_async(session.invoice)
        assert (invoice.status, invoice.billing_reason, invoice.amount_due, invoice.amount_paid) == (
            "paid",
            "subscription_create",
            1000,
            1000,
        )
        assert invoice.status_transitions.paid_at == START and invoice.attempt_count == 1
        assert subscription_of(invoice) == subscription.id
        [line] = invoice.lines.data
        assert (line.period.start, line.period.end, line.amount) == (START, month(1), 1000)

        await in_order(
            await event_types(billing.world, before),
            "customer.subscription.created",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
            "invoice.payment_succeeded",
            "customer.subscription.updated",
            "checkout.session.completed",
        )
        [created] = await billing.world.delivered("customer.subscription.created")
        assert created.data.object["status"] == "incomplete"
        [activated] = await billing.world.delivered("customer.subscription.updated")
        assert (activated.data.object["status"], activated.data.previous_attributes["status"]) == (
            "active",
            "incomplete",
        )
        [completed] = await billing.world.delivered("checkout.session.completed")
        assert completed.data.object["subscription"] == subscription.id
        assert completed.data.object["metadata"].to_dict() == {"organization_id": "org-1"}

        done = await billing.world.browser.get(f"{API_BASE}/done/{session.id}")
        assert done.status_code == 200 and "Subscribed" in done.text and "$10.00" in done.text

    async def test_a_declined_card_makes_nothing_and_a_retry_subscribes(self, billing: Billing) -> None:
        price = await billing.price(1000)
        customer_id = await billing.customer((await billing.clock()).id)
        session = await billing.checkout(customer_id, price.id)
        assert session.url is not None
        for card in (DECLINED, DECLINES_LATER):
            refused = await billing.press(session.url, card)
            assert refused.status_code == 402 and "Your card was declined." in refused.text
        listed = await billing.sdk.v1.subscriptions.list_async({"customer": customer_id, "status": "all"})
        assert listed.data == []
        assert await billing.world.simulator.events("invoice.created") == []

        assert (await billing.press(session.url, GOOD_CARD)).status_code == 303
        [subscription] = (await billing.sdk.v1.subscriptions.list_async({"customer": customer_id})).data
        assert subscription.status == "active"


class TestRenewalsOnATestClock:
    async def test_three_renewals_each_paid_with_a_reminder_before(self, billing: Billing) -> None:
        price = await billing.price(1000)
        clock = await billing.clock()
        customer_id = await billing.customer(clock.id)
        session = await billing.checkout(customer_id, price.id)
        assert session.url is not None
        await billing.press(session.url, GOOD_CARD)
        [subscription] = (await billing.sdk.v1.subscriptions.list_async({"customer": customer_id})).data

        # Stripe's limit: at most two intervals of the shortest subscription in one advance.
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await billing.sdk.v1.test_helpers.test_clocks.advance_async(
                clock.id, {"frozen_time": month(2) + 1}
            )
        assert refused.value.param == "frozen_time"
        await billing.advance(clock.id, month(2))  # two renewals in one advance
        await billing.advance(clock.id, month(3) + 2 * HOUR)

        invoices = await billing.invoices(subscription.id)
        assert [i.billing_reason for i in invoices] == ["subscription_create"] + ["subscription_cycle"] * 3
        assert all(i.status == "paid" and i.amount_paid == 1000 for i in invoices)
        lines = [i.lines.data[0].period for i in invoices]
        assert [(p.start, p.end) for p in lines] == [(month(n), month(n + 1)) for n in range(4)]
        for renewal, n in zip(invoices[1:], range(1, 4), strict=True):
            # Stripe's invoice period looks back one period; created at the renewal, paid an hour on.
            assert (renewal.period_start, renewal.period_end, renewal.created) == (
                month(n - 1),
                month(n),
                month(n),
            )
            assert renewal.status_transitions.paid_at == month(n) + HOUR
            assert renewal.number is not None and renewal.hosted_invoice_url is not None
        assert period(await billing.subscription(subscription.id)) == (month(3), month(4))

        events = await billing.world.simulator.events()
        reminders = [e for e in events if e["type"] == "invoice.upcoming"]
        assert [e["created"] for e in reminders] == [month(n) - 3 * DAY for n in range(1, 4)]
        assert all("id" not in e["data"]["object"] for e in reminders)
        assert [
            (e["data"]["object"]["amount_due"], e["data"]["object"]["next_payment_attempt"])
            for e in reminders
        ] == [(1000, month(n) + HOUR) for n in range(1, 4)]
        types = [e["type"] for e in events]
        for _ in range(3):  # each reminder before its renewal's events
            after_reminder = types[types.index("invoice.upcoming") :]
            await in_order(
                after_reminder,
                "invoice.upcoming",
                "customer.subscription.updated",
                "invoice.created",
                "invoice.finalized",
                "invoice.paid",
            )
            types = after_reminder[after_reminder.index("invoice.paid") + 1 :]
        assert types.count("invoice.upcoming") == 0
        paid = await billing.world.delivered("invoice.paid")
        assert [e.data.object["billing_reason"] for e in paid] == ["subscription_create"] + [
            "subscription_cycle"
        ] * 3
        advancing = await billing.world.simulator.events("test_helpers.test_clock.ready")
        assert [e["data"]["object"]["frozen_time"] for e in advancing] == [month(2), month(3) + 2 * HOUR]

    async def test_the_reminder_day_is_a_setting(self, database_url: str) -> None:
        async with world_on(database_url, upcoming_invoice_days=7) as (world, sdk):
            billing = Billing(world, sdk)
            clock = await billing.clock()
            customer = await billing.customer(clock.id, card=GOOD_CARD)
            await billing.subscribe(customer, (await billing.price()).id)
            await billing.advance(clock.id, month(1) - 7 * DAY + 1)
            [reminder] = await world.simulator.events("invoice.upcoming")
            assert reminder["created"] == month(1) - 7 * DAY
            await billing.advance(clock.id, month(1) - 1)
            assert len(await world.simulator.events("invoice.upcoming")) == 1


class TestPlanChanges:
    async def test_upgrade_now_with_a_prorated_invoice_then_downgrade_at_the_renewal(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        basic, pro = await billing.price(1000, name="Basic"), await billing.price(3000, name="Pro")
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, basic.id)
        assert subscription.status == "active"
        changed_at = START + 10 * DAY + 5 * HOUR
        await billing.advance(clock.id, changed_at)

        item = subscription["items"].data[0]
        upgraded = await sdk.v1.subscriptions.update_async(
            subscription.id,
            {"items": [{"id": item.id, "price": pro.id}], "proration_behavior": "always_invoice"},
        )
        assert upgraded["items"].data[0].price.id == pro.id and upgraded.status == "active"
        assert period(upgraded) == (START, month(1))  # same interval: the period goes on
        invoice = await sdk.v1.invoices.retrieve_async(str(upgraded.latest_invoice))
        # Stripe's proration is by the second: each item's amount x (end - t) / (end - start).
        remaining, whole = month(1) - changed_at, month(1) - START
        credit = stripe_rounded(Fraction(-1000 * remaining, whole))
        charge = stripe_rounded(Fraction(3000 * remaining, whole))
        assert [line.amount for line in invoice.lines.data] == [credit, charge]
        assert (invoice.billing_reason, invoice.status, invoice.amount_paid) == (
            "subscription_update",
            "paid",
            credit + charge,
        )
        assert all(line.parent.subscription_item_details.proration for line in invoice.lines.data)
        assert [(line.period.start, line.period.end) for line in invoice.lines.data] == [
            (changed_at, month(1))
        ] * 2
        [update] = [
            e
            for e in await billing.world.delivered("customer.subscription.updated")
            if "items" in e.data.previous_attributes
        ]
        assert update.data.previous_attributes["items"]["data"][0]["price"]["id"] == basic.id

        downgraded = await sdk.v1.subscriptions.update_async(
            subscription.id, {"items": [{"id": item.id, "price": basic.id}], "proration_behavior": "none"}
        )
        assert downgraded.latest_invoice == invoice.id  # nothing billed now
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        renewal = (await billing.invoices(subscription.id))[-1]
        assert (renewal.billing_reason, renewal.amount_paid) == ("subscription_cycle", 1000)
        assert [line.amount for line in renewal.lines.data] == [1000]

    async def test_create_prorations_wait_for_the_renewal(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        basic, pro = await billing.price(1000, name="Basic"), await billing.price(3000, name="Pro")
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, basic.id)
        half = START + (month(1) - START) // 2
        await billing.advance(clock.id, half)
        item = subscription["items"].data[0]
        preview = await sdk.v1.invoices.create_preview_async(
            {
                "subscription": subscription.id,
                "subscription_details": {"items": [{"id": item.id, "price": pro.id}]},
            }
        )
        assert [line.amount for line in preview.lines.data] == [-500, 1500, 3000]
        assert (
            preview.amount_due == 4000
            and preview.parent.subscription_details.subscription_proration_date == half
        )

        await sdk.v1.subscriptions.update_async(
            subscription.id, {"items": [{"id": item.id, "price": pro.id}]}
        )
        assert len(await billing.invoices(subscription.id)) == 1  # nothing billed yet
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        renewal = (await billing.invoices(subscription.id))[-1]
        assert [line.amount for line in renewal.lines.data] == [-500, 1500, 3000]
        assert (renewal.amount_paid, renewal.billing_reason) == (4000, "subscription_cycle")

    async def test_bad_changes_are_refused_and_change_nothing(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        basic = await billing.price(1000, name="Basic")
        other_currency = await billing.sdk.v1.prices.create_async(
            {
                "product": str(basic.product),
                "unit_amount": 900,
                "currency": "eur",
                "recurring": {"interval": "month"},
            }
        )
        archived = await billing.price(5000, name="Old")
        await sdk.v1.prices.update_async(archived.id, {"active": False})
        customer = await billing.customer((await billing.clock()).id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, basic.id)
        item = subscription["items"].data[0]
        before = len(await billing.world.simulator.events())
        for params in (
            {"items": [{"id": item.id, "price": archived.id}]},
            {"items": [{"id": item.id, "price": other_currency.id}]},
            {"items": [{"id": "si_nope", "price": basic.id}]},
            {"items": [{"id": item.id, "price": basic.id}], "proration_behavior": "sometimes"},
            {"pause_collection": {"behavior": "forever"}},
            {"metadata": {"a": "b"}, "default_payment_method": "pm_nope"},
        ):
            with pytest.raises(stripe.InvalidRequestError):
                await sdk.v1.subscriptions.update_async(subscription.id, params)
        assert len(await billing.world.simulator.events()) == before
        assert (await billing.subscription(subscription.id)).to_dict() == subscription.to_dict()


class TestFailedRenewals:
    async def failing_renewal(self, billing: Billing) -> tuple[str, stripe.Subscription, stripe.Invoice]:
        """A subscription paid by a good card, whose customer's card then declines; the clock an
        hour past the first renewal (its charge failed). (clock, subscription, open invoice)."""
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        assert subscription.status == "active" and subscription.default_payment_method is None
        await billing.default_card(customer, DECLINES_LATER)
        await billing.advance(clock.id, month(1) + HOUR)
        invoice = (await billing.invoices(subscription.id))[-1]
        return clock.id, await billing.subscription(subscription.id), invoice

    async def test_past_due_retried_on_schedule_then_paid_with_a_new_card(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock, subscription, invoice = await self.failing_renewal(billing)
        assert subscription.status == "past_due"
        assert (invoice.status, invoice.billing_reason, invoice.attempt_count) == (
            "open",
            "subscription_cycle",
            1,
        )
        assert invoice.next_payment_attempt == month(1) + HOUR + 3 * DAY
        [failed] = await billing.world.delivered("invoice.payment_failed")
        assert failed.data.object["id"] == invoice.id
        [past_due] = [
            e
            for e in await billing.world.delivered("customer.subscription.updated")
            if e.data.object["status"] == "past_due"
        ]
        assert past_due.data.previous_attributes["status"] == "active"

        await billing.advance(clock, month(1) + HOUR + 3 * DAY)
        invoice = await sdk.v1.invoices.retrieve_async(invoice.id)
        assert (invoice.status, invoice.attempt_count) == ("open", 2)
        assert invoice.next_payment_attempt == month(1) + HOUR + 8 * DAY
        assert len(await billing.world.simulator.events("invoice.payment_failed")) == 2

        customer = str(subscription.customer)
        with pytest.raises(stripe.CardError):  # paying now with the same card fails too (it counts)
            await sdk.v1.invoices.pay_async(invoice.id)
        good = await billing.default_card(customer, GOOD_CARD)
        paid = await sdk.v1.invoices.pay_async(invoice.id)
        assert (paid.status, paid.amount_paid, paid.attempt_count, paid.next_payment_attempt) == (
            "paid",
            1000,
            4,
            None,
        )
        assert paid.status_transitions.paid_at == month(1) + HOUR + 3 * DAY
        recovered = await billing.subscription(subscription.id)
        assert recovered.status == "active"
        updates = await billing.world.delivered("customer.subscription.updated")
        assert (updates[-1].data.object["status"], updates[-1].data.previous_attributes["status"]) == (
            "active",
            "past_due",
        )
        intent = (await sdk.v1.invoices.retrieve_async(invoice.id, {"expand": ["payments"]})).payments.data[0]
        charged = await sdk.v1.payment_intents.retrieve_async(str(intent.payment.payment_intent))
        assert (charged.status, charged.payment_method) == ("succeeded", good)
        # The next renewal is charged to the new card.
        await billing.advance(clock, month(2) + HOUR)
        assert (await billing.invoices(subscription.id))[-1].status == "paid"

    async def test_out_of_retries_the_subscription_is_canceled(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock, subscription, invoice = await self.failing_renewal(billing)
        first_failure = month(1) + HOUR
        attempts = [first_failure + 3 * DAY, first_failure + 8 * DAY, first_failure + 15 * DAY]
        for n, at in enumerate(attempts, start=2):
            await billing.advance(clock, at)
            invoice = await sdk.v1.invoices.retrieve_async(invoice.id)
            assert invoice.attempt_count == n
        assert (invoice.status, invoice.next_payment_attempt) == ("uncollectible", None)
        assert invoice.status_transitions.marked_uncollectible_at == attempts[-1]
        ended = await billing.subscription(subscription.id)
        assert (ended.status, ended.ended_at) == ("canceled", attempts[-1])
        assert (
            ended.cancellation_details is not None and ended.cancellation_details.reason == "payment_failed"
        )
        [deleted] = await billing.world.delivered("customer.subscription.deleted")
        assert deleted.data.object["id"] == subscription.id
        assert len(await billing.world.simulator.events("invoice.payment_failed")) == 4
        assert await billing.world.simulator.events("invoice.marked_uncollectible")
        # Nothing more happens to it.
        await billing.advance(clock, month(2) + 2 * HOUR)
        assert len(await billing.invoices(subscription.id)) == 2

    async def test_the_portal_like_control_switches_the_subscriptions_card(self, billing: Billing) -> None:
        """A subscription started in Checkout has its own default card: the test control changes
        it as Stripe's billing portal would, for the customer and its subscriptions."""
        price = await billing.price(1000)
        clock = await billing.clock()
        customer = await billing.customer(clock.id)
        session = await billing.checkout(customer, price.id)
        assert session.url is not None
        await billing.press(session.url, GOOD_CARD)
        switched = await billing.world.browser.post(
            f"{API_BASE}/test/customers/{customer}/default_payment_method",
            json={"card_number": DECLINES_LATER},
            headers=KEYED,
        )
        assert switched.status_code == 200, switched.text
        [subscription] = (await billing.sdk.v1.subscriptions.list_async({"customer": customer})).data
        assert subscription.default_payment_method == switched.json()["id"]
        await billing.advance(clock.id, month(1) + HOUR)
        assert (await billing.subscription(subscription.id)).status == "past_due"


class TestHostedInvoicePage:
    async def test_opens_without_the_key_and_pays_an_open_invoice(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await billing.default_card(customer, DECLINES_LATER)
        await billing.advance(clock.id, month(1) + HOUR)
        invoice = (await billing.invoices(subscription.id))[-1]
        assert invoice.status == "open" and invoice.hosted_invoice_url is not None
        assert invoice.hosted_invoice_url.startswith(API_BASE)

        page = await billing.world.browser.get(invoice.hosted_invoice_url)
        assert page.status_code == 200
        for text in (
            "$10.00",
            str(invoice.number),
            "Due now",
            "1 failed attempt",
            "value='pay'",
            "4242 4242 4242 4242",
        ):
            assert text in page.text, text
        declined = await billing.press(invoice.hosted_invoice_url, DECLINED)
        assert declined.status_code == 402 and "Your card was declined." in declined.text
        assert (await sdk.v1.invoices.retrieve_async(invoice.id)).attempt_count == 2

        paid = await billing.press(invoice.hosted_invoice_url, GOOD_CARD)
        assert (paid.status_code, paid.headers["location"]) == (303, invoice.hosted_invoice_url)
        invoice = await sdk.v1.invoices.retrieve_async(invoice.id)
        assert (invoice.status, invoice.amount_paid) == ("paid", 1000)
        assert (await billing.subscription(subscription.id)).status == "active"
        shown = await billing.world.browser.get(invoice.hosted_invoice_url)
        assert "Paid" in shown.text and "value='pay'" not in shown.text
        again = await billing.press(invoice.hosted_invoice_url, GOOD_CARD)
        assert again.status_code == 409
        assert (await sdk.v1.invoices.retrieve_async(invoice.id)).attempt_count == 3

    async def test_a_draft_or_unknown_invoice_has_no_page(self, billing: Billing) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await billing.advance(clock.id, month(1))  # the renewal's draft, not finalized yet
        draft = (await billing.invoices(subscription.id))[-1]
        assert (draft.status, draft.hosted_invoice_url, draft.automatically_finalizes_at) == (
            "draft",
            None,
            month(1) + HOUR,
        )
        for invoice_id in (draft.id, "in_nope", subscription.id):
            page = await billing.world.browser.get(f"{API_BASE}/invoices/{invoice_id}")
            assert page.status_code == 404
        api = await billing.world.browser.get(f"{API_BASE}/v1/invoices/{draft.id}")
        assert api.status_code == 401


class TestPauseAndCancel:
    async def test_pause_collection_voids_renewals_until_resumed(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        paused = await sdk.v1.subscriptions.update_async(
            subscription.id, {"pause_collection": {"behavior": "void"}}
        )
        assert paused.pause_collection is not None and paused.pause_collection.behavior == "void"
        assert paused.status == "active"
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        voided = (await billing.invoices(subscription.id))[-1]
        assert (voided.billing_reason, voided.status, voided.amount_paid) == ("subscription_cycle", "void", 0)
        assert await billing.world.simulator.events("invoice.voided")

        resumed = await sdk.v1.subscriptions.update_async(subscription.id, {"pause_collection": ""})
        assert resumed.pause_collection is None
        [update] = (await billing.world.delivered("customer.subscription.updated"))[-1:]
        assert update.data.previous_attributes["pause_collection"]["behavior"] == "void"
        await billing.advance(clock.id, month(2) + 2 * HOUR)
        renewal = (await billing.invoices(subscription.id))[-1]
        assert (renewal.status, renewal.amount_paid) == ("paid", 1000)

    async def test_keep_as_draft_and_resumes_at(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await sdk.v1.subscriptions.update_async(
            subscription.id, {"pause_collection": {"behavior": "keep_as_draft", "resumes_at": month(1) + DAY}}
        )
        await billing.advance(clock.id, month(1) + 2 * DAY)
        kept = (await billing.invoices(subscription.id))[-1]
        assert (kept.status, kept.auto_advance) == ("draft", False)
        assert (await billing.subscription(subscription.id)).pause_collection is None
        finalized = await sdk.v1.invoices.finalize_invoice_async(kept.id)  # auto_advance off: not charged
        assert (finalized.status, finalized.amount_due, finalized.attempt_count) == ("open", 1000, 0)
        assert (await sdk.v1.invoices.pay_async(kept.id)).status == "paid"

    async def test_cancel_at_period_end(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await billing.advance(clock.id, START + 5 * DAY)
        ending = await sdk.v1.subscriptions.update_async(subscription.id, {"cancel_at_period_end": True})
        assert (ending.status, ending.cancel_at_period_end, ending.cancel_at, ending.canceled_at) == (
            "active",
            True,
            month(1),
            START + 5 * DAY,
        )
        await billing.advance(clock.id, month(1) - 1)
        assert (await billing.subscription(subscription.id)).status == "active"
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        ended = await billing.subscription(subscription.id)
        assert (ended.status, ended.ended_at) == ("canceled", month(1))
        [deleted] = await billing.world.delivered("customer.subscription.deleted")
        assert deleted.data.object["status"] == "canceled"
        assert len(await billing.invoices(subscription.id)) == 1  # no renewal
        assert await billing.world.simulator.events("invoice.upcoming") == []  # nothing to remind of

    async def test_cancel_at_period_end_can_be_undone(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await sdk.v1.subscriptions.update_async(subscription.id, {"cancel_at_period_end": True})
        kept = await sdk.v1.subscriptions.update_async(subscription.id, {"cancel_at_period_end": False})
        assert (kept.cancel_at_period_end, kept.cancel_at, kept.canceled_at) == (False, None, None)
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        assert (await billing.subscription(subscription.id)).status == "active"
        assert len(await billing.invoices(subscription.id)) == 2

    async def test_cancel_now(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
        await billing.advance(clock.id, START + 3 * DAY)
        canceled = await sdk.v1.subscriptions.cancel_async(
            subscription.id, {"cancellation_details": {"comment": "too pricey", "feedback": "too_expensive"}}
        )
        assert (canceled.status, canceled.canceled_at, canceled.ended_at) == (
            "canceled",
            START + 3 * DAY,
            START + 3 * DAY,
        )
        assert canceled.cancellation_details is not None
        assert (canceled.cancellation_details.reason, canceled.cancellation_details.feedback) == (
            "cancellation_requested",
            "too_expensive",
        )
        assert await billing.world.delivered("customer.subscription.deleted")
        with pytest.raises(stripe.InvalidRequestError):
            await sdk.v1.subscriptions.cancel_async(subscription.id)
        with pytest.raises(stripe.InvalidRequestError):
            await sdk.v1.subscriptions.update_async(subscription.id, {"cancel_at_period_end": True})
        assert (await sdk.v1.subscriptions.list_async({"customer": customer})).data == []
        listed = await sdk.v1.subscriptions.list_async({"customer": customer, "status": "canceled"})
        assert [s.id for s in listed.data] == [subscription.id]
        await billing.advance(clock.id, month(1) + 2 * HOUR)
        assert len(await billing.invoices(subscription.id)) == 1

    async def test_cancel_now_with_a_prorated_credit(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price(3100)).id)
        await billing.advance(clock.id, START + 21 * DAY)  # 10 of the 31 days left
        await sdk.v1.subscriptions.cancel_async(subscription.id, {"prorate": True, "invoice_now": True})
        final = (await billing.invoices(subscription.id))[-1]
        assert (final.total, final.amount_due, final.status) == (-1000, 0, "paid")
        assert (await sdk.v1.customers.retrieve_async(customer)).balance == -1000


class TestSubscriptionsCreate:
    async def test_a_declining_card_leaves_it_incomplete_then_expired(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=DECLINES_LATER)
        price = await billing.price(1000)
        with pytest.raises(stripe.CardError):
            await billing.subscribe(customer, price.id, payment_behavior="error_if_incomplete")
        assert (await sdk.v1.subscriptions.list_async({"customer": customer, "status": "all"})).data == []

        subscription = await billing.subscribe(customer, price.id)
        assert subscription.status == "incomplete"
        [invoice] = await billing.invoices(subscription.id)
        assert (invoice.status, invoice.attempt_count, invoice.next_payment_attempt) == ("open", 1, None)
        await billing.advance(clock.id, START + 23 * HOUR + 1)
        expired = await billing.subscription(subscription.id)
        assert (expired.status, expired.ended_at) == ("incomplete_expired", START + 23 * HOUR)
        assert (await sdk.v1.invoices.retrieve_async(invoice.id)).status == "void"

    async def test_an_incomplete_subscription_paid_is_active(
        self, billing: Billing, sdk: stripe.StripeClient
    ) -> None:
        customer = await billing.customer((await billing.clock()).id, card=GOOD_CARD)
        subscription = await billing.subscribe(
            customer, (await billing.price(1000)).id, payment_behavior="default_incomplete"
        )
        assert subscription.status == "incomplete"
        invoice = await sdk.v1.invoices.retrieve_async(str(subscription.latest_invoice))
        assert (invoice.status, invoice.attempt_count) == ("open", 0)
        await sdk.v1.invoices.pay_async(invoice.id)
        assert (await billing.subscription(subscription.id)).status == "active"

    async def test_refused_without_anything_written(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        customer = await billing.customer(None, card=GOOD_CARD)
        one_time = await sdk.v1.prices.create_async(
            {"product": str((await billing.price()).product), "unit_amount": 500, "currency": "usd"}
        )
        yearly = await billing.price(9000, interval="year")
        monthly = await billing.price(1000)
        before = len(await billing.world.simulator.events())
        for params in (
            {"customer": customer, "items": [{"price": one_time.id}]},
            {"customer": customer, "items": [{"price": monthly.id}, {"price": yearly.id}]},
            {"customer": customer, "items": [{"price": monthly.id, "quantity": 0}]},
            {"customer": customer, "items": [{"price": monthly.id}], "trial_period_days": 7},
            {
                "customer": customer,
                "items": [{"price": monthly.id}],
                "payment_behavior": "pending_if_incomplete",
            },
            {"customer": "cus_nope", "items": [{"price": monthly.id}]},
            {"customer": customer},
        ):
            with pytest.raises(stripe.InvalidRequestError) as refused:
                await sdk.v1.subscriptions.create_async(params)
            assert refused.value.http_status == 400
        assert len(await billing.world.simulator.events()) == before


class TestTestClocks:
    async def test_list_and_delete(self, billing: Billing, sdk: stripe.StripeClient) -> None:
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, (await billing.price()).id)
        assert [c.id for c in (await sdk.v1.test_helpers.test_clocks.list_async()).data] == [clock.id]
        deleted = await sdk.v1.test_helpers.test_clocks.delete_async(clock.id)
        assert deleted.deleted is True
        with pytest.raises(stripe.InvalidRequestError):
            await sdk.v1.test_helpers.test_clocks.retrieve_async(clock.id)
        with pytest.raises(stripe.InvalidRequestError):
            await sdk.v1.customers.retrieve_async(customer)
        assert (await billing.subscription(subscription.id)).status == "canceled"
        assert await billing.world.simulator.events("test_helpers.test_clock.deleted")

    async def test_a_customer_on_an_unknown_clock_is_refused(self, sdk: stripe.StripeClient) -> None:
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await sdk.v1.customers.create_async({"name": "Acme", "test_clock": "clock_nope"})
        assert refused.value.param == "test_clock"


class TestTheSimulatorsOwnClock:
    async def test_a_subscription_on_no_test_clock_renews_when_its_time_comes(
        self, database_url: str
    ) -> None:
        """Without a test clock an object lives in the simulator's ``clock``: what came due is
        done (each at its instant) when the next request arrives."""
        now = [float(START)]
        async with world_on(database_url, clock=lambda: now[0]) as (world, sdk):
            billing = Billing(world, sdk)
            customer = await billing.customer(None, card=GOOD_CARD)
            subscription = await billing.subscribe(customer, (await billing.price(1000)).id)
            assert period(subscription) == (START, month(1))
            now[0] = month(2) + 2 * HOUR
            assert period(await billing.subscription(subscription.id)) == (month(2), month(3))
            invoices = await billing.invoices(subscription.id)
            assert [(i.billing_reason, i.status, i.status_transitions.paid_at) for i in invoices] == [
                ("subscription_create", "paid", START),
                ("subscription_cycle", "paid", month(1) + HOUR),
                ("subscription_cycle", "paid", month(2) + HOUR),
            ]
            reminders = await world.simulator.events("invoice.upcoming")
            assert [e["created"] for e in reminders] == [month(1) - 3 * DAY, month(2) - 3 * DAY]


async def test_a_restart_keeps_products_prices_subscriptions_invoices_and_clocks(database_url: str) -> None:
    async with world_on(database_url) as (world, sdk):
        billing = Billing(world, sdk)
        price = await billing.price(1000)
        clock = await billing.clock()
        customer = await billing.customer(clock.id, card=GOOD_CARD)
        subscription = await billing.subscribe(customer, price.id)
        await billing.default_card(customer, DECLINES_LATER)
        await billing.advance(clock.id, month(1) + HOUR)
        [_, failing] = await billing.invoices(subscription.id)
        assert failing.status == "open"

    async with world_on(database_url) as (world, sdk):  # a new process on the same database
        billing = Billing(world, sdk)
        assert (await sdk.v1.prices.retrieve_async(price.id)).unit_amount == 1000
        assert (await sdk.v1.products.retrieve_async(str(price.product))).name == "Pro"
        assert (await sdk.v1.test_helpers.test_clocks.retrieve_async(clock.id)).frozen_time == month(1) + HOUR
        assert (await billing.subscription(subscription.id)).status == "past_due"
        reloaded = await sdk.v1.invoices.retrieve_async(failing.id)
        assert (reloaded.attempt_count, reloaded.next_payment_attempt) == (1, month(1) + HOUR + 3 * DAY)
        # The retry schedule and the reminders go on from where they were.
        await billing.default_card(customer, GOOD_CARD)
        await billing.advance(clock.id, month(1) + HOUR + 3 * DAY)
        assert (await sdk.v1.invoices.retrieve_async(failing.id)).status == "paid"
        assert (await billing.subscription(subscription.id)).status == "active"
        await billing.advance(clock.id, month(2) - 3 * DAY)
        reminders = await world.simulator.events("invoice.upcoming")
        assert [e["created"] for e in reminders] == [month(1) - 3 * DAY, month(2) - 3 * DAY]
        assert (await world.delivered("invoice.paid"))[-1].data.object["id"] == failing.id


@asynccontextmanager
async def world_on(
    database_url: str, *, clock: Callable[[], float] | None = None, **settings: Any
) -> AsyncIterator[tuple[StripeWorld, stripe.StripeClient]]:
    """A simulator on ``database_url`` with its own settings (a process of its own), and the
    SDK on it."""
    if clock is not None:
        settings["clock"] = clock
    async with simulated_stripe(database_url, **settings) as world:
        http_client = TransportHTTPClient(world.transport)
        try:
            yield world, _client(http_client)
            await world.simulator.drain()
        finally:
            await http_client.close_async()
