"""POST /webhooks/stripe, fed by the app's own Stripe simulator through the real SDK: verified,
stored once, handled once, in the same transaction as its effect."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from orgwallet.payments.simulator import stripe_signature
from orgwallet.payments.simulator.delivery import encode_event
from tests.purchasing import DECLINED_CARD, Shop, session_id


def hold_deliveries(shop: Shop) -> None:
    """Stripe keeps its events to itself until ``deliver`` sends them (in a chosen order)."""
    shop.simulator.enabled_events = frozenset()


async def deliver(shop: Shop, *event_types: str, times: int = 1) -> None:
    for event_type in event_types:
        for event in await shop.simulator.events(event_type):
            await shop.simulator.redeliver(event["id"], times=times)
        await shop.drain()


def signed(
    shop: Shop, event: dict[str, Any], *, secret: str | None = None, at: int | None = None
) -> dict[str, str]:
    payload = encode_event(event)
    secret = secret or shop.app.state.runtime.settings.webhook_secret
    return {"Stripe-Signature": stripe_signature(payload, secret, int(time.time()) if at is None else at)}


async def post(shop: Shop, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return await shop.client.http.post(
        "/webhooks/stripe", content=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


async def outcomes(shop: Shop) -> dict[str, list[str | None]]:
    found: dict[str, list[str | None]] = {}
    for row in await shop.stripe_events():
        found.setdefault(row.type, []).append(row.outcome)
    return found


async def paid_event(shop: Shop) -> dict[str, Any]:
    """A checkout of 50 tokens, paid while deliveries are held: its completed event."""
    hold_deliveries(shop)
    _, url = await shop.checkout(package="tokens-50")
    await shop.pay(url)
    [event] = await shop.simulator.events("checkout.session.completed")
    return event


class TestVerification:
    """Nothing that fails verification is stored, nothing is credited: 400."""

    @pytest.mark.parametrize("how", ["bad signature", "missing header", "stale timestamp", "wrong secret"])
    async def test_refused(self, shop: Shop, how: str) -> None:
        event = await paid_event(shop)
        body = encode_event(event)
        headers = signed(shop, event)
        if how == "bad signature":
            headers = {"Stripe-Signature": headers["Stripe-Signature"][:-4] + "0000"}
        elif how == "missing header":
            headers = {}
        elif how == "stale timestamp":
            headers = signed(shop, event, at=int(time.time()) - 301)
        else:
            headers = signed(shop, event, secret="whsec_someone_else")
        response = await post(shop, body, headers)
        assert response.status_code == 400, response.text
        assert await shop.stripe_events() == []
        assert await shop.purchase_entries() == []

    @pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"object": "event"}', b"\xff\xfe"])
    async def test_signed_body_that_is_not_an_event(self, shop: Shop, body: bytes) -> None:
        secret = shop.app.state.runtime.settings.webhook_secret
        headers = {"Stripe-Signature": stripe_signature(body, secret, int(time.time()))}
        response = await post(shop, body, headers)
        assert response.status_code == 400
        assert await shop.stripe_events() == []

    async def test_a_tampered_amount_is_refused(self, shop: Shop) -> None:
        event = await paid_event(shop)
        headers = signed(shop, event)
        event["data"]["object"]["amount_total"] = 1
        assert (await post(shop, encode_event(event), headers)).status_code == 400
        assert await shop.stripe_events() == []

    async def test_the_simulators_own_forgeries_are_refused_and_retried(self, shop: Shop) -> None:
        event = await paid_event(shop)
        await shop.simulator.redeliver(event["id"], secret="whsec_wrong")
        await shop.simulator.redeliver(event["id"], timestamp=int(time.time()) - 3600)
        await shop.drain()
        attempts = [a for a in shop.simulator.webhooks.attempts if a.event_id == event["id"]]
        assert attempts and {a.status_code for a in attempts} == {400}
        assert len(attempts) == 2 * 4  # each retried three times, then given up
        assert await shop.stripe_events() == []


class TestCredit:
    async def test_checkout_paid_credits_once_with_receipt(self, shop: Shop) -> None:
        before = await shop.balance()
        purchase, url = await shop.checkout(package="tokens-50")
        assert purchase["status"] == "PENDING"
        await shop.pay(url)
        assert await shop.balance() == before + 50
        paid = await shop.purchase(purchase["id"])
        assert paid["status"] == "PAID"
        assert paid["paidAt"] is not None
        assert paid["receiptUrl"].startswith("http://127.0.0.1:8000/_stripe/receipts/ch_")
        assert await shop.purchase_entries() == [("purchase", 50)]
        found = await outcomes(shop)
        assert found["checkout.session.completed"] == ["credited"] or found["payment_intent.succeeded"] == [
            "credited"
        ]
        assert sorted(found["checkout.session.completed"] + found["payment_intent.succeeded"]) == [
            "already_credited",
            "credited",
        ]
        events = await shop.stripe_events()
        assert all(row.handled_at is not None and row.attempts == 1 for row in events)
        # The receipt is Stripe's (the simulator's) page.
        receipt = await shop.browser.get(paid["receiptUrl"])
        assert receipt.status_code == 200 and "$45.00" in receipt.text
        assert await shop.violations() == {}

    async def test_the_same_event_ten_times_at_once_and_again_later(self, shop: Shop) -> None:
        event = await paid_event(shop)
        await shop.simulator.redeliver(event["id"], times=10)
        await shop.drain()
        statuses = [a.status_code for a in shop.simulator.webhooks.attempts if a.event_id == event["id"]]
        assert statuses == [200] * 10
        assert await shop.purchase_entries() == [("purchase", 50)]
        # Later (signed afresh, as Stripe signs every retry): still once.
        await asyncio.sleep(1.1)
        await shop.simulator.redeliver(event["id"])
        await deliver(shop, "payment_intent.succeeded", "checkout.session.async_payment_succeeded", times=3)
        assert await shop.purchase_entries() == [("purchase", 50)]
        [row] = [r for r in await shop.stripe_events() if r.event_id == event["id"]]
        assert (row.outcome, row.attempts) == ("credited", 1)

    async def test_payment_intent_succeeded_before_checkout_session_completed(self, shop: Shop) -> None:
        hold_deliveries(shop)
        purchase, url = await shop.checkout(tokens=120)
        await shop.pay(url)
        await deliver(shop, "payment_intent.succeeded")
        assert await shop.purchase_entries() == [("purchase", 120)]
        assert (await shop.purchase(purchase["id"]))["status"] == "PAID"
        await deliver(shop, "checkout.session.completed", "charge.succeeded", "payment_intent.succeeded")
        assert await shop.purchase_entries() == [("purchase", 120)]
        found = await outcomes(shop)
        assert found["payment_intent.succeeded"] == ["credited"]
        assert found["checkout.session.completed"] == ["already_credited"]
        assert found["charge.succeeded"] == ["ignored"]

    async def test_concurrent_events_of_one_payment_credit_once(self, shop: Shop) -> None:
        hold_deliveries(shop)
        _, url = await shop.checkout(package="tokens-10")
        await shop.pay(url)
        for event_type in ("checkout.session.completed", "payment_intent.succeeded"):
            for event in await shop.simulator.events(event_type):
                await shop.simulator.redeliver(event["id"], times=5)
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 10)]
        assert await shop.violations() == {}

    async def test_an_event_for_an_unknown_purchase_is_answered_and_credits_nothing(self, shop: Shop) -> None:
        customer = await shop.gateway.create_customer(
            name="stranger", email=None, metadata={}, idempotency_key="stranger"
        )
        link = await shop.gateway.create_payment_checkout(
            customer_id=customer.id,
            purchase_id="00000000-0000-7000-8000-000000000000",
            amount_minor=4500,
            currency="usd",
            product_name="50 tokens",
            success_url="https://x.example/ok",
            cancel_url="https://x.example/no",
            idempotency_key="stranger-checkout",
        )
        await shop.pay(link.url)
        found = await outcomes(shop)
        assert found["checkout.session.completed"] == ["unknown_purchase"]
        assert found["payment_intent.succeeded"] == ["unknown_purchase"]
        assert all(a.succeeded for a in shop.simulator.webhooks.attempts)
        assert await shop.sql("SELECT 1 FROM ledger_entries WHERE kind = 'purchase'") == []

    @pytest.mark.parametrize(
        ("column", "value", "kind"),
        [("amount_minor", 4000, "amount_mismatch"), ("currency", "EUR", "currency_mismatch")],
    )
    async def test_a_payment_that_does_not_match_the_purchase_credits_nothing(
        self, shop: Shop, column: str, value: object, kind: str
    ) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        # The purchase says one thing, the payment another (e.g. a price changed by hand).
        await shop.sql_write(f"UPDATE purchases SET {column} = :value", value=value)  # noqa: S608
        await shop.pay(url)
        assert await shop.purchase_entries() == []
        assert (await shop.purchase(purchase["id"]))["status"] == "PENDING"
        found = await outcomes(shop)
        assert found["checkout.session.completed"] == ["mismatch"]
        assert found["payment_intent.succeeded"] == ["mismatch"]
        alerts = await shop.sql(
            "SELECT kind, expected_amount_minor, received_amount_minor FROM payment_alerts"
        )
        assert {a.kind for a in alerts} == {kind}
        assert len(alerts) == 2
        audit = await shop.sql(
            "SELECT actor FROM audit_log WHERE action = :action", action=f"purchase.{kind}"
        )
        assert [a.actor for a in audit] == ["stripe", "stripe"]
        assert all(a.succeeded for a in shop.simulator.webhooks.attempts)

    async def test_types_without_a_handler_are_stored_and_answered(self, shop: Shop) -> None:
        _, url = await shop.checkout(package="tokens-10")
        await shop.pay(url)
        found = await outcomes(shop)
        assert found["customer.created"] == ["ignored"]
        assert found["payment_method.attached"] == ["ignored"]


class TestNoTokens:
    async def test_a_declined_card_on_the_checkout_page_leaves_it_open(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        page = await shop.press(url, "pay", DECLINED_CARD)
        assert page.status_code == 402 and "declined" in page.text
        await shop.drain()
        after = await shop.purchase(purchase["id"])
        # The buyer may try another card: still PENDING, the decline noted.
        assert after["status"] == "PENDING"
        assert "declined" in after["failureReason"]
        assert await shop.purchase_entries() == []
        # ... and then pay.
        await shop.pay(url)
        assert await shop.purchase_entries() == [("purchase", 50)]
        paid = await shop.purchase(purchase["id"])
        assert (paid["status"], paid["failureReason"]) == ("PAID", None)

    async def test_an_expired_session(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        await shop.gateway.expire_checkout_session(session_id(url))
        await shop.drain()
        assert (await shop.purchase(purchase["id"]))["status"] == "EXPIRED"
        assert await shop.purchase_entries() == []
        assert (await shop.browser.get(url)).status_code == 410

    async def test_an_async_payment_that_fails(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(package="tokens-100")
        await shop.press(url, "pay_async")
        await shop.drain()
        assert (await shop.purchase(purchase["id"]))["status"] == "PENDING"
        await shop.simulator.settle_async_payment(session_id(url), succeeded=False)
        await shop.drain()
        failed = await shop.purchase(purchase["id"])
        assert failed["status"] == "FAILED"
        assert failed["failureReason"]
        assert await shop.purchase_entries() == []
        assert (await outcomes(shop))["checkout.session.completed"] == ["awaiting_payment"]

    async def test_an_async_payment_that_succeeds(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(package="tokens-100")
        await shop.press(url, "pay_async")
        await shop.drain()
        assert await shop.purchase_entries() == []
        await shop.simulator.settle_async_payment(session_id(url), succeeded=True)
        await shop.drain()
        assert (await shop.purchase(purchase["id"]))["status"] == "PAID"
        assert await shop.purchase_entries() == [("purchase", 100)]


class TestRefundsAndDisputes:
    async def paid(self, shop: Shop, package: str = "tokens-50") -> tuple[dict[str, Any], str]:
        purchase, url = await shop.checkout(package=package)
        await shop.pay(url)
        session = await shop.gateway.retrieve_checkout_session(session_id(url))
        assert isinstance(session.payment_intent, str)
        return purchase, session.payment_intent

    async def test_refund_of_an_unspent_purchase(self, shop: Shop) -> None:
        purchase, intent = await self.paid(shop)
        balance = await shop.balance()
        await shop.gateway.create_refund(payment_intent_id=intent, idempotency_key="r1")
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -50)]
        refunded = await shop.purchase(purchase["id"])
        assert (refunded["status"], refunded["refundedMinor"]) == ("REFUNDED", 4500)
        assert (refunded["tokensClawedBack"], refunded["shortfall"]) == (50, 0)
        assert await shop.balance() == balance - 50
        assert await shop.violations() == {}

    async def test_refund_of_a_half_spent_purchase(self, shop: Shop) -> None:
        purchase, intent = await self.paid(shop)
        trial = await shop.balance() - 50  # the trial grant is spent first
        await shop.spend(trial + 25)
        await shop.gateway.create_refund(payment_intent_id=intent, idempotency_key="r1")
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -25)]
        refunded = await shop.purchase(purchase["id"])
        assert (refunded["status"], refunded["tokensClawedBack"], refunded["shortfall"]) == (
            "REFUNDED",
            25,
            25,
        )
        assert await shop.balance() == 0
        assert await shop.violations() == {}

    async def test_partial_refunds_take_back_the_refunded_share(self, shop: Shop) -> None:
        purchase, intent = await self.paid(shop, "tokens-100")
        await shop.gateway.create_refund(payment_intent_id=intent, amount_minor=2250, idempotency_key="r1")
        await shop.drain()
        partly = await shop.purchase(purchase["id"])
        assert (partly["status"], partly["refundedMinor"], partly["tokensClawedBack"]) == (
            "PARTIALLY_REFUNDED",
            2250,
            25,
        )
        await shop.gateway.create_refund(payment_intent_id=intent, idempotency_key="r2")
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 100), ("clawback", -25), ("clawback", -75)]
        fully = await shop.purchase(purchase["id"])
        assert (fully["status"], fully["refundedMinor"], fully["tokensClawedBack"]) == ("REFUNDED", 9000, 100)
        # The first refund's event again (amount_refunded 2250): nothing more.
        [first, _] = await shop.simulator.events("charge.refunded")
        event = {**first, "id": "evt_replayed_refund"}
        assert (await post(shop, encode_event(event), signed(shop, event))).status_code == 200
        assert len(await shop.purchase_entries()) == 3
        assert await shop.violations() == {}

    async def test_a_dispute_takes_back_what_is_left(self, shop: Shop) -> None:
        purchase, intent = await self.paid(shop)
        await shop.spend(await shop.balance() - 40)  # 10 of the 50 purchased are spent
        dispute = await shop.simulator.open_dispute({"payment_intent": intent})
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -40)]
        disputed = await shop.purchase(purchase["id"])
        assert (disputed["status"], disputed["tokensClawedBack"], disputed["shortfall"]) == (
            "DISPUTED",
            40,
            10,
        )
        await shop.simulator.close_dispute(dispute["id"], won=False)
        await shop.drain()
        [row] = await shop.sql("SELECT dispute_status, status FROM purchases")
        assert (row.dispute_status, row.status) == ("lost", "disputed")
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -40)]
        assert await shop.violations() == {}

    async def test_a_refund_that_arrives_before_the_payment_event(self, shop: Shop) -> None:
        hold_deliveries(shop)
        purchase, url = await shop.checkout(package="tokens-50")
        await shop.pay(url)
        session = await shop.gateway.retrieve_checkout_session(session_id(url))
        assert isinstance(session.payment_intent, str)
        await shop.gateway.create_refund(payment_intent_id=session.payment_intent, idempotency_key="r1")
        await deliver(shop, "charge.refunded")
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -50)]
        await deliver(shop, "checkout.session.completed", "payment_intent.succeeded")
        assert await shop.purchase_entries() == [("purchase", 50), ("clawback", -50)]
        assert (await shop.purchase(purchase["id"]))["status"] == "REFUNDED"
        assert await shop.violations() == {}


class TestAFailingHandler:
    async def test_answers_500_keeps_nothing_and_the_retry_succeeds(self, shop: Shop) -> None:
        # The ledger refuses to write a lot while this trigger exists: the credit fails midway.
        await shop.sql_write(
            """
            CREATE FUNCTION refuse_lots() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'disk on fire'; END $$;
            CREATE TRIGGER refuse_lots BEFORE INSERT ON credit_lots
              FOR EACH ROW EXECUTE FUNCTION refuse_lots();
            """
        )
        purchase, url = await shop.checkout(package="tokens-50")
        await shop.pay(url)
        [completed] = await shop.simulator.events("checkout.session.completed")
        attempts = [a.status_code for a in shop.simulator.webhooks.attempts if a.event_id == completed["id"]]
        assert attempts == [500] * 4
        [row] = [r for r in await shop.stripe_events() if r.event_id == completed["id"]]
        assert row.handled_at is None and row.outcome is None
        assert "disk on fire" in row.error
        assert row.attempts == 4
        assert await shop.purchase_entries() == []
        assert (await shop.purchase(purchase["id"]))["status"] == "PENDING"

        await shop.sql_write("DROP TRIGGER refuse_lots ON credit_lots; DROP FUNCTION refuse_lots();")
        await shop.simulator.redeliver(completed["id"])
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 50)]
        [row] = [r for r in await shop.stripe_events() if r.event_id == completed["id"]]
        assert (row.outcome, row.attempts) == ("credited", 5)
        assert row.handled_at is not None
        assert (await shop.purchase(purchase["id"]))["status"] == "PAID"

    async def test_a_stored_failure_is_not_a_duplicate_for_concurrent_retries(self, shop: Shop) -> None:
        event = await paid_event(shop)
        await shop.sql_write(
            """
            INSERT INTO stripe_events (event_id, type, payload, error)
            VALUES (:id, 'checkout.session.completed', CAST(:payload AS jsonb), 'earlier failure')
            """,
            id=event["id"],
            payload=json.dumps(event),
        )
        await shop.simulator.redeliver(event["id"], times=5)
        await shop.drain()
        assert await shop.purchase_entries() == [("purchase", 50)]
        [row] = [r for r in await shop.stripe_events() if r.event_id == event["id"]]
        assert (row.outcome, row.attempts) == ("credited", 2)
