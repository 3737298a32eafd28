"""What Stripe's events tell the organization: a paid, a failed and a refunded purchase are
each one notification, however often and in whatever order the events arrive."""

from __future__ import annotations

from typing import Any

from tests.purchasing import Shop, session_id

NOTIFICATIONS = """query($org: ID!) { organization(id: $org) { notifications(first: 50) {
  edges { node { kind title body data } } } } }"""


async def told(shop: Shop) -> list[dict[str, Any]]:
    data = await shop.client.data(NOTIFICATIONS, {"org": shop.org}, as_=shop.owner)
    return [e["node"] for e in reversed(data["organization"]["notifications"]["edges"])]


async def test_a_paid_purchase_is_told_once_whatever_is_delivered_again(shop: Shop) -> None:
    purchase, url = await shop.checkout(package="tokens-50")
    await shop.pay(url)
    for event in shop.simulator.webhooks.attempts[:]:  # every event of the payment, again
        await shop.simulator.redeliver(event.event_id, times=2)
    await shop.drain()
    [paid] = await told(shop)
    assert paid["kind"] == "PURCHASE_PAID" and paid["title"] == "50 tokens added"
    assert (paid["data"]["reference"], paid["data"]["tokens"]) == (purchase["reference"], 50)


async def test_a_failed_payment_and_a_refund_are_told(shop: Shop) -> None:
    failed, failed_url = await shop.checkout(package="tokens-100")
    await shop.press(failed_url, "pay_async")
    await shop.drain()
    await shop.simulator.settle_async_payment(session_id(failed_url), succeeded=False)
    await shop.drain()
    purchase, url = await shop.checkout(package="tokens-50")
    await shop.pay(url)
    session = await shop.gateway.retrieve_checkout_session(session_id(url))
    assert isinstance(session.payment_intent, str)
    await shop.gateway.create_refund(payment_intent_id=session.payment_intent, idempotency_key="r1")
    await shop.drain()
    kinds = [(n["kind"], n["data"]["reference"]) for n in await told(shop)]
    assert kinds == [
        ("PURCHASE_FAILED", failed["reference"]),
        ("PURCHASE_PAID", purchase["reference"]),
        ("PURCHASE_REFUNDED", purchase["reference"]),
    ]
    refunded = (await told(shop))[-1]
    assert "$45.00" in refunded["body"] and refunded["data"]["tokensTakenBack"] == 50
