"""A past-due subscription that ends before its grace does (its holder cancels it, or Stripe's
own retries run out first) keeps its grace: the wallet is suspended when the grace passes
unpaid, and the invoice paid before or after that undoes it."""

from __future__ import annotations

from typing import Any

from tests.subscriptions.harness import DAY, DECLINES_LATER, GOOD_CARD, HOUR, Subscriber, epoch, month
from tests.subscriptions.test_lifecycle import GRACE, invoices

GRACE_ENDS = month(1) + HOUR + GRACE


async def canceled_while_past_due(s: Subscriber) -> tuple[str, dict[str, Any]]:
    """Subscribed at START; the renewal fails (month(1) + 1 h); the owner cancels at once. The
    subscription's id and its unpaid renewal invoice."""
    await s.plan("basic", tokens=1000, price=1000)
    await s.start("basic")
    await s.set_card(DECLINES_LATER)
    await s.advance(month(1) + HOUR)
    sub = await s.subscription()
    assert (sub["status"], epoch(sub["graceEndsAt"])) == ("PAST_DUE", GRACE_ENDS)
    result = await s.cancel(at_period_end=False)
    assert result["__typename"] == "SubscriptionChanged", result
    ended = result["subscription"]
    assert (ended["status"], epoch(ended["graceEndsAt"])) == ("CANCELED", GRACE_ENDS)
    await s.drain()
    renewal = invoices(sub)[0]
    assert renewal["status"] == "open"
    return str(sub["id"]), renewal


async def test_canceled_unpaid_the_wallet_is_suspended_when_the_grace_passes(subscriber: Subscriber) -> None:
    s = subscriber
    subscription_id, renewal = await canceled_while_past_due(s)
    assert await s.current() is None  # organization.subscription: none live

    await s.advance(GRACE_ENDS - 1)
    await s.end_grace()
    assert await s.wallet_status() == "ACTIVE"

    await s.advance(GRACE_ENDS + 1)
    assert (await s.end_grace()) == "ended 1 of 1"
    assert (await s.end_grace()) == "ended 0 of 0"
    assert await s.wallet_status() == "SUSPENDED"
    kinds = await s.notification_kinds("WALLET_SUSPENDED", "SUBSCRIPTION_CANCELED")
    assert sorted(kinds) == ["SUBSCRIPTION_CANCELED", "WALLET_SUSPENDED"]  # canceled told once

    paid = await s.pay_invoice_page(renewal["hostedInvoiceUrl"], GOOD_CARD)
    assert paid.status_code == 303, paid.text
    assert await s.wallet_status() == "ACTIVE"
    ended = await s.node(subscription_id)
    assert ended is not None and (ended["status"], ended["graceEndsAt"]) == ("CANCELED", None)


async def test_paid_within_the_grace_nothing_is_suspended(subscriber: Subscriber) -> None:
    s = subscriber
    subscription_id, renewal = await canceled_while_past_due(s)
    await s.advance(month(1) + 2 * DAY)
    paid = await s.pay_invoice_page(renewal["hostedInvoiceUrl"], GOOD_CARD)
    assert paid.status_code == 303, paid.text
    ended = await s.node(subscription_id)
    assert ended is not None and (ended["status"], ended["graceEndsAt"]) == ("CANCELED", None)
    assert await s.balance() == 1000  # the period paid for: its tokens

    await s.advance(GRACE_ENDS + 1)
    assert (await s.end_grace()) == "ended 0 of 0"
    assert await s.wallet_status() == "ACTIVE"
