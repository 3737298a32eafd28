"""A dispute closed as won gives back what its opening took back, and only that: once, whatever
is delivered twice, concurrently or out of order; the purchase shows the outcome. A lost
dispute leaves the tokens taken back. Driven by the app's own Stripe simulator."""

from __future__ import annotations

from typing import Any

from tests.purchasing import Shop, session_id

DISPUTED = """query($id: ID!) { purchase(id: $id) {
  status tokensClawedBack shortfall refundedMinor
  dispute { status amountMinor tokensTakenBack tokensReturned openedAt closedAt } } }"""
NOTIFICATIONS = """query($org: ID!) { organization(id: $org) { notifications(first: 50) {
  edges { node { kind title body data } } } } }"""


async def paid(shop: Shop, package: str = "tokens-50") -> tuple[dict[str, Any], str]:
    """A paid purchase (its events delivered) and its payment intent."""
    purchase, url = await shop.checkout(package=package)
    await shop.pay(url)
    session = await shop.gateway.retrieve_checkout_session(session_id(url))
    assert isinstance(session.payment_intent, str)
    return purchase, session.payment_intent


async def disputed(shop: Shop, purchase: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = (await shop.client.data(DISPUTED, {"id": purchase["id"]}, as_=shop.owner))[
        "purchase"
    ]
    return found


async def purchase_entries(shop: Shop) -> list[tuple[str, int]]:
    """(kind, amount) of the wallet's purchase, clawback and give-back entries, in order."""
    rows = await shop.sql(
        """
        SELECT e.kind, e.amount FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id
        WHERE w.organization_id = :org AND e.kind IN ('purchase', 'clawback', 'adjustment')
        ORDER BY e.seq
        """,
        org=shop.org_id,
    )
    return [(row.kind, int(row.amount)) for row in rows]


async def told(shop: Shop, kind: str) -> list[dict[str, Any]]:
    data = await shop.client.data(NOTIFICATIONS, {"org": shop.org}, as_=shop.owner)
    edges = data["organization"]["notifications"]["edges"]
    return [e["node"] for e in edges if e["node"]["kind"] == kind]


def hold_deliveries(shop: Shop) -> None:
    """Stripe keeps its events to itself until they are sent again (in a chosen order)."""
    shop.simulator.enabled_events = frozenset()


async def send(shop: Shop, *event_types: str, times: int = 1) -> None:
    """Every event of these types, ``times`` copies each, all at once; then wait for them."""
    for event_type in event_types:
        for event in await shop.simulator.events(event_type):
            await shop.simulator.redeliver(event["id"], times=times)
    await shop.drain()


async def test_won_after_created_gives_back_exactly_what_was_taken(shop: Shop) -> None:
    purchase, intent = await paid(shop)
    await shop.spend(await shop.balance() - 40)  # 10 of the 50 purchased are spent
    before = await shop.balance()
    dispute = await shop.simulator.open_dispute({"payment_intent": intent})
    await shop.drain()
    assert await shop.balance() == before - 40
    opened = await disputed(shop, purchase)
    assert (opened["status"], opened["tokensClawedBack"], opened["shortfall"]) == ("DISPUTED", 40, 10)
    assert opened["dispute"] | {"openedAt": None} == {
        "status": "OPEN",
        "amountMinor": 4500,
        "tokensTakenBack": 40,
        "tokensReturned": 0,
        "openedAt": None,
        "closedAt": None,
    }

    await shop.simulator.close_dispute(dispute["id"], won=True)
    await shop.drain()
    assert await purchase_entries(shop) == [("purchase", 50), ("clawback", -40), ("adjustment", 40)]
    assert await shop.balance() == before
    won = await disputed(shop, purchase)
    assert (won["status"], won["tokensClawedBack"], won["shortfall"]) == ("PAID", 0, 0)
    assert (
        won["dispute"]["status"],
        won["dispute"]["tokensTakenBack"],
        won["dispute"]["tokensReturned"],
    ) == (
        "WON",
        40,
        40,
    )
    assert won["dispute"]["closedAt"] is not None
    [notice] = await told(shop, "PURCHASE_DISPUTE_WON")
    assert notice["data"]["tokensReturned"] == 40 and notice["data"]["reference"] == purchase["reference"]
    assert "40 tokens" in notice["body"]
    [audit] = await shop.sql("SELECT after FROM audit_log WHERE action = 'purchase.dispute_won'")
    assert (audit.after["tokens_returned"], audit.after["status"]) == (40, "paid")
    # The lot the tokens came from has them again: the purchase's own.
    [lot] = await shop.sql(
        "SELECT l.amount, l.remaining FROM credit_lots l JOIN purchases p ON p.lot_id = l.id"
    )
    assert (lot.amount, lot.remaining) == (50, 40)
    assert await shop.violations() == {}


async def test_won_delivered_many_times_at_once_gives_back_once(shop: Shop) -> None:
    purchase, intent = await paid(shop)
    before = await shop.balance()
    hold_deliveries(shop)
    dispute = await shop.simulator.open_dispute({"payment_intent": intent})
    await send(shop, "charge.dispute.created")
    assert await shop.balance() == before - 50
    await shop.simulator.close_dispute(dispute["id"], won=True)
    # Both events that say "won", five copies of each, all in flight together.
    await send(shop, "charge.dispute.funds_reinstated", "charge.dispute.closed", times=5)
    assert await purchase_entries(shop) == [("purchase", 50), ("clawback", -50), ("adjustment", 50)]
    assert await shop.balance() == before
    won = await disputed(shop, purchase)
    assert (won["status"], won["dispute"]["status"], won["dispute"]["tokensReturned"]) == ("PAID", "WON", 50)
    assert len(await told(shop, "PURCHASE_DISPUTE_WON")) == 1
    assert len(await shop.sql("SELECT 1 FROM audit_log WHERE action = 'purchase.dispute_won'")) == 1
    won_types = {"charge.dispute.funds_reinstated", "charge.dispute.closed"}
    outcomes = sorted(row.outcome for row in await shop.stripe_events() if row.type in won_types)
    assert outcomes == ["already_won", "dispute_won"]  # one of the two gave back, once
    assert await shop.violations() == {}


async def test_won_arriving_before_created_ends_as_in_order(shop: Shop) -> None:
    purchase, intent = await paid(shop)
    before = await shop.balance()
    hold_deliveries(shop)
    dispute = await shop.simulator.open_dispute({"payment_intent": intent})
    await shop.simulator.close_dispute(dispute["id"], won=True)
    await send(shop, "charge.dispute.closed", "charge.dispute.funds_reinstated")
    await send(shop, "charge.dispute.created", "charge.dispute.funds_withdrawn")
    assert await shop.balance() == before  # as when they arrive in order: taken, then given back
    assert await purchase_entries(shop) == [("purchase", 50)]
    won = await disputed(shop, purchase)
    assert (won["status"], won["tokensClawedBack"], won["shortfall"]) == ("PAID", 0, 0)
    assert won["dispute"] | {"openedAt": None, "closedAt": None} == {
        "status": "WON",
        "amountMinor": 4500,
        "tokensTakenBack": 0,
        "tokensReturned": 0,
        "openedAt": None,
        "closedAt": None,
    }
    assert await shop.violations() == {}


async def test_partly_refunded_then_disputed_and_won_is_partly_refunded_again(shop: Shop) -> None:
    purchase, intent = await paid(shop, "tokens-100")
    await shop.gateway.create_refund(payment_intent_id=intent, amount_minor=2250, idempotency_key="r1")
    await shop.drain()
    refunded = await shop.balance()
    dispute = await shop.simulator.open_dispute({"payment_intent": intent})  # the 6750 not refunded
    await shop.drain()
    assert await shop.balance() == refunded - 75
    assert (await disputed(shop, purchase))["status"] == "DISPUTED"
    await shop.simulator.close_dispute(dispute["id"], won=True)
    await shop.drain()
    # The dispute's 75 come back; the refund's 25 stay taken back.
    assert await purchase_entries(shop) == [
        ("purchase", 100),
        ("clawback", -25),
        ("clawback", -75),
        ("adjustment", 75),
    ]
    assert await shop.balance() == refunded
    won = await disputed(shop, purchase)
    assert (won["status"], won["refundedMinor"], won["tokensClawedBack"], won["shortfall"]) == (
        "PARTIALLY_REFUNDED",
        2250,
        25,
        0,
    )
    assert (won["dispute"]["amountMinor"], won["dispute"]["tokensReturned"]) == (6750, 75)
    # A later refund of the rest takes back the rest, as if there had been no dispute.
    await shop.gateway.create_refund(payment_intent_id=intent, idempotency_key="r2")
    await shop.drain()
    assert await shop.balance() == refunded - 75
    after = await disputed(shop, purchase)
    assert (after["status"], after["tokensClawedBack"]) == ("REFUNDED", 100)
    assert await shop.violations() == {}


async def test_lost_stays_taken_back(shop: Shop) -> None:
    purchase, intent = await paid(shop)
    before = await shop.balance()
    dispute = await shop.simulator.open_dispute({"payment_intent": intent})
    await shop.drain()
    await shop.simulator.close_dispute(dispute["id"], won=False)
    await shop.drain()
    assert await purchase_entries(shop) == [("purchase", 50), ("clawback", -50)]
    assert await shop.balance() == before - 50
    lost = await disputed(shop, purchase)
    assert (lost["status"], lost["tokensClawedBack"]) == ("DISPUTED", 50)
    assert (
        lost["dispute"]["status"],
        lost["dispute"]["tokensTakenBack"],
        lost["dispute"]["tokensReturned"],
    ) == (
        "LOST",
        50,
        0,
    )
    assert lost["dispute"]["closedAt"] is not None
    assert await told(shop, "PURCHASE_DISPUTE_WON") == []
    assert await shop.violations() == {}


async def test_a_purchase_never_disputed_has_no_dispute(shop: Shop) -> None:
    purchase, _ = await paid(shop)
    assert (await disputed(shop, purchase))["dispute"] is None


async def test_an_inquiry_closed_without_a_chargeback_gives_the_tokens_back(shop: Shop) -> None:
    """Stripe's inquiry (``warning_needs_response``) withdraws no money; the tokens are held while
    the bank asks, and come back when it closes without a chargeback (``warning_closed``)."""
    purchase, intent = await paid(shop)
    before = await shop.balance()
    dispute = await shop.simulator.open_dispute({"payment_intent": intent, "inquiry": "true"})
    assert dispute["status"] == "warning_needs_response"
    await shop.drain()
    assert await shop.simulator.events("charge.dispute.funds_withdrawn") == []
    assert await shop.balance() == before - 50
    assert (await disputed(shop, purchase))["status"] == "DISPUTED"

    closed = await shop.simulator.close_dispute(dispute["id"], won=True)
    assert closed["status"] == "warning_closed"
    await shop.drain()
    await send(shop, "charge.dispute.closed", times=3)  # duplicates give back nothing more
    assert await shop.balance() == before
    found = await disputed(shop, purchase)
    assert (found["status"], found["tokensClawedBack"]) == ("PAID", 0)
    assert (found["dispute"]["status"], found["dispute"]["tokensReturned"]) == ("WON", 50)
    assert await purchase_entries(shop) == [("purchase", 50), ("clawback", -50), ("adjustment", 50)]
    assert len(await told(shop, "PURCHASE_DISPUTE_WON")) == 1
    assert await shop.violations() == {}
