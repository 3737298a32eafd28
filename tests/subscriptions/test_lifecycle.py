"""The life of a subscription, end to end: the SPA subscribes through GraphQL and pays on
Stripe's hosted Checkout page (the app's own simulator), Stripe's webhooks land on the app's
route, and a Stripe test clock moves with the app's clock through renewals, plan changes,
pauses, cancellations, failed renewals, grace periods and reminders.

A new organization's 3 trial tokens expire before the test clock's start (``harness.START``, noon
on the 15th of the month after next): every wallet here starts at 0. Every renewal is drafted at
the period end and charged an hour later (``advance(month(n) + 2 * HOUR)`` is past it)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from strawberry.relay import GlobalID

from tests.helpers import create_api_key, create_org
from tests.subscriptions.harness import (
    DAY,
    DECLINES_LATER,
    GOOD_CARD,
    HOUR,
    STAFF,
    START,
    Subscriber,
    epoch,
    month,
    prorated_amount,
    prorated_tokens,
)

GRACE = 7 * DAY


def uuid_of(global_id: str) -> uuid.UUID:
    return uuid.UUID(GlobalID.from_id(global_id).node_id)


def invoices(subscription: dict[str, Any]) -> list[dict[str, Any]]:
    """Newest period first, as the API lists them."""
    return [edge["node"] for edge in subscription["invoices"]["edges"]]


def invoice_summary(subscription: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(billingReason, status, amountMinor, periodStart, periodEnd, tokensGranted) of each."""
    return [
        (
            i["billingReason"],
            i["status"],
            i["amountMinor"],
            epoch(i["periodStart"]),
            epoch(i["periodEnd"]),
            int(i["tokensGranted"]),
        )
        for i in invoices(subscription)
    ]


def period(subscription: dict[str, Any]) -> tuple[int | None, int | None]:
    return epoch(subscription["currentPeriodStart"]), epoch(subscription["currentPeriodEnd"])


async def subscription_lots(s: Subscriber) -> list[tuple[int, int, int | None, int | None, int | None]]:
    """(amount, remaining, expires_at, period_start, period_end) of the subscription lots."""
    return [lot[1:] for lot in await s.lots() if lot[0] == "subscription"]


async def rows(s: Subscriber) -> list[Any]:
    return await s.sql("SELECT * FROM subscriptions WHERE organization_id = :org", org=s.shop.org_id)


def typed(result: dict[str, Any], typename: str, code: str | None = None) -> None:
    assert result["__typename"] == typename, result
    if code is not None:
        assert result["code"] == code, result


def changed(result: dict[str, Any]) -> dict[str, Any]:
    assert result["__typename"] == "SubscriptionChanged", result
    subscription: dict[str, Any] = result["subscription"]
    return subscription


async def failed_events(s: Subscriber) -> list[Any]:
    """Stripe events whose handling failed (none may)."""
    return [row for row in await s.shop.stripe_events() if row.error is not None]


# ---------------------------------------------------------------- 1. subscribing


class TestSubscribe:
    async def test_subscribe_pay_on_the_hosted_page_and_get_the_first_periods_tokens(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        plan = await s.plan("basic", tokens=1000, price=1000)
        url = await s.checkout_url("basic")
        assert "/_stripe/checkout/cs_" in url

        # Until it is paid: INCOMPLETE, nothing granted.
        pending = await s.subscription()
        assert (pending["status"], pending["plan"]["code"], invoices(pending)) == ("INCOMPLETE", "basic", [])
        assert await s.balance() == 0

        page = await s.shop.browser.get(url)
        assert page.status_code == 200 and "$10.00" in page.text
        paid = await s.press(url, GOOD_CARD)
        assert paid.status_code == 303, paid.text
        session_id = url.rstrip("/").rsplit("/", 1)[-1]
        assert paid.headers["location"] == f"https://app.example/billing/subscribed?session={session_id}"
        await s.drain()

        sub = await s.subscription()
        assert sub["status"] == "ACTIVE"
        assert (sub["plan"]["id"], sub["plan"]["code"], sub["scheduledPlan"]) == (plan["id"], "basic", None)
        assert period(sub) == (START, month(1))
        assert (sub["cancelAtPeriodEnd"], sub["canceledAt"], sub["pausedAt"], sub["graceEndsAt"]) == (
            False,
            None,
            None,
            None,
        )
        assert sub["organization"]["id"] == s.org
        assert invoice_summary(sub) == [("subscription_create", "paid", 1000, START, month(1), 1000)]
        [invoice] = invoices(sub)
        assert invoice["currency"].upper() == "USD"
        assert epoch(invoice["paidAt"]) == START
        assert invoice["hostedInvoiceUrl"] and "/_stripe/invoices/in_" in invoice["hostedInvoiceUrl"]

        assert await s.balance() == 1000
        assert await subscription_lots(s) == [(1000, 1000, month(1), START, month(1))]
        assert await s.grants() == [1000]

        # Stripe's side: Checkout in subscription mode for the organization's customer, our ids
        # in the metadata of the session and of the subscription.
        ours = {
            "subscription_id": str(uuid_of(sub["id"])),
            "organization_id": str(s.shop.org_id),
            "plan_id": str(uuid_of(plan["id"])),
        }
        session = await s.sdk.v1.checkout.sessions.retrieve_async(session_id)
        assert (session.mode, session.customer, session.status) == ("subscription", s.customer_id, "complete")
        assert session.metadata is not None
        assert {k: session.metadata.to_dict().get(k) for k in ours} == ours
        stripe_sub = await s.stripe_subscription()
        assert (stripe_sub.status, stripe_sub.customer, stripe_sub.id) == (
            "active",
            s.customer_id,
            session.subscription,
        )
        assert {k: stripe_sub.metadata.to_dict().get(k) for k in ours} == ours

        assert await s.notification_kinds() == ["SUBSCRIPTION_STARTED"]
        audit = await s.audit()
        [subscribe] = [r for r in audit if r.action == "subscription.subscribe"]
        assert subscribe.actor == s.owner
        [grant] = [r for r in audit if r.action == "subscription.grant"]
        assert grant.after["tokens"] == 1000
        updates = [r for r in audit if r.action == "subscription.update"]
        assert updates and {r.actor for r in updates} == {"stripe"}
        assert updates[-1].after["status"] in ("active", "ACTIVE")
        assert await failed_events(s) == []
        assert await s.shop.violations() == {}

    async def test_a_second_subscribe_conflicts_and_a_key_gives_the_same_url(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic")
        await s.plan("pro", tokens=3000, price=3000)
        first = await s.checkout_url("basic", key="subscribe-1")
        assert await s.checkout_url("basic", key="subscribe-1") == first
        assert len(await rows(s)) == 1

        # Started over (another key) before paying: the first session is expired in Stripe.
        second = await s.checkout_url("basic", key="subscribe-2")
        assert second != first
        old = await s.sdk.v1.checkout.sessions.retrieve_async(first.rstrip("/").rsplit("/", 1)[-1])
        assert old.status == "expired"
        refused = await s.press(first, GOOD_CARD)
        assert refused.status_code != 303
        assert (await s.press(second, GOOD_CARD)).status_code == 303
        await s.drain()
        live = await s.subscription()
        assert (live["status"], [i["tokensGranted"] for i in invoices(live)]) == ("ACTIVE", [1000])
        assert [r.status for r in await rows(s) if r.status != "canceled"] == ["active"]

        before = await s.sql("SELECT id, status, checkout_session_id FROM subscriptions ORDER BY id")
        for code, key in (("basic", "subscribe-3"), ("basic", None), ("pro", None)):
            typed(await s.subscribe(code, key=key), "Conflict", "SUBSCRIPTION_EXISTS")
        assert await s.sql("SELECT id, status, checkout_session_id FROM subscriptions ORDER BY id") == before
        assert await s.balance() == 1000

    async def test_owners_admins_billing_staff_and_configuring_keys_may_subscribe(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic")
        await s.add_member("the-admin", "ADMIN")
        await s.add_member("the-billing", "BILLING")
        _, configure_key = await create_api_key(
            s.shop.client, s.org, scopes=["tokens.configure"], as_=s.owner
        )
        callers: list[dict[str, Any]] = [
            {"as_": s.owner},
            {"as_": "the-admin"},
            {"as_": "the-billing"},
            {"as_": STAFF},
            {"bearer": configure_key},
        ]
        urls = []
        for caller in callers:
            result = await s.subscribe("basic", **caller)
            assert result["__typename"] == "SubscriptionCheckoutStarted", (caller, result)
            urls.append(result["checkoutUrl"])
        assert len(set(urls)) == len(urls)  # each started over
        assert (await s.press(urls[-1], GOOD_CARD)).status_code == 303
        await s.drain()
        assert (await s.subscription())["status"] == "ACTIVE"
        actors = {r.actor for r in await s.audit() if r.action == "subscription.subscribe"}
        assert {s.owner, "the-admin", "the-billing", STAFF} <= actors

    async def test_members_viewers_other_keys_and_other_organizations_may_not(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic")
        await s.add_member("the-member", "MEMBER")
        await s.add_member("the-viewer", "VIEWER")
        _, consume_key = await create_api_key(
            s.shop.client, s.org, scopes=["tokens.view", "tokens.consume", "tokens.purchase"], as_=s.owner
        )
        await create_org(s.shop.client, "someone-else", name="Someone else")
        events = len(await s.shop.simulator.events())
        for who, code in (
            ({"as_": "the-member"}, "FORBIDDEN"),
            ({"as_": "the-viewer"}, "FORBIDDEN"),
            ({"bearer": consume_key}, "FORBIDDEN"),
            ({"as_": "someone-else"}, "NOT_FOUND"),
            ({"as_": "nobody-at-all"}, "NOT_FOUND"),
        ):
            body = await s.subscribe("basic", raw=True, **who)
            if code == "FORBIDDEN":  # not a result: an authorization error
                assert body["errors"][0]["extensions"]["code"] == code, (who, body)
                assert (body.get("data") or {}).get("subscribe") is None
            else:  # another organization is not found, word for word as a missing one (as startCheckout)
                assert not body.get("errors"), (who, body)
                assert body["data"]["subscribe"] == {
                    "__typename": "NotFound",
                    "code": "NOT_FOUND",
                    "message": "organization not found",
                }, (who, body)
        anonymous = await s.shop.client.raw(
            "mutation($i: SubscribeInput!) { subscribe(input: $i) { __typename } }",
            {
                "i": {
                    "organizationId": s.org,
                    "planId": s.plan_id("basic"),
                    "successUrl": "https://a.example/ok",
                    "cancelUrl": "https://a.example/no",
                }
            },
        )
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert await rows(s) == []
        assert len(await s.shop.simulator.events()) == events
        assert await s.audit() == []
        # The members still see that there is none.
        assert await s.current(as_="the-viewer") is None

    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            ("unknown plan", ("NotFound", "NOT_FOUND", None)),
            ("a package, not a plan", ("NotFound", "NOT_FOUND", None)),
            ("archived plan", ("NotFound", "NOT_FOUND", None)),
            ("successUrl not a URL", ("InvalidInput", "INVALID_INPUT", "successUrl")),
            ("successUrl not http", ("InvalidInput", "INVALID_INPUT", "successUrl")),
            ("cancelUrl empty", ("InvalidInput", "INVALID_INPUT", "cancelUrl")),
        ],
    )
    async def test_bad_input_is_typed_and_writes_nothing(
        self, subscriber: Subscriber, change: str, expected: tuple[str, str, str | None]
    ) -> None:
        s = subscriber
        await s.plan("basic")
        await s.plan("old")
        await s.archive_plan("old")
        events = len(await s.shop.simulator.events())
        kwargs: dict[str, Any] = {"code": "basic"}
        if change == "unknown plan":
            kwargs = {"plan_id": str(GlobalID("SubscriptionPlan", str(uuid.uuid4())))}
        elif change == "a package, not a plan":
            kwargs = {"plan_id": await s.shop.package_id("tokens-10")}
        elif change == "archived plan":
            kwargs = {"code": "old"}
        elif change == "successUrl not a URL":
            kwargs["successUrl"] = "not a url"
        elif change == "successUrl not http":
            kwargs["successUrl"] = "javascript:alert(1)"
        else:
            kwargs["cancelUrl"] = ""
        result = await s.subscribe(**kwargs)
        typename, code, field = expected
        typed(result, typename, code)
        if field is not None:
            assert result["field"] == field
        assert await rows(s) == []
        assert len(await s.shop.simulator.events()) == events
        assert await s.audit() == []

    async def test_a_malformed_plan_id_is_refused(self, subscriber: Subscriber) -> None:
        """Not a global id at all: InvalidInput on planId (as updatePlan answers), or NotFound."""
        s = subscriber
        await s.plan("basic")
        result = await s.subscribe(plan_id="nope")
        assert result["__typename"] in ("InvalidInput", "NotFound"), result
        if result["__typename"] == "InvalidInput":
            assert result["field"] == "planId"
        assert await rows(s) == []


# ---------------------------------------------------------------- 2. renewals


class TestRenewals:
    async def test_three_renewals_each_periods_allowance_expires_at_its_end(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        await s.spend(400)
        assert await s.balance() == 600

        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert (sub["status"], period(sub)) == ("ACTIVE", (month(1), month(2)))
        assert await s.balance() == 1000  # the 600 left expired at month(1)
        assert await subscription_lots(s) == [
            (1000, 0, month(1), START, month(1)),
            (1000, 1000, month(2), month(1), month(2)),
        ]
        await s.spend(250)
        await s.advance(month(2) + 2 * HOUR)
        assert await s.balance() == 1000
        await s.advance(month(3) + 2 * HOUR)
        assert await s.balance() == 1000

        sub = await s.subscription()
        assert period(sub) == (month(3), month(4))
        assert invoice_summary(sub) == [
            ("subscription_cycle", "paid", 1000, month(3), month(4), 1000),
            ("subscription_cycle", "paid", 1000, month(2), month(3), 1000),
            ("subscription_cycle", "paid", 1000, month(1), month(2), 1000),
            ("subscription_create", "paid", 1000, START, month(1), 1000),
        ]
        assert [epoch(i["paidAt"]) for i in invoices(sub)] == [
            month(3) + HOUR,
            month(2) + HOUR,
            month(1) + HOUR,
            START,
        ]
        wallet = await s.wallet()
        assert (wallet["lifetimeGranted"], wallet["lifetimeConsumed"], wallet["lifetimeExpired"]) == (
            3 + 4000,
            650,
            3 + 600 + 750 + 1000,
        )
        assert await s.grants() == [1000] * 4
        assert [amount for _, amount in await s.entries("expiration")] == [-3, -600, -750, -1000]
        assert await s.notification_kinds("SUBSCRIPTION_STARTED", "SUBSCRIPTION_RENEWED") == [
            "SUBSCRIPTION_STARTED",
            "SUBSCRIPTION_RENEWED",
            "SUBSCRIPTION_RENEWED",
            "SUBSCRIPTION_RENEWED",
        ]
        grants = [r.after["tokens"] for r in await s.audit() if r.action == "subscription.grant"]
        assert grants == [1000] * 4
        assert await failed_events(s) == []
        assert await s.shop.violations() == {}

    async def test_three_renewals_roll_over_up_to_the_cap(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("roll", tokens=1000, price=2000, rollover="ROLLOVER", rolloverCap=1500)
        await s.start("roll")
        assert await subscription_lots(s) == [(1000, 1000, None, START, month(1))]
        await s.spend(300)

        await s.advance(month(1) + 2 * HOUR)
        assert await s.balance() == 700 + 1000  # all 700 carried (under the cap)
        await s.spend(100)  # from the oldest lot

        await s.advance(month(2) + 2 * HOUR)
        assert await s.balance() == 1500 + 1000  # 1600 carried, cut to 1500
        await s.advance(month(3) + 2 * HOUR)
        assert await s.balance() == 1500 + 1000  # 2500 carried, cut to 1500

        assert await subscription_lots(s) == [
            (1000, 0, None, START, month(1)),
            (1000, 500, None, month(1), month(2)),
            (1000, 1000, None, month(2), month(3)),
            (1000, 1000, None, month(3), month(4)),
        ]
        assert [amount for _, amount in await s.entries("expiration")] == [-3, -100, -500, -500]
        sub = await s.subscription()
        assert [int(i["tokensGranted"]) for i in invoices(sub)] == [1000] * 4
        assert [i["amountMinor"] for i in invoices(sub)] == [2000] * 4
        assert (await s.wallet())["lifetimeExpired"] == 3 + 1100
        assert await s.shop.violations() == {}


# ---------------------------------------------------------------- 3. plan changes


class TestChangePlan:
    async def test_an_upgrade_is_charged_now_and_grants_the_prorated_difference(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        pro = await s.plan("pro", tokens=3000, price=3000)
        await s.start("basic")
        await s.spend(200)
        changed_at = START + 10 * DAY + 5 * HOUR
        await s.advance(changed_at)

        result = changed(await s.change_plan("pro"))
        assert (result["plan"]["id"], result["scheduledPlan"], result["status"]) == (
            pro["id"],
            None,
            "ACTIVE",
        )
        assert period(result) == (START, month(1))
        await s.drain()

        tokens = prorated_tokens(1000, 3000, changed_at, START, month(1))
        hours_left, hours = (month(1) - changed_at) // HOUR, (month(1) - START) // HOUR
        assert tokens == (2000 * hours_left + hours // 2) // hours  # e.g. 2000 x 499 h / 744 h = 1341
        assert await s.balance() == 800 + tokens
        sub = await s.subscription()
        assert sub["plan"]["code"] == "pro"
        amount = prorated_amount(1000, 3000, changed_at, START, month(1))
        assert invoice_summary(sub) == [
            ("subscription_update", "paid", amount, changed_at, month(1), tokens),
            ("subscription_create", "paid", 1000, START, month(1), 1000),
        ]
        assert await subscription_lots(s) == [
            (1000, 800, month(1), START, month(1)),
            (tokens, tokens, month(1), changed_at, month(1)),
        ]
        stripe_sub = await s.stripe_subscription()
        [price] = await s.sql("SELECT stripe_price_id FROM subscription_plans WHERE code = 'pro'")
        assert stripe_sub["items"].data[0].price.id == price.stripe_price_id
        [change] = [r for r in await s.audit() if r.action == "subscription.change_plan"]
        assert change.actor == s.owner

        # The renewal bills and grants the new plan.
        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 3000, month(1), month(2), 3000)
        assert await s.balance() == 3000
        assert await s.grants() == [1000, tokens, 3000]
        assert await failed_events(s) == []

    async def test_a_downgrade_waits_for_the_renewal(self, subscriber: Subscriber) -> None:
        s = subscriber
        basic = await s.plan("basic", tokens=1000, price=1000)
        await s.plan("pro", tokens=3000, price=3000)
        await s.plan("team", tokens=5000, price=5000)
        await s.start("pro")
        await s.advance(START + 5 * DAY)

        result = changed(await s.change_plan("basic"))
        assert (result["plan"]["code"], result["scheduledPlan"]) == (
            "pro",
            {"id": basic["id"], "code": "basic"},
        )
        await s.drain()
        sub = await s.subscription()
        assert (sub["plan"]["code"], sub["scheduledPlan"]["code"], len(invoices(sub))) == ("pro", "basic", 1)
        assert await s.balance() == 3000
        third = await s.change_plan("team")
        typed(third, "Conflict", "CHANGE_SCHEDULED")

        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert (sub["plan"]["code"], sub["scheduledPlan"]) == ("basic", None)
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 1000, month(1), month(2), 1000)
        assert await s.balance() == 1000
        await s.advance(month(2) + 2 * HOUR)
        sub = await s.subscription()
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 1000, month(2), month(3), 1000)
        assert await s.grants() == [3000, 1000, 1000]

    async def test_changing_back_cancels_a_scheduled_downgrade(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.plan("pro", tokens=3000, price=3000)
        await s.start("pro")
        await s.advance(START + 5 * DAY)
        assert changed(await s.change_plan("basic"))["scheduledPlan"]["code"] == "basic"
        back = changed(await s.change_plan("pro"))
        assert (back["plan"]["code"], back["scheduledPlan"]) == ("pro", None)
        await s.drain()
        assert len(invoices(await s.subscription())) == 1  # nothing billed
        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert (sub["plan"]["code"], sub["scheduledPlan"]) == ("pro", None)
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 3000, month(1), month(2), 3000)
        assert await s.balance() == 3000

    async def test_a_declined_upgrade_changes_nothing(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.plan("pro", tokens=3000, price=3000)
        await s.start("basic")
        await s.set_card(DECLINES_LATER)
        await s.advance(START + 3 * DAY)
        before = await s.subscription()

        result = await s.change_plan("pro")
        assert result["code"] == "PAYMENT_DECLINED", result
        await s.drain()
        after = await s.subscription()
        assert after == before
        assert (after["status"], after["plan"]["code"], len(invoices(after))) == ("ACTIVE", "basic", 1)
        assert await s.balance() == 1000
        [price] = await s.sql("SELECT stripe_price_id FROM subscription_plans WHERE code = 'basic'")
        stripe_sub = await s.stripe_subscription()
        assert (stripe_sub.status, stripe_sub["items"].data[0].price.id) == ("active", price.stripe_price_id)
        assert await s.grants() == [1000]
        assert result["__typename"] == "PlanChangeDeclined", result

    async def test_changes_that_make_no_sense_are_refused(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.plan("yearly", tokens=12000, price=10000, interval="YEAR")
        await s.plan("eur", tokens=2000, price=2000, currency="EUR")
        await s.plan("old", tokens=5000, price=5000)
        await s.archive_plan("old")
        await s.add_member("the-member", "MEMBER")
        await s.start("basic")
        before = await s.subscription()

        same = await s.change_plan("basic")
        typed(same, "InvalidInput")
        assert same["field"] == "planId"
        for code in ("yearly", "eur"):
            other = await s.change_plan(code)
            typed(other, "InvalidInput")
            assert other["field"] == "planId"
        typed(await s.change_plan("old"), "NotFound", "NOT_FOUND")
        forbidden = await s.raw(
            "mutation($i: ChangePlanInput!) { changePlan(input: $i) { __typename } }",
            {"i": {"subscriptionId": before["id"], "planId": s.plan_id("basic")}},
            as_="the-member",
        )
        assert forbidden["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        await s.drain()
        assert await s.subscription() == before

        assert changed(await s.pause())["status"] == "PAUSED"
        typed(await s.change_plan("yearly"), "Conflict", "SUBSCRIPTION_NOT_ACTIVE")


# ---------------------------------------------------------------- 4. pause and resume


class TestPause:
    async def test_a_renewal_while_paused_is_void_and_grants_nothing(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        await s.advance(START + 2 * DAY)

        paused = changed(await s.pause())
        assert (paused["status"], epoch(paused["pausedAt"])) == ("PAUSED", START + 2 * DAY)
        await s.drain()
        assert (await s.subscription())["status"] == "PAUSED"
        typed(await s.pause(), "Conflict")
        stripe_sub = await s.stripe_subscription()
        assert stripe_sub.pause_collection is not None and stripe_sub.pause_collection.behavior == "void"

        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert (sub["status"], period(sub)) == ("PAUSED", (month(1), month(2)))
        [renewal, _] = invoices(sub)
        assert (renewal["billingReason"], renewal["status"], int(renewal["tokensGranted"])) == (
            "subscription_cycle",
            "void",
            0,
        )
        assert await s.balance() == 0
        assert await s.grants() == [1000]

        resumed = changed(await s.resume())
        assert (resumed["status"], resumed["pausedAt"]) == ("ACTIVE", None)
        await s.drain()
        typed(await s.resume(), "Conflict")
        await s.advance(month(2) + 2 * HOUR)
        sub = await s.subscription()
        assert sub["status"] == "ACTIVE"
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 1000, month(2), month(3), 1000)
        assert await s.balance() == 1000
        assert await s.grants() == [1000, 1000]
        assert await s.notification_kinds("SUBSCRIPTION_STARTED", "SUBSCRIPTION_RENEWED") == [
            "SUBSCRIPTION_STARTED",
            "SUBSCRIPTION_RENEWED",
        ]
        actions = [r.action for r in await s.audit() if r.actor == s.owner]
        assert actions == ["subscription.subscribe", "subscription.pause", "subscription.resume"]


# ---------------------------------------------------------------- 5. cancel


class TestCancel:
    async def test_at_period_end_it_stays_active_until_then(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        first = await s.start("basic")
        await s.advance(START + 5 * DAY)

        ending = changed(await s.cancel())
        assert (ending["status"], ending["cancelAtPeriodEnd"]) == ("ACTIVE", True)
        await s.drain()
        assert (await s.stripe_subscription()).cancel_at_period_end is True

        await s.advance(month(1) - 1)
        sub = await s.subscription()
        assert (sub["status"], sub["cancelAtPeriodEnd"]) == ("ACTIVE", True)
        assert await s.balance() == 1000

        await s.advance(month(1) + 2 * HOUR)
        assert await s.current() is None
        ended = await s.node(first["id"])
        assert ended is not None
        assert ended["status"] == "CANCELED" and ended["canceledAt"] is not None
        assert len(invoices(ended)) == 1  # no renewal
        assert len(await s.stripe_invoices()) == 1
        assert (await s.stripe_subscription()).status == "canceled"
        assert await s.balance() == 0  # the last period's allowance expired with it
        assert await s.notification_kinds() == ["SUBSCRIPTION_STARTED", "SUBSCRIPTION_CANCELED"]
        [cancel] = [r for r in await s.audit() if r.action == "subscription.cancel"]
        assert cancel.actor == s.owner

        # A new subscription may start now.
        again = await s.start("basic")
        assert again["id"] != first["id"]
        assert (again["status"], period(again)) == (
            "ACTIVE",
            (month(1) + 2 * HOUR, month(1, month(1) + 2 * HOUR)),
        )
        assert await s.balance() == 1000
        assert await s.grants() == [1000, 1000]

    async def test_now_it_ends_at_once_and_keeps_the_tokens_granted(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        sub = await s.start("basic")
        await s.spend(100)
        await s.advance(START + 3 * DAY)

        ended = changed(await s.cancel(at_period_end=False))
        assert (ended["status"], epoch(ended["canceledAt"])) == ("CANCELED", START + 3 * DAY)
        await s.drain()
        assert await s.current() is None
        assert (await s.stripe_subscription()).status == "canceled"
        assert await s.balance() == 900
        typed(
            await s.cancel(at_period_end=False, subscription_id=sub["id"]),
            "Conflict",
            "SUBSCRIPTION_CANCELED",
        )
        typed(await s.cancel(subscription_id=sub["id"]), "Conflict", "SUBSCRIPTION_CANCELED")

        await s.advance(month(1) + 2 * HOUR)
        assert len(await s.stripe_invoices()) == 1
        assert await s.balance() == 0
        assert await s.notification_kinds() == ["SUBSCRIPTION_STARTED", "SUBSCRIPTION_CANCELED"]
        node = await s.node(sub["id"])
        assert node is not None and node["status"] == "CANCELED"

    async def test_a_scheduled_cancel_can_be_undone_or_brought_forward(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        assert changed(await s.cancel())["cancelAtPeriodEnd"] is True
        kept = changed(await s.resume())
        assert (kept["status"], kept["cancelAtPeriodEnd"]) == ("ACTIVE", False)
        await s.advance(month(1) + 2 * HOUR)
        sub = await s.subscription()
        assert (sub["status"], invoice_summary(sub)[0][0]) == ("ACTIVE", "subscription_cycle")

        assert changed(await s.cancel())["cancelAtPeriodEnd"] is True
        now = changed(await s.cancel(at_period_end=False))
        assert now["status"] == "CANCELED"
        await s.drain()
        assert await s.current() is None
        assert await s.notification_kinds("SUBSCRIPTION_CANCELED") == ["SUBSCRIPTION_CANCELED"]


# ---------------------------------------------------------------- 6. a failed renewal that recovers


async def past_due(s: Subscriber) -> dict[str, Any]:
    """Subscribed to basic at START; the card then declines; the clocks at the renewal's failed
    charge (month(1) + 1 hour)."""
    await s.plan("basic", tokens=1000, price=1000)
    await s.start("basic")
    await s.set_card(DECLINES_LATER)
    await s.advance(month(1) + HOUR)
    return await s.subscription()


class TestFailedRenewal:
    async def test_past_due_then_stripes_retry_with_a_new_card_pays_it(self, subscriber: Subscriber) -> None:
        s = subscriber
        sub = await past_due(s)
        assert (sub["status"], epoch(sub["graceEndsAt"])) == ("PAST_DUE", month(1) + HOUR + GRACE)
        assert period(sub) == (month(1), month(2))
        [renewal, _] = invoices(sub)
        assert (renewal["billingReason"], renewal["status"], int(renewal["tokensGranted"])) == (
            "subscription_cycle",
            "open",
            0,
        )
        assert renewal["hostedInvoiceUrl"]
        assert await s.balance() == 0
        assert await s.wallet_status() == "ACTIVE"
        short = await s.consume(1)
        typed(short, "InsufficientTokens")
        assert await s.notification_kinds() == ["SUBSCRIPTION_STARTED", "SUBSCRIPTION_PAYMENT_FAILED"]

        await s.set_card(GOOD_CARD)
        await s.advance(month(1) + HOUR + 3 * DAY)  # Stripe's first retry
        sub = await s.subscription()
        assert (sub["status"], sub["graceEndsAt"]) == ("ACTIVE", None)
        assert invoice_summary(sub)[0] == ("subscription_cycle", "paid", 1000, month(1), month(2), 1000)
        assert epoch(invoices(sub)[0]["paidAt"]) == month(1) + HOUR + 3 * DAY
        assert await s.balance() == 1000
        assert await subscription_lots(s) == [
            (1000, 0, month(1), START, month(1)),
            (1000, 1000, month(2), month(1), month(2)),
        ]
        assert await s.notification_kinds() == [
            "SUBSCRIPTION_STARTED",
            "SUBSCRIPTION_PAYMENT_FAILED",
            "SUBSCRIPTION_RENEWED",
        ]
        assert await failed_events(s) == []


# ---------------------------------------------------------------- 7. out of grace


class TestGrace:
    async def test_out_of_grace_canceled_and_suspended_until_the_invoice_is_paid(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        sub = await past_due(s)
        grace_ends = month(1) + HOUR + GRACE
        assert epoch(sub["graceEndsAt"]) == grace_ends
        [renewal, _] = invoices(sub)

        await s.advance(month(1) + HOUR + 3 * DAY)  # Stripe's retry fails too: the grace stays
        sub = await s.subscription()
        assert (sub["status"], epoch(sub["graceEndsAt"])) == ("PAST_DUE", grace_ends)
        assert (await s.notification_kinds()).count("SUBSCRIPTION_PAYMENT_FAILED") == 2

        await s.advance(grace_ends - 1)
        await s.end_grace()
        await s.drain()
        assert (await s.subscription())["status"] == "PAST_DUE"
        assert await s.wallet_status() == "ACTIVE"

        await s.advance(grace_ends + 1)
        await asyncio.gather(s.end_grace(), s.end_grace())
        await s.drain()
        await s.end_grace()
        await s.drain()
        assert await s.current() is None
        ended = await s.node(sub["id"])
        assert ended is not None and ended["status"] == "CANCELED"
        assert (await s.stripe_subscription()).status == "canceled"
        assert await s.wallet_status() == "SUSPENDED"
        typed(await s.consume(1), "WalletSuspended", "WALLET_SUSPENDED")
        kinds = await s.notification_kinds()
        assert kinds[:3] == [
            "SUBSCRIPTION_STARTED",
            "SUBSCRIPTION_PAYMENT_FAILED",
            "SUBSCRIPTION_PAYMENT_FAILED",
        ]
        assert sorted(kinds[3:]) == ["SUBSCRIPTION_CANCELED", "WALLET_SUSPENDED"]
        audit = await s.audit("")
        [expired] = [r for r in audit if r.action == "subscription.grace_expired"]
        assert expired.actor == "system:subscriptions.grace"
        assert [r.action for r in audit if r.action.startswith("wallet.")] == ["wallet.suspend"]

        # The customer pays the open invoice on Stripe's hosted page: the wallet is back, with
        # that period's tokens.
        paid = await s.pay_invoice_page(renewal["hostedInvoiceUrl"], GOOD_CARD)
        assert paid.status_code == 303, paid.text
        assert await s.wallet_status() == "ACTIVE"
        ended = await s.node(sub["id"])
        assert ended is not None
        assert ended["status"] == "CANCELED"
        assert invoice_summary(ended)[0] == ("subscription_cycle", "paid", 1000, month(1), month(2), 1000)
        assert await s.balance() == 1000
        assert await subscription_lots(s) == [
            (1000, 0, month(1), START, month(1)),
            (1000, 1000, month(2), month(1), month(2)),
        ]
        kinds = await s.notification_kinds()
        assert kinds.count("WALLET_REACTIVATED") == 1 and kinds.count("WALLET_SUSPENDED") == 1
        assert kinds.index("WALLET_REACTIVATED") > kinds.index("WALLET_SUSPENDED")
        actions = [r.action for r in await s.audit("wallet.")]
        assert actions == ["wallet.suspend", "wallet.reactivate"]
        await s.spend(10)
        # A new subscription may start.
        assert (await s.start("basic"))["status"] == "ACTIVE"

    @pytest.mark.parametrize("when", ["while past due", "after the grace ended"])
    async def test_a_staff_suspension_is_not_undone_by_a_payment(
        self, subscriber: Subscriber, when: str
    ) -> None:
        s = subscriber
        sub = await past_due(s)
        [renewal, _] = invoices(sub)
        if when == "while past due":
            await s.staff_suspend()
        await s.advance(month(1) + HOUR + GRACE + 1)
        await s.end_grace()
        await s.drain()
        if when == "after the grace ended":
            await s.staff_suspend()
        assert await s.wallet_status() == "SUSPENDED"
        assert (await s.node(sub["id"]) or {}).get("status") == "CANCELED"

        paid = await s.pay_invoice_page(renewal["hostedInvoiceUrl"], GOOD_CARD)
        assert paid.status_code == 303, paid.text
        assert await s.wallet_status() == "SUSPENDED"
        assert "WALLET_REACTIVATED" not in await s.notification_kinds()
        ended = await s.node(sub["id"])
        assert ended is not None
        assert int(invoices(ended)[0]["tokensGranted"]) == 1000  # paid for: granted, not usable
        typed(await s.consume(1), "WalletSuspended")


# ---------------------------------------------------------------- 8. reminders


class TestReminders:
    async def test_once_per_period_three_days_before(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")

        await s.advance(month(1) - 3 * DAY - 1)
        await s.send_reminders()
        assert await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING") == []

        await s.advance(month(1) - 3 * DAY)
        await asyncio.gather(s.send_reminders(), s.send_reminders())
        await s.send_reminders()
        [(_, data)] = await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING")
        assert data["amountMinor"] == 1000
        assert str(data["currency"]).upper() == "USD"
        assert epoch(data["renewsAt"]) == month(1)
        assert data["plan"] in ("basic", "Basic", s.plan_id("basic"))

        await s.advance(month(1) + 2 * HOUR)
        await s.send_reminders()
        assert len(await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING")) == 1
        await s.advance(month(2) - 3 * DAY + HOUR)
        await s.send_reminders()
        await s.send_reminders()
        reminders = await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING")
        assert [epoch(data["renewsAt"]) for _, data in reminders] == [month(1), month(2)]

        # Ending at the period end: nothing to remind of.
        await s.advance(month(2) + 2 * HOUR)
        changed(await s.cancel())
        await s.advance(month(3) - 2 * DAY)
        await s.send_reminders()
        assert len(await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING")) == 2

    async def test_none_while_paused(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=1000, price=1000)
        await s.start("basic")
        changed(await s.pause())
        await s.advance(month(1) - 2 * DAY)
        await s.send_reminders()
        assert await s.notifications("SUBSCRIPTION_RENEWAL_UPCOMING") == []


# ---------------------------------------------------------------- 9. an unlimited plan


class TestUnlimited:
    async def test_consumption_is_covered_while_subscribed(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("unlimited", tokens=0, price=9900, unlimited=True)
        await s.give(50)
        sub = await s.start("unlimited")
        assert sub["status"] == "ACTIVE"
        assert invoice_summary(sub) == [("subscription_create", "paid", 9900, START, month(1), 0)]
        assert await s.grants() == []
        assert await s.balance() == 50

        results = await asyncio.gather(*(s.consume(10, key=f"covered-{n}") for n in range(100)))
        assert [r["__typename"] for r in results] == ["TokensConsumed"] * 100
        assert all(not r["replayed"] for r in results)
        assert await s.balance() == 50
        covered = await s.sql(
            """
            SELECT e.amount, e.covered FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id
            WHERE w.organization_id = :org AND e.kind = 'consumption'
            """,
            org=s.shop.org_id,
        )
        assert [(int(r.amount), int(r.covered)) for r in covered] == [(0, 10)] * 100

        replay = await s.consume(10, key="covered-7")
        assert (replay["__typename"], replay["replayed"]) == ("TokensConsumed", True)
        assert replay["entry"]["id"] == results[7]["entry"]["id"]
        assert len(await s.entries("consumption")) == 100
        assert (await s.wallet())["lifetimeConsumed"] == 0

        changed(await s.cancel(at_period_end=False))
        await s.drain()
        drawn = await s.consume(10)
        assert (drawn["__typename"], drawn["wallet"]["balance"]) == ("TokensConsumed", 40)
        short = await s.consume(100)
        assert (short["__typename"], short["requested"], short["available"]) == (
            "InsufficientTokens",
            100,
            40,
        )
        assert await s.shop.violations() == {}

    async def test_past_due_still_covered_until_the_grace_ends(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("unlimited", tokens=0, price=9900, unlimited=True)
        await s.start("unlimited")
        await s.set_card(DECLINES_LATER)
        await s.advance(month(1) + HOUR)
        sub = await s.subscription()
        assert (sub["status"], epoch(sub["graceEndsAt"])) == ("PAST_DUE", month(1) + HOUR + GRACE)
        covered = await s.consume(500)
        assert (covered["__typename"], covered["wallet"]["balance"]) == ("TokensConsumed", 0)

        await s.advance(month(1) + HOUR + GRACE + 1)
        await s.end_grace()
        await s.drain()
        typed(await s.consume(1), "WalletSuspended", "WALLET_SUSPENDED")
        assert await s.current() is None
