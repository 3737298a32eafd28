"""The lives of tests/subscriptions/test_lifecycle.py again, with Stripe's events held back
during each step, then delivered each 2 or 3 times in a shuffled order (several seeds): every
life ends in the same state, with the same tokens, as when the events came in order.

Each life is run once in order (its events delivered as they happen), then once per seed by
another organization on its own test clock from the same start; their states are compared
without ids (``Subscriber.state``): the subscriptions (status, plan, scheduled plan, period,
cancel/pause/grace marks, invoices with their tokens), the wallet (balance, lifetime granted and
expired), its lots, its grant entries and the kinds of notifications sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.subscriptions.harness import (
    DAY,
    DECLINES_LATER,
    GOOD_CARD,
    HOUR,
    START,
    Subscriber,
    month,
    prorated_tokens,
)

SEEDS = (11, 22, 33)
GRACE = 7 * DAY

Life = Callable[[Subscriber, int | None], Awaitable[None]]


async def subscribe(s: Subscriber, seed: int | None, code: str) -> None:
    """Subscribe and pay on the hosted page, the events of it held (or not)."""
    async with s.step(seed):
        url = await s.checkout_url(code)
        paid = await s.press(url, GOOD_CARD)
        assert paid.status_code == 303, paid.text


async def renewals_that_expire(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    await s.spend(400)
    async with s.step(seed):
        await s.advance(month(1) + 2 * HOUR)
    await s.spend(250)
    async with s.step(seed):  # two renewals' events together
        await s.advance(month(2) + 2 * HOUR)
        await s.advance(month(3) + 2 * HOUR)


async def everything_held_for_three_renewals(s: Subscriber, seed: int | None) -> None:
    """The Checkout's events and three renewals' in one batch: the app learns of the
    subscription only when they come, in whatever order."""
    async with s.step(seed):
        url = await s.checkout_url("basic")
        paid = await s.press(url, GOOD_CARD)
        assert paid.status_code == 303, paid.text
        await s.advance(month(1) + 2 * HOUR)
        await s.advance(month(2) + 2 * HOUR)
        await s.advance(month(3) + 2 * HOUR)


async def renewals_that_roll_over(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "roll")
    await s.spend(300)
    async with s.step(seed):
        await s.advance(month(1) + 2 * HOUR)
    await s.spend(100)
    async with s.step(seed):  # two renewals' events together: the cap must hold either way
        await s.advance(month(2) + 2 * HOUR)
        await s.advance(month(3) + 2 * HOUR)


UPGRADED_AT = START + 10 * DAY + 5 * HOUR


async def upgrade_then_downgrade(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    await s.spend(200)
    async with s.step(seed):
        await s.advance(UPGRADED_AT)
        result = await s.change_plan("pro")
        assert result["__typename"] == "SubscriptionChanged", result
    async with s.step(seed):
        await s.advance(START + 20 * DAY)
        result = await s.change_plan("basic")
        assert result["__typename"] == "SubscriptionChanged", result
    async with s.step(seed):
        await s.advance(month(1) + 2 * HOUR)


async def failed_renewal_that_recovers(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    async with s.step(seed):
        await s.set_card(DECLINES_LATER)
    async with s.step(seed):
        await s.advance(month(1) + HOUR)
    async with s.step(seed):
        await s.set_card(GOOD_CARD)
        await s.advance(month(1) + HOUR + 3 * DAY)


async def out_of_grace_then_paid(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    async with s.step(seed):
        await s.set_card(DECLINES_LATER)
        await s.advance(month(1) + HOUR)
    async with s.step(seed):
        await s.advance(month(1) + HOUR + GRACE + 1)
        await s.end_grace()
    url = (await s.stripe_invoices())[-1].hosted_invoice_url
    assert url is not None
    async with s.step(seed):
        paid = await s.press(url, GOOD_CARD)
        assert paid.status_code == 303, paid.text


async def pause_resume_cancel_at_period_end(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    async with s.step(seed):
        await s.advance(START + 2 * DAY)
        assert (await s.pause())["__typename"] == "SubscriptionChanged"
    async with s.step(seed):
        await s.advance(month(1) + 2 * HOUR)
    async with s.step(seed):
        assert (await s.resume())["__typename"] == "SubscriptionChanged"
    async with s.step(seed):
        await s.advance(month(2) + 2 * HOUR)
    async with s.step(seed):
        assert (await s.cancel())["__typename"] == "SubscriptionChanged"
    async with s.step(seed):
        await s.advance(month(3) + 2 * HOUR)


async def cancel_now(s: Subscriber, seed: int | None) -> None:
    await subscribe(s, seed, "basic")
    await s.spend(100)
    async with s.step(seed):
        await s.advance(START + 3 * DAY)
        assert (await s.cancel(at_period_end=False))["__typename"] == "SubscriptionChanged"
    async with s.step(seed):
        await s.advance(month(1) + 2 * HOUR)


# What the life ends in, in order (a check that the lives are what they claim; the numbers are
# derived in test_lifecycle.py): (status of the last subscription, its plan, balance, grants).
LIVES: dict[str, tuple[Life, tuple[str, str, int, list[int]]]] = {
    "renewals that expire": (renewals_that_expire, ("active", "basic", 1000, [1000] * 4)),
    "everything held for three renewals": (
        everything_held_for_three_renewals,
        ("active", "basic", 1000, [1000] * 4),
    ),
    "renewals that roll over up to the cap": (renewals_that_roll_over, ("active", "roll", 2500, [1000] * 4)),
    "an upgrade, then a downgrade at the renewal": (
        upgrade_then_downgrade,
        (
            "active",
            "basic",
            1000,
            [1000, prorated_tokens(1000, 3000, START + 10 * DAY + 5 * HOUR, START, month(1)), 1000],
        ),
    ),
    "a failed renewal that recovers": (failed_renewal_that_recovers, ("active", "basic", 1000, [1000, 1000])),
    "out of grace, then paid": (out_of_grace_then_paid, ("canceled", "basic", 1000, [1000, 1000])),
    "pause, resume, cancel at period end": (
        pause_resume_cancel_at_period_end,
        ("canceled", "basic", 0, [1000, 1000]),
    ),
    "cancel now": (cancel_now, ("canceled", "basic", 0, [1000])),
}


async def plans(s: Subscriber) -> None:
    await s.plan("basic", tokens=1000, price=1000)
    await s.plan("pro", tokens=3000, price=3000)
    await s.plan("roll", tokens=1000, price=2000, rollover="ROLLOVER", rolloverCap=1500)


def differences(expected: dict[str, Any], got: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (expected[key], got.get(key)) for key in expected if expected[key] != got.get(key)}


@pytest.mark.parametrize("name", list(LIVES))
async def test_held_duplicated_and_shuffled_events_end_as_in_order(subscriber: Subscriber, name: str) -> None:
    life, (status, plan, balance, grants) = LIVES[name]
    await plans(subscriber)
    await life(subscriber, None)
    in_order = await subscriber.state()
    last = in_order["subscriptions"][-1]
    assert (last["status"], last["plan"], in_order["wallet"]["balance"], await subscriber.grants()) == (
        status,
        plan,
        balance,
        grants,
    ), in_order

    for seed in SEEDS:
        other = await subscriber.another()
        await life(other, seed)
        shuffled = await other.state()
        assert shuffled == in_order, (seed, differences(in_order, shuffled))
        assert [row for row in await other.shop.stripe_events() if row.error is not None] == []
        assert await other.shop.violations() == {}
