"""Many `subscribe` calls at once for one organization: with one idempotency key they all get
the same checkout page (one Stripe session); with different keys (or none) one page is made and
the others meet the subscription (`SUBSCRIPTION_EXISTS`), or replace an abandoned checkout."""

from __future__ import annotations

import asyncio

from tests.subscriptions.harness import Subscriber


async def test_one_key_at_once_gives_one_page(subscriber: Subscriber) -> None:
    s = subscriber
    await s.plan("basic", tokens=100, price=1000)
    results = await asyncio.gather(*(s.subscribe("basic", key="same-click") for _ in range(8)))
    assert {r["__typename"] for r in results} == {"SubscriptionCheckoutStarted"}, results
    assert len({r["checkoutUrl"] for r in results}) == 1
    rows = await s.sql("SELECT status, checkout_session_id FROM subscriptions")
    assert [r.status for r in rows] == ["incomplete"] and rows[0].checkout_session_id is not None


async def test_different_keys_at_once_leave_one_live_subscription(subscriber: Subscriber) -> None:
    s = subscriber
    await s.plan("basic", tokens=100, price=1000)
    results = await asyncio.gather(*(s.subscribe("basic", key=f"tab-{n}") for n in range(6)))
    started = [r for r in results if r["__typename"] == "SubscriptionCheckoutStarted"]
    assert started, results
    assert all(r["code"] == "SUBSCRIPTION_EXISTS" for r in results if r not in started), results
    live = await s.sql("SELECT checkout_session_id FROM subscriptions WHERE status <> 'canceled'")
    assert len(live) == 1
    # The live one's page pays; every other page made meanwhile was expired in Stripe.
    live_url = [r["checkoutUrl"] for r in started if live[0].checkout_session_id in r["checkoutUrl"]]
    assert len(live_url) == 1
    for other in started:
        if other["checkoutUrl"] != live_url[0]:
            refused = await s.press(other["checkoutUrl"])
            assert refused.status_code != 303, refused.text
    paid = await s.press(live_url[0])
    assert paid.status_code == 303, paid.text
    await s.drain()
    assert (await s.subscription())["status"] == "ACTIVE"
    assert await s.balance() == 100
    assert await s.shop.violations() == {}
