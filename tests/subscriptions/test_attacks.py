"""Adversarial tests of subscriptions: concurrency, webhook order, money invariants, other
organizations and bad input. Every scenario ends with the ledger sound (no violations).

The money invariant checked throughout: the tokens a subscription grants are exactly what its
paid invoices allow (a period's allowance per create/cycle invoice, and for an upgrade
``round((new - old) x time left / period)`` of the period the change was made in), granted once
per invoice, whatever arrives twice, concurrently or out of order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from strawberry.relay import GlobalID

from tests.helpers import row_counts
from tests.subscriptions.harness import (
    CANCEL,
    CHANGE_PLAN,
    DAY,
    DECLINES_LATER,
    GOOD_CARD,
    HOUR,
    NODE,
    PAUSE,
    RESUME,
    STAFF,
    START,
    UPDATE_PLAN,
    Subscriber,
    month,
    prorated_tokens,
)

GRACE = 7 * DAY


# ---------------------------------------------------------------- helpers


def session_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def typename(result: dict[str, Any]) -> str:
    return str(result["__typename"])


async def subscription_rows(s: Subscriber) -> list[Any]:
    return await s.sql(
        "SELECT id, status, plan_id, scheduled_plan_id, checkout_session_id, stripe_subscription_id,"
        " cancel_at_period_end, current_period_start, current_period_end"
        " FROM subscriptions WHERE organization_id = :org ORDER BY created_at, id",
        org=s.shop.org_id,
    )


async def everything(s: Subscriber) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    return {
        "counts": await row_counts(s.shop.app),
        "subscriptions": await s.sql("SELECT * FROM subscriptions ORDER BY id"),
        "invoices": await s.sql("SELECT * FROM subscription_invoices ORDER BY id"),
        "entries": await s.sql("SELECT id FROM ledger_entries ORDER BY id"),
        "events": len(await s.shop.simulator.events()),
    }


async def failed_events(s: Subscriber) -> list[Any]:
    return [row for row in await s.shop.stripe_events() if row.error is not None]


async def sound(s: Subscriber) -> None:
    assert await failed_events(s) == []
    assert await s.shop.violations() == {}


async def deliver_held(
    s: Subscriber, order: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> list[str]:
    """Delivers what was held since ``hold`` in the order ``order`` gives (each once, one after
    another); the types as delivered."""
    events = await s.held()
    s.shop.simulator.enabled_events = None
    s._held_from = None
    ordered = order(events)
    assert sorted(e["id"] for e in ordered) == sorted(e["id"] for e in events)
    for event in ordered:
        await s.shop.simulator.redeliver(event["id"])
        await s.drain()
    await s.sweep()
    return [e["type"] for e in ordered]


def first_of(*types: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Events of ``types`` first (in that order of types, newest of a type first), then the
    rest in reverse order."""

    def order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        front = [e for t in types for e in reversed(events) if e["type"] == t]
        rest = [e for e in reversed(events) if e not in front]
        return front + rest

    return order


async def subscription_invoice_tokens(s: Subscriber) -> list[tuple[str, int, int]]:
    """(billing reason, amount, tokens granted) of the organization's invoices, oldest first."""
    rows = await s.sql(
        """
        SELECT i.billing_reason, i.amount_minor, i.tokens_granted FROM subscription_invoices i
        JOIN subscriptions s ON s.id = i.subscription_id
        WHERE s.organization_id = :org ORDER BY i.period_start, i.created_at
        """,
        org=s.shop.org_id,
    )
    return [(str(r.billing_reason), int(r.amount_minor), int(r.tokens_granted)) for r in rows]


async def plans(s: Subscriber) -> None:
    await s.plan("basic", tokens=1000, price=1000)
    await s.plan("pro", tokens=3000, price=3000)
    await s.plan("team", tokens=5000, price=5000)


# ---------------------------------------------------------------- 1. concurrency


class TestConcurrentSubscribe:
    async def test_ten_concurrent_subscribes_with_one_key_make_one_checkout(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        results = await asyncio.gather(*(s.subscribe("basic", key="same-key") for _ in range(10)))
        kinds = {typename(r) for r in results}
        assert kinds <= {"SubscriptionCheckoutStarted", "Conflict"}, results
        started = [r["checkoutUrl"] for r in results if typename(r) == "SubscriptionCheckoutStarted"]
        assert started, results
        assert len(set(started)) == 1, started
        for r in results:
            if typename(r) == "Conflict":
                assert r["code"] == "SUBSCRIPTION_EXISTS", r
        rows = await subscription_rows(s)
        assert len(rows) == 1 and rows[0].status == "incomplete"
        assert rows[0].checkout_session_id == session_of(started[0])
        # The key again, later: the same page.
        assert await s.checkout_url("basic", key="same-key") == started[0]
        assert (await s.press(started[0], GOOD_CARD)).status_code == 303
        await s.drain()
        assert await s.grants() == [1000]
        await sound(s)

    async def test_ten_concurrent_subscribes_with_other_keys_leave_one_payable_checkout(
        self, subscriber: Subscriber
    ) -> None:
        """Each subscribe that starts over expires the earlier Checkout: however they interleave,
        at most one returned Checkout can still be paid, and it is the live row's."""
        s = subscriber
        await plans(s)
        results = await asyncio.gather(*(s.subscribe("basic", key=f"key-{n}") for n in range(10)))
        assert {typename(r) for r in results} <= {"SubscriptionCheckoutStarted", "Conflict"}, results
        urls = [r["checkoutUrl"] for r in results if typename(r) == "SubscriptionCheckoutStarted"]
        assert urls
        statuses = {}
        for url in urls:
            checkout = await s.sdk.v1.checkout.sessions.retrieve_async(session_of(url))
            statuses[checkout.id] = checkout.status
        live = [r for r in await subscription_rows(s) if r.status != "canceled"]
        open_sessions = sorted(sid for sid, status in statuses.items() if status == "open")
        assert len(live) <= 1
        assert open_sessions == sorted(r.checkout_session_id for r in live), (statuses, live)

    async def test_a_subscribe_started_over_mid_flight_never_hands_out_a_payable_checkout_of_a_canceled_row(
        self, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A's Checkout creation is held at Stripe's door until B (another key, started over) is
        done: the interleaving the concurrent test above may or may not hit."""
        s = subscriber
        await plans(s)
        gateway = s.shop.gateway
        create = gateway.create_subscription_checkout
        b_done = asyncio.Event()
        a_at_stripe = asyncio.Event()
        calls = 0

        async def held_first(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                a_at_stripe.set()
                await b_done.wait()
            return await create(**kwargs)

        monkeypatch.setattr(gateway, "create_subscription_checkout", held_first)
        a = asyncio.create_task(s.subscribe("basic", key="key-a"))
        await asyncio.wait_for(a_at_stripe.wait(), 10)
        b = await s.subscribe("basic", key="key-b")
        b_done.set()
        a_result = await a
        monkeypatch.undo()
        assert typename(b) == "SubscriptionCheckoutStarted", b
        live = [r for r in await subscription_rows(s) if r.status != "canceled"]
        assert [r.checkout_session_id for r in live] == [session_of(b["checkoutUrl"])]
        if typename(a_result) == "SubscriptionCheckoutStarted":
            checkout = await s.sdk.v1.checkout.sessions.retrieve_async(session_of(a_result["checkoutUrl"]))
            [row] = await s.sql(
                "SELECT status FROM subscriptions WHERE checkout_session_id = :c", c=checkout.id
            )
            # A payable Checkout must be of the live (INCOMPLETE) subscription.
            assert (checkout.status, row.status) != ("open", "canceled"), a_result
            assert checkout.status != "open" or row.status == "incomplete"
        # Paying every Checkout handed out: at most one Stripe subscription, the one the app shows.
        for result in (a_result, b):
            if typename(result) == "SubscriptionCheckoutStarted":
                await s.press(result["checkoutUrl"], GOOD_CARD)
        await s.drain()
        listed = await s.sdk.v1.subscriptions.list_async({"customer": s.customer_id, "limit": 10})
        live_in_stripe = [x for x in listed.data if x.status != "canceled"]
        assert len(live_in_stripe) == 1, [(x.id, x.status) for x in listed.data]
        assert (await s.row()).stripe_subscription_id == live_in_stripe[0].id
        assert await s.grants() == [1000]


class TestConcurrentChanges:
    async def test_five_concurrent_identical_upgrades_bill_and_grant_once(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        changed_at = START + 10 * DAY
        await s.advance(changed_at)
        results = await asyncio.gather(*(s.change_plan("pro") for _ in range(5)))
        assert {typename(r) for r in results} <= {"SubscriptionChanged", "InvalidInput", "Conflict"}, results
        assert any(typename(r) == "SubscriptionChanged" for r in results)
        await s.drain()
        tokens = prorated_tokens(1000, 3000, changed_at, START, month(1))
        assert await s.grants() == [1000, tokens]
        assert len(await s.stripe_invoices()) == 2
        sub = await s.subscription()
        assert (sub["plan"]["code"], sub["scheduledPlan"]) == ("pro", None)
        await s.advance(month(1) + 2 * HOUR)
        assert await s.grants() == [1000, tokens, 3000]
        await sound(s)

    async def test_racing_upgrades_to_two_plans_grant_only_what_was_paid(
        self, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Invariant: the period's tokens are basic's allowance plus the prorated difference to
        the plan Stripe ends on (what the invoices net charged), and no credit is issued while
        the tokens it pays back stay. The interleaving is forced: the call to pro reaches Stripe
        only after the call to team is done."""
        s = subscriber
        await plans(s)
        await s.start("basic")
        changed_at = START + 10 * DAY
        await s.advance(changed_at)
        gateway = s.shop.gateway
        change = gateway.change_subscription_price
        [pro_price] = await s.sql("SELECT stripe_price_id FROM subscription_plans WHERE code = 'pro'")
        team_done = asyncio.Event()
        pro_at_stripe = asyncio.Event()

        async def pro_waits_for_team(subscription_id: str, **kwargs: Any) -> Any:
            if kwargs["price_id"] == pro_price.stripe_price_id:
                pro_at_stripe.set()
                await team_done.wait()
            return await change(subscription_id, **kwargs)

        monkeypatch.setattr(gateway, "change_subscription_price", pro_waits_for_team)
        to_pro = asyncio.create_task(s.change_plan("pro"))
        await asyncio.wait_for(pro_at_stripe.wait(), 10)
        to_team = await s.change_plan("team")
        team_done.set()
        results = [to_team, await to_pro]
        monkeypatch.undo()
        # One change at a time: the second, decided on the same state, is refused.
        assert (typename(to_team), to_team["code"]) == ("Conflict", "SUBSCRIPTION_CHANGING"), to_team
        assert {typename(r) for r in results} <= {"SubscriptionChanged", "Conflict", "InvalidInput"}, results
        await s.drain()
        stripe_sub = await s.stripe_subscription()
        [final] = await s.sql(
            "SELECT code, tokens_per_period FROM subscription_plans WHERE stripe_product_id = :p",
            p=stripe_sub["items"].data[0].price.product,
        )
        credited = -sum(i.total for i in await s.stripe_invoices() if i.total < 0)
        expected = 1000 + prorated_tokens(1000, int(final.tokens_per_period), changed_at, START, month(1))
        grants = await s.grants()
        assert (sum(grants), credited) == (expected, 0), (grants, final.code, credited)
        await sound(s)

    async def test_concurrent_pause_cancel_resume_and_upgrade_end_as_stripe_has_it(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        await s.advance(START + 4 * DAY)
        sid = await s.subscription_id()
        results = await asyncio.gather(
            s.pause(sid),
            s.cancel(subscription_id=sid),
            s.change_plan("pro"),
            s.resume(sid),
            s.cancel(at_period_end=False, subscription_id=sid),
        )
        for r in results:
            assert typename(r) in (
                "SubscriptionChanged",
                "Conflict",
                "PaymentProviderError",
                "InvalidInput",
            ), r
        await s.drain()
        stripe_sub = await s.stripe_subscription()
        row = await s.row()
        expected_status = {"active": "active", "canceled": "canceled", "past_due": "past_due"}[
            stripe_sub.status
        ]
        if stripe_sub.status == "active" and stripe_sub.pause_collection:
            expected_status = "paused"
        assert row.status == expected_status, (row.status, stripe_sub.status)
        assert row.cancel_at_period_end == (
            bool(stripe_sub.cancel_at_period_end) and stripe_sub.status != "canceled"
        )
        # Tokens: exactly what the paid invoices grant.
        invoices = await subscription_invoice_tokens(s)
        assert sum(t for _, _, t in invoices) == sum(await s.grants())
        assert len([i for i in await s.stripe_invoices() if i.status == "paid"]) == len(
            [i for i in invoices if i[2] > 0 or i[0] == "subscription_create"]
        )
        await sound(s)

    async def test_five_concurrent_end_grace_runs_cancel_and_suspend_once(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        await s.set_card(DECLINES_LATER)
        await s.advance(month(1) + HOUR)
        assert (await s.subscription())["status"] == "PAST_DUE"
        await s.advance(month(1) + HOUR + GRACE + 1)
        outcomes = await asyncio.gather(*(s.end_grace() for _ in range(5)))
        await s.drain()
        ended = sum(int(str(o).split()[1]) for o in outcomes)
        assert ended == 1, outcomes
        assert await s.wallet_status() == "SUSPENDED"
        kinds = await s.notification_kinds()
        assert kinds.count("WALLET_SUSPENDED") == 1 and kinds.count("SUBSCRIPTION_CANCELED") == 1, kinds
        assert [r.action for r in await s.audit("subscription.grace")] == ["subscription.grace_expired"]
        assert (await s.stripe_subscription()).status == "canceled"
        await sound(s)


class TestInvoicePaidTwice:
    async def test_invoice_paid_delivered_many_times_at_once_grants_once(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        await s.advance(month(1) + 2 * HOUR)
        paid = [e for e in await s.shop.simulator.events("invoice.paid")]
        assert len(paid) == 2
        sim = s.shop.simulator
        await asyncio.gather(
            *(sim.redeliver(e["id"], times=5) for e in paid),
            *(sim.redeliver(e["id"]) for e in paid for _ in range(3)),
        )
        await s.drain()
        assert await s.grants() == [1000, 1000]
        assert await s.balance() == 1000
        assert (await s.notification_kinds()).count("SUBSCRIPTION_RENEWED") == 1
        await sound(s)

    async def test_held_invoice_paid_first_delivered_five_times_at_once_grants_once(
        self, subscriber: Subscriber
    ) -> None:
        """Nothing of the Checkout has arrived: the invoice.paid copies race to link the row."""
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.hold()
        url = await s.checkout_url("basic")
        assert (await s.press(url, GOOD_CARD)).status_code == 303
        events = await s.held()
        s.shop.simulator.enabled_events = None
        s._held_from = None
        [paid] = [e for e in events if e["type"] == "invoice.paid"]
        await s.shop.simulator.redeliver(paid["id"], times=5)
        await s.drain()
        assert await s.grants() == [1000]
        for event in events:
            await s.shop.simulator.redeliver(event["id"], times=2)
        await s.drain()
        sub = await s.subscription()
        assert (sub["status"], sub["plan"]["code"]) == ("ACTIVE", "basic")
        assert await s.grants() == [1000]
        await s.advance(month(1) + 2 * HOUR)
        assert await s.grants() == [1000, 1000]
        await sound(s)

    async def test_a_client_cannot_take_the_grant_key_first(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.hold()
        url = await s.checkout_url("basic")
        assert (await s.press(url, GOOD_CARD)).status_code == 303
        [paid] = [e for e in await s.held() if e["type"] == "invoice.paid"]
        key = "subscription-invoice:" + paid["data"]["object"]["id"]
        await s.give(5)
        taken = await s.consume(1, key=key)
        assert (typename(taken), taken.get("code")) == ("InvalidInput", "INVALID_INPUT"), taken
        body = await s.raw(
            """mutation($org: ID!, $key: String!) { grantTokens(input: {organizationId: $org,
               amount: 5000, reason: "x", idempotencyKey: $key}) {
               __typename ... on UserError { code } } }""",
            {"org": s.org, "key": key},
            as_=STAFF,
        )
        assert body["data"]["grantTokens"]["__typename"] == "InvalidInput", body
        await s.release(7)
        assert await s.grants() == [1000]
        assert await s.balance() == 1005
        await sound(s)


# ---------------------------------------------------------------- 2. webhook order


class TestOrder:
    async def test_invoice_paid_before_checkout_completed_and_subscription_created(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.hold()
        url = await s.checkout_url("basic")
        assert (await s.press(url, GOOD_CARD)).status_code == 303
        delivered = await deliver_held(
            s, first_of("invoice.paid", "customer.subscription.created", "checkout.session.completed")
        )
        assert delivered[0] == "invoice.paid"
        sub = await s.subscription()
        assert (sub["status"], sub["plan"]["code"], sub["scheduledPlan"]) == ("ACTIVE", "basic", None)
        assert (await s.row()).checkout_session_id == session_of(url)
        assert await s.grants() == [1000]
        assert await s.notification_kinds() == ["SUBSCRIPTION_STARTED"]
        await s.advance(month(1) + 2 * HOUR)
        assert await s.grants() == [1000, 1000]
        await sound(s)

    async def test_an_old_subscription_update_delivered_last_does_not_win(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        await s.hold()
        assert typename(await s.cancel()) == "SubscriptionChanged"
        assert typename(await s.resume()) == "SubscriptionChanged"
        assert typename(await s.cancel()) == "SubscriptionChanged"
        assert typename(await s.resume()) == "SubscriptionChanged"
        # Newest first: the first cancel's event comes last.
        await deliver_held(s, lambda events: list(reversed(events)))
        stripe_sub = await s.stripe_subscription()
        assert stripe_sub.cancel_at_period_end is False
        sub = await s.subscription()
        assert (sub["status"], sub["cancelAtPeriodEnd"], sub["canceledAt"]) == ("ACTIVE", False, None)
        await s.advance(month(1) + 2 * HOUR)
        assert await s.grants() == [1000, 1000]
        await sound(s)

    async def test_deleted_before_the_upgrades_invoice_paid(self, subscriber: Subscriber) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        changed_at = START + 10 * DAY
        await s.advance(changed_at)
        await s.hold()
        assert typename(await s.change_plan("pro")) == "SubscriptionChanged"
        assert typename(await s.cancel(at_period_end=False)) == "SubscriptionChanged"
        await deliver_held(s, first_of("customer.subscription.deleted"))
        tokens = prorated_tokens(1000, 3000, changed_at, START, month(1))
        assert await s.grants() == [1000, tokens]
        assert await s.current() is None
        rows = await subscription_rows(s)
        assert [r.status for r in rows] == ["canceled"]
        assert await s.notification_kinds("SUBSCRIPTION_CANCELED") == ["SUBSCRIPTION_CANCELED"]
        await s.advance(month(1) + 2 * HOUR)
        assert await s.grants() == [1000, tokens]
        assert await s.balance() == 0
        await sound(s)

    async def test_an_upgrades_invoice_paid_after_the_renewal_grants_its_own_periods_share(
        self, subscriber: Subscriber
    ) -> None:
        """START is the 15th of a month: the first period and the next are not of one length
        (e.g. 28 and 31 days)."""
        s = subscriber
        await plans(s)
        await s.start("basic")
        changed_at = START + 10 * DAY
        await s.advance(changed_at)
        assert month(1) - START != month(2) - month(1)
        await s.hold()
        assert typename(await s.change_plan("pro")) == "SubscriptionChanged"
        await s.advance(month(1) + 2 * HOUR)
        await s.release(None)  # in order, only late
        tokens = prorated_tokens(1000, 3000, changed_at, START, month(1))
        assert await s.grants() == [1000, tokens, 3000]
        await sound(s)


# ---------------------------------------------------------------- 3. money


class TestMoney:
    async def test_up_and_down_and_up_again_within_a_period_grants_only_what_was_paid(
        self, subscriber: Subscriber
    ) -> None:
        """Invariant: in the period, basic's allowance plus the first upgrade's prorated
        difference, whatever back and forth follows; Stripe billed exactly two invoices; the
        renewal bills and grants the plan Stripe's item ends on."""
        s = subscriber
        await plans(s)
        await s.start("basic")
        changed_at = START + 5 * DAY
        await s.advance(changed_at)
        assert typename(await s.change_plan("pro")) == "SubscriptionChanged"
        for n in range(6):
            await s.advance(changed_at + (n + 1) * HOUR)
            target = "basic" if n % 2 == 0 else "pro"
            result = await s.change_plan(target)
            assert typename(result) == "SubscriptionChanged", (n, result)
            assert result["subscription"]["plan"]["code"] == "pro"
            assert (result["subscription"]["scheduledPlan"] or {}).get("code") == (
                "basic" if target == "basic" else None
            )
        await s.drain()
        tokens = prorated_tokens(1000, 3000, changed_at, START, month(1))
        assert await s.grants() == [1000, tokens]
        stripe_invoices = await s.stripe_invoices()
        assert len(stripe_invoices) == 2
        assert await subscription_invoice_tokens(s) == [
            ("subscription_create", 1000, 1000),
            ("subscription_update", stripe_invoices[1].amount_paid, tokens),
        ]
        await s.advance(month(1) + 2 * HOUR)  # the item ends on pro: pro billed and granted
        assert await s.grants() == [1000, tokens, 3000]
        assert [i.amount_paid for i in await s.stripe_invoices()][-1] == 3000
        await sound(s)

    async def test_up_down_then_up_again_after_the_renewal_bills_the_new_period(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        await s.advance(START + 5 * DAY)
        assert typename(await s.change_plan("pro")) == "SubscriptionChanged"
        assert typename(await s.change_plan("basic")) == "SubscriptionChanged"
        await s.advance(month(1) + 2 * HOUR)  # basic billed
        after = month(1) + 3 * DAY
        await s.advance(after)
        assert typename(await s.change_plan("pro")) == "SubscriptionChanged"
        await s.drain()
        first = prorated_tokens(1000, 3000, START + 5 * DAY, START, month(1))
        second = prorated_tokens(1000, 3000, after, month(1), month(2))
        assert await s.grants() == [1000, first, 1000, second]
        await sound(s)

    async def test_change_plan_to_an_archived_plan_is_not_found_and_writes_nothing(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        await s.archive_plan("pro")
        before = await everything(s)
        for code in ("pro",):
            result = await s.change_plan(code)
            assert (typename(result), result["code"], result["message"]) == (
                "NotFound",
                "NOT_FOUND",
                "plan not found",
            )
        typed = await s.subscribe("pro")
        assert (typename(typed), typed["code"]) == ("NotFound", "NOT_FOUND")
        assert await everything(s) == before
        await sound(s)

    async def test_a_plan_repriced_while_subscribed_still_renews_its_tokens_at_the_old_price(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        result = (
            await s.data(
                UPDATE_PLAN, {"input": {"planId": s.plan_id("basic"), "priceMinor": 2500}}, as_=STAFF
            )
        )["updatePlan"]
        assert typename(result) == "PlanSaved", result
        await s.advance(month(1) + 2 * HOUR)
        await s.advance(month(2) + 2 * HOUR)
        assert await s.grants() == [1000, 1000, 1000]
        assert [a for _, a, _ in await subscription_invoice_tokens(s)] == [1000, 1000, 1000]
        await sound(s)

    async def test_a_move_to_fewer_tokens_for_less_money_is_never_prorated_after_a_reprice(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.plan("mini", tokens=500, price=800)
        await s.start("basic")  # pays 10.00 a month
        result = (
            await s.data(UPDATE_PLAN, {"input": {"planId": s.plan_id("basic"), "priceMinor": 500}}, as_=STAFF)
        )["updatePlan"]
        assert typename(result) == "PlanSaved", result
        await s.advance(START + 5 * DAY)
        changed = await s.change_plan("mini")  # 8.00 for 500 tokens: cheaper and smaller
        assert typename(changed) == "SubscriptionChanged", changed
        await s.drain()
        invoices = await s.stripe_invoices()
        credit = -sum(i.total for i in invoices[1:] if i.total < 0)
        assert (changed["subscription"]["plan"]["code"], len(invoices), credit) == ("basic", 1, 0), (
            changed["subscription"]["plan"]["code"],
            [(i.billing_reason, i.total) for i in invoices],
        )
        await sound(s)


# ---------------------------------------------------------------- 4. other organizations


class TestOtherOrganizations:
    async def test_another_organization_neither_sees_nor_changes_the_subscription(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await plans(s)
        theirs = await s.start("basic")
        invoice_id = theirs["invoices"]["edges"][0]["node"]["id"]
        other = await s.another()
        missing = str(GlobalID("TokenSubscription", str(uuid.uuid4())))
        before = await everything(s)
        stripe_before = (await s.stripe_subscription()).to_dict()

        assert (await other.data(NODE, {"id": theirs["id"]}))["node"] is None
        invoice = await other.data("query($id: ID!) { node(id: $id) { id } }", {"id": invoice_id})
        assert invoice["node"] is None

        for query, name, extra in (
            (CHANGE_PLAN, "changePlan", {"planId": s.plan_id("pro")}),
            (PAUSE, "pauseSubscription", {}),
            (RESUME, "resumeSubscription", {}),
            (CANCEL, "cancelSubscription", {"atPeriodEnd": False}),
            (CANCEL, "cancelSubscription", {"atPeriodEnd": True}),
        ):
            answers = []
            for target in (theirs["id"], missing):
                variables = {"input": {"subscriptionId": target, **extra}}
                answers.append((await other.data(query, variables))[name])
            assert answers[0] == answers[1], (name, answers)
            assert (answers[0]["__typename"], answers[0]["code"]) == ("NotFound", "NOT_FOUND")
        assert await everything(s) == before
        assert (await s.stripe_subscription()).to_dict() == stripe_before
        # The other organization subscribing does not touch the first one's.
        assert (await other.start("pro"))["status"] == "ACTIVE"
        assert (await s.subscription())["plan"]["code"] == "basic"
        assert await s.grants() == [1000] and await other.grants() == [3000]
        await sound(s)


# ---------------------------------------------------------------- 5. bad input


class TestBadInput:
    async def test_bad_subscribe_input_is_typed_and_writes_nothing(self, subscriber: Subscriber) -> None:
        s = subscriber
        await plans(s)
        await s.plan("old")
        await s.archive_plan("old")
        await s.start("basic")
        sub_id = await s.subscription_id()
        await s.cancel(at_period_end=False)
        await s.drain()
        plan_id = s.plan_id("pro")
        cases: list[tuple[dict[str, Any], set[str]]] = [
            ({"plan_id": "nope"}, {"InvalidInput", "NotFound"}),
            ({"plan_id": ""}, {"InvalidInput", "NotFound"}),
            ({"plan_id": "U3Vic2NyaXB0aW9uUGxhbjpub3QtYS11dWlk"}, {"InvalidInput", "NotFound"}),
            ({"plan_id": sub_id}, {"NotFound"}),
            ({"plan_id": s.org}, {"NotFound"}),
            ({"plan_id": str(GlobalID("SubscriptionPlan", str(uuid.uuid4())))}, {"NotFound"}),
            ({"code": "old"}, {"NotFound"}),
            ({"plan_id": plan_id, "key": "k" * 256}, {"InvalidInput"}),
            ({"plan_id": plan_id, "key": ""}, {"InvalidInput"}),
            ({"plan_id": plan_id, "key": "line\nbreak"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "key": "nul\x00byte"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "javascript:alert(1)//https://a.example"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "JAVASCRIPT:alert(1)"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "data:text/html,<script>1</script>"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "https://"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "ftp://a.example/x"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "//a.example/x"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "successUrl": "https://a.example/" + "x" * 5000}, {"InvalidInput"}),
            ({"plan_id": plan_id, "cancelUrl": "   "}, {"InvalidInput"}),
            ({"plan_id": plan_id, "cancelUrl": "vbscript:msgbox"}, {"InvalidInput"}),
            ({"plan_id": plan_id, "organizationId": "nope"}, {"InvalidInput", "NotFound"}),
            ({"plan_id": plan_id, "organizationId": plan_id}, {"NotFound"}),
        ]
        before = await everything(s)
        for kwargs, allowed in cases:
            extra = dict(kwargs)
            code = extra.pop("code", None)
            pid = extra.pop("plan_id", None)
            key = extra.pop("key", None)
            body = await s.subscribe(code, plan_id=pid, key=key, raw=True, **extra)
            assert not body.get("errors"), (kwargs, body)
            result = body["data"]["subscribe"]
            assert typename(result) in allowed, (kwargs, result)
            assert await everything(s) == before, kwargs
        # A 255-character key, and one that is only unusual, are fine.
        for key in ("k" * 255, "ключ 🔑 subscription-invoice:in_x"):
            result = await s.subscribe("pro", key=key)
            assert typename(result) == "SubscriptionCheckoutStarted", (key, result)
        await sound(s)

    async def test_bad_change_input_is_typed_and_writes_nothing(self, subscriber: Subscriber) -> None:
        s = subscriber
        await plans(s)
        await s.start("basic")
        sub_id = await s.subscription_id()
        before = await everything(s)
        for subscription_id, plan_id, allowed in (
            ("nope", s.plan_id("pro"), {"InvalidInput", "NotFound"}),
            ("", s.plan_id("pro"), {"InvalidInput", "NotFound"}),
            (s.plan_id("pro"), s.plan_id("pro"), {"NotFound"}),
            (s.org, s.plan_id("pro"), {"NotFound"}),
            (sub_id, sub_id, {"NotFound"}),
            (sub_id, "nope", {"InvalidInput", "NotFound"}),
            (sub_id, s.org, {"NotFound"}),
            (sub_id, await s.shop.package_id("tokens-10"), {"NotFound"}),
            (sub_id, s.plan_id("basic"), {"InvalidInput"}),
        ):
            body = await s.raw(CHANGE_PLAN, {"input": {"subscriptionId": subscription_id, "planId": plan_id}})
            assert not body.get("errors"), body
            result = body["data"]["changePlan"]
            assert typename(result) in allowed, (subscription_id, plan_id, result)
            for query, name in ((PAUSE, "pauseSubscription"), (RESUME, "resumeSubscription")):
                if subscription_id == sub_id:
                    continue
                body = await s.raw(query, {"input": {"subscriptionId": subscription_id}})
                assert not body.get("errors"), body
                assert typename(body["data"][name]) in allowed | {"NotFound"}, body
            assert await everything(s) == before, (subscription_id, plan_id)
        await sound(s)
