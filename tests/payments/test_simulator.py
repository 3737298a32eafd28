"""The simulator's hosted page, test controls, events and webhook delivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe

from orgwallet.payments.gateway import STRIPE_API_VERSION, PaymentDeclined, TransportHTTPClient
from orgwallet.payments.simulator.forms import decode_form
from tests.payments.conftest import API_BASE, CANCEL_URL, FAST_RETRIES, KEYED, SECRET_KEY, StripeWorld, key

AUTHENTICATION_REQUIRED_CARD = "4000 0027 6000 3184"


async def control(world: StripeWorld, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return await world.browser.post(f"{API_BASE}/test/{path}", json=body or {}, headers=KEYED)


class TestHostedCheckoutPage:
    async def test_shows_amount_product_and_buttons(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer(), amount_minor=4500)
        page = await stripe_world.browser.get(link.url)
        assert page.status_code == 200
        for text in (
            "$45.00",
            "50 tokens",
            "card_number",
            "value='pay'",
            "value='decline'",
            "value='cancel'",
        ):
            assert text in page.text

    async def test_pay_completes_and_delivers_verified_events(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.payment_checkout(customer_id, purchase_id="pur-1", amount_minor=4500)
        response = await stripe_world.submit(link, "pay", "4242 4242 4242 4242")
        assert response.status_code == 303
        assert response.headers["location"] == f"https://app.example/purchases/done?session={link.session_id}"

        events = await stripe_world.delivered_events()
        types = [event.type for event in events]
        for expected in ("payment_intent.succeeded", "charge.succeeded", "checkout.session.completed"):
            assert types.count(expected) == 1, types
        [completed] = [e for e in events if e.type == "checkout.session.completed"]
        session = completed.data.object
        assert completed.id.startswith("evt_") and completed.livemode is False
        assert (session["id"], session["payment_status"], session["amount_total"]) == (
            link.session_id,
            "paid",
            4500,
        )
        assert session["metadata"].to_dict() == {"purchase_id": "pur-1"}
        [succeeded] = [e for e in events if e.type == "payment_intent.succeeded"]
        assert succeeded.data.object["id"] == session["payment_intent"]
        assert succeeded.data.object["metadata"].to_dict() == {"purchase_id": "pur-1"}
        [card] = await stripe_world.gateway.list_payment_methods(customer_id)
        assert card.card is not None and card.card.last4 == "4242"

        again = await stripe_world.browser.get(link.url)
        assert "complete" in again.text

    async def test_decline_leaves_the_session_open_and_a_retry_can_pay(
        self, stripe_world: StripeWorld
    ) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.payment_checkout(customer_id)
        response = await stripe_world.submit(link, "pay", "4000 0000 0000 0002")
        assert response.status_code == 402
        assert "Your card was declined." in response.text
        declined = await stripe_world.submit(link, "decline")
        assert declined.status_code == 402

        [first, second] = await stripe_world.delivered("payment_intent.payment_failed")
        error = first.data.object["last_payment_error"]
        assert (error["code"], error["decline_code"]) == ("card_declined", "generic_decline")
        assert first.data.object["id"] == second.data.object["id"]
        session = await stripe_world.gateway.retrieve_checkout_session(link.session_id)
        assert (session.status, session.payment_status) == ("open", "unpaid")
        assert await stripe_world.gateway.list_payment_methods(customer_id) == []
        assert await stripe_world.delivered("checkout.session.completed") == []

        paid = await stripe_world.submit(link, "pay", "4242424242424242")
        assert paid.status_code == 303
        [succeeded] = await stripe_world.delivered("payment_intent.succeeded")
        assert succeeded.data.object["id"] == first.data.object["id"]

    async def test_a_number_that_is_not_a_card(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        response = await stripe_world.submit(link, "pay", "1234 5678")
        assert response.status_code == 402 and "Your card number is incorrect." in response.text

    async def test_cancel_redirects_and_changes_nothing(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        await stripe_world.simulator.drain()
        before = len(stripe_world.inbox.deliveries)
        response = await stripe_world.submit(link, "cancel")
        assert (response.status_code, response.headers["location"]) == (303, CANCEL_URL)
        session = await stripe_world.gateway.retrieve_checkout_session(link.session_id)
        assert session.status == "open"
        await stripe_world.simulator.drain()
        assert len(stripe_world.inbox.deliveries) == before

    async def test_unknown_session(self, stripe_world: StripeWorld) -> None:
        page = await stripe_world.browser.get(f"{API_BASE}/checkout/cs_test_nope")
        assert page.status_code == 404


@pytest.fixture
async def sdk(stripe_world: StripeWorld) -> AsyncIterator[stripe.StripeClient]:
    """The plain SDK on the simulator, to see Stripe's own errors (the gateway wraps them)."""
    http_client = TransportHTTPClient(stripe_world.transport)
    yield stripe.StripeClient(
        SECRET_KEY,
        stripe_version=STRIPE_API_VERSION,
        base_addresses={"api": API_BASE},
        http_client=http_client,
        max_network_retries=0,
    )
    await http_client.close_async()


class TestAuthenticationRequiredCard:
    """4000 0027 6000 3184: saved and paid on-session fine; charged off-session, it needs the
    customer to authenticate, so Stripe declines it with ``authentication_required``."""

    async def test_saved_then_charged_off_session_requires_authentication(
        self, stripe_world: StripeWorld, sdk: stripe.StripeClient
    ) -> None:
        customer_id = await stripe_world.customer()
        payment_method_id = await stripe_world.save_card(customer_id, AUTHENTICATION_REQUIRED_CARD)
        [saved] = await stripe_world.gateway.list_payment_methods(customer_id)
        assert saved.id == payment_method_id and saved.card is not None and saved.card.last4 == "3184"
        assert await stripe_world.delivered("setup_intent.succeeded")

        with pytest.raises(stripe.CardError) as raised:
            await sdk.v1.payment_intents.create_async(
                {
                    "amount": 9000,
                    "currency": "usd",
                    "customer": customer_id,
                    "payment_method": payment_method_id,
                    "off_session": True,
                    "confirm": True,
                    "metadata": {"purchase_id": "pur-3ds"},
                },
                {"idempotency_key": key("off-3ds")},
            )
        error = raised.value
        assert (error.http_status, error.code) == (402, "authentication_required")
        assert error.error is not None
        assert error.error.decline_code == "authentication_required"
        assert error.error.message == "Your card was declined. This transaction requires authentication."
        body_intent = error.error.payment_intent
        assert body_intent is not None and body_intent.status == "requires_payment_method"
        assert body_intent.last_payment_error is not None
        assert body_intent.last_payment_error.code == "authentication_required"
        assert error.error.charge is not None and error.error.charge.startswith("ch_")

        intent = await sdk.v1.payment_intents.retrieve_async(body_intent.id)
        assert (intent.status, intent.payment_method, intent.latest_charge) == (
            "requires_payment_method",
            None,
            error.error.charge,
        )
        assert intent.last_payment_error is not None
        assert (intent.last_payment_error.code, intent.last_payment_error.decline_code) == (
            "authentication_required",
            "authentication_required",
        )
        charge = await sdk.v1.charges.retrieve_async(error.error.charge)
        assert (charge.status, charge.failure_code) == ("failed", "authentication_required")

        [failed] = await stripe_world.delivered("payment_intent.payment_failed")
        assert failed.data.object["id"] == intent.id
        assert failed.data.object["metadata"].to_dict() == {"purchase_id": "pur-3ds"}
        last_error = failed.data.object["last_payment_error"]
        assert (last_error["code"], last_error["decline_code"]) == (
            "authentication_required",
            "authentication_required",
        )
        assert await stripe_world.delivered("payment_intent.succeeded") == []

    async def test_the_gateway_reports_it_as_a_decline(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        payment_method_id = await stripe_world.save_card(customer_id, AUTHENTICATION_REQUIRED_CARD)
        with pytest.raises(PaymentDeclined) as raised:
            await stripe_world.gateway.charge_saved_payment_method(
                customer_id=customer_id,
                payment_method_id=payment_method_id,
                amount_minor=9000,
                currency="usd",
                metadata={"purchase_id": "pur-3ds"},
                idempotency_key=key("off-3ds"),
            )
        declined = raised.value
        assert (declined.stripe_code, declined.decline_code) == (
            "authentication_required",
            "authentication_required",
        )
        assert declined.payment_intent_id is not None
        intent = await stripe_world.gateway.retrieve_payment_intent(declined.payment_intent_id)
        assert intent.status == "requires_payment_method"

    async def test_paid_on_the_checkout_page_succeeds(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.payment_checkout(customer_id, amount_minor=4500)
        response = await stripe_world.submit(link, "pay", AUTHENTICATION_REQUIRED_CARD)
        assert response.status_code == 303, response.text
        session = await stripe_world.gateway.retrieve_checkout_session(link.session_id)
        assert (session.status, session.payment_status) == ("complete", "paid")
        [succeeded] = await stripe_world.delivered("payment_intent.succeeded")
        assert succeeded.data.object["id"] == session.payment_intent
        assert await stripe_world.delivered("payment_intent.payment_failed") == []

    async def test_confirmed_on_session_through_the_api_succeeds(
        self, stripe_world: StripeWorld, sdk: stripe.StripeClient
    ) -> None:
        # The simulator has no 3-D Secure step: a customer present is taken to authenticate.
        customer_id = await stripe_world.customer()
        payment_method_id = await stripe_world.save_card(customer_id, AUTHENTICATION_REQUIRED_CARD)
        intent = await sdk.v1.payment_intents.create_async(
            {
                "amount": 9000,
                "currency": "usd",
                "customer": customer_id,
                "payment_method": payment_method_id,
                "confirm": True,
            }
        )
        assert intent.status == "succeeded"


class TestAsyncPayment:
    async def start(self, world: StripeWorld) -> str:
        link = await world.payment_checkout(await world.customer(), purchase_id="pur-bank")
        response = await world.submit(link, "pay_async")
        assert response.status_code == 303
        [completed] = await world.delivered("checkout.session.completed")
        assert completed.data.object["payment_status"] == "unpaid"
        assert await world.delivered("payment_intent.succeeded") == []
        return link.session_id

    async def test_succeeds_later(self, stripe_world: StripeWorld) -> None:
        session_id = await self.start(stripe_world)
        response = await control(
            stripe_world, f"checkout_sessions/{session_id}/async_payment", {"outcome": "succeeded"}
        )
        assert response.status_code == 200 and response.json()["payment_status"] == "paid"
        [event] = await stripe_world.delivered("checkout.session.async_payment_succeeded")
        assert event.data.object["metadata"].to_dict() == {"purchase_id": "pur-bank"}
        assert event.data.object["payment_status"] == "paid"
        [succeeded] = await stripe_world.delivered("payment_intent.succeeded")
        assert succeeded.data.object["id"] == event.data.object["payment_intent"]

    async def test_fails_later(self, stripe_world: StripeWorld) -> None:
        session_id = await self.start(stripe_world)
        response = await control(
            stripe_world, f"checkout_sessions/{session_id}/async_payment", {"outcome": "failed"}
        )
        assert response.status_code == 200
        [event] = await stripe_world.delivered("checkout.session.async_payment_failed")
        assert event.data.object["payment_status"] == "unpaid"
        assert await stripe_world.delivered("payment_intent.payment_failed")
        again = await control(
            stripe_world, f"checkout_sessions/{session_id}/async_payment", {"outcome": "failed"}
        )
        assert again.status_code == 400


class TestTestControls:
    async def paid_session(self, world: StripeWorld, amount_minor: int = 9000) -> dict[str, Any]:
        link = await world.payment_checkout(await world.customer(), amount_minor=amount_minor)
        response = await control(
            world, f"checkout_sessions/{link.session_id}/pay", {"card_number": "4242424242424242"}
        )
        assert response.status_code == 200, response.text
        session: dict[str, Any] = response.json()
        return session

    async def test_pay_and_decline(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        declined = await control(stripe_world, f"checkout_sessions/{link.session_id}/decline")
        assert declined.status_code == 402
        assert declined.json()["error"]["decline_code"] == "generic_decline"
        paid = await control(stripe_world, f"checkout_sessions/{link.session_id}/pay")
        assert paid.json()["status"] == "complete"

    async def test_expire(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        response = await control(stripe_world, f"checkout_sessions/{link.session_id}/expire")
        assert response.json()["status"] == "expired"
        assert await stripe_world.delivered("checkout.session.expired")
        pay = await control(stripe_world, f"checkout_sessions/{link.session_id}/pay")
        assert pay.status_code == 400

    async def test_refund_full_and_partial(self, stripe_world: StripeWorld) -> None:
        session = await self.paid_session(stripe_world, 9000)
        intent_id = session["payment_intent"]
        part = await control(stripe_world, "refunds", {"payment_intent": intent_id, "amount": 4000})
        assert part.status_code == 200 and part.json()["amount"] == 4000
        intent = await stripe_world.gateway.retrieve_payment_intent(intent_id)
        assert isinstance(intent.latest_charge, str)
        rest = await control(stripe_world, "refunds", {"charge": intent.latest_charge})
        assert rest.json()["amount"] == 5000
        refunded = await stripe_world.delivered("charge.refunded")
        assert [e.data.object["amount_refunded"] for e in refunded] == [4000, 9000]
        assert refunded[0].data.previous_attributes["amount_refunded"] == 0
        too_much = await control(stripe_world, "refunds", {"payment_intent": intent_id, "amount": 1})
        assert too_much.status_code == 400

    async def test_dispute_opened_and_closed(self, stripe_world: StripeWorld) -> None:
        session = await self.paid_session(stripe_world, 9000)
        opened = await control(stripe_world, "disputes", {"payment_intent": session["payment_intent"]})
        assert opened.status_code == 200
        dispute = opened.json()
        assert dispute["id"].startswith("dp_") and dispute["status"] == "needs_response"
        [created] = await stripe_world.delivered("charge.dispute.created")
        assert created.data.object["payment_intent"] == session["payment_intent"]
        assert created.data.object["amount"] == 9000
        no_refund = await control(stripe_world, "refunds", {"payment_intent": session["payment_intent"]})
        assert no_refund.json()["error"]["code"] == "charge_disputed"

        closed = await control(stripe_world, f"disputes/{dispute['id']}/close", {"outcome": "lost"})
        assert closed.json()["status"] == "lost"
        [event] = await stripe_world.delivered("charge.dispute.closed")
        assert (event.data.object["status"], event.data.previous_attributes["status"]) == (
            "lost",
            "needs_response",
        )
        again = await control(stripe_world, f"disputes/{dispute['id']}/close", {"outcome": "won"})
        assert again.status_code == 400

    async def test_dispute_won(self, stripe_world: StripeWorld) -> None:
        session = await self.paid_session(stripe_world)
        dispute = (
            await control(stripe_world, "disputes", {"payment_intent": session["payment_intent"]})
        ).json()
        closed = await control(stripe_world, f"disputes/{dispute['id']}/close", {"outcome": "won"})
        assert closed.json()["status"] == "won"
        assert await stripe_world.delivered("charge.dispute.funds_reinstated")

    async def test_save_a_test_card_on_a_customer(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        saved = await control(
            stripe_world, f"customers/{customer_id}/payment_methods", {"card_number": "4000000000000341"}
        )
        assert saved.status_code == 200 and saved.json()["customer"] == customer_id
        refused = await control(
            stripe_world, f"customers/{customer_id}/payment_methods", {"card_number": "4000000000000002"}
        )
        assert refused.status_code == 402

    async def test_list_events_with_their_deliveries(self, stripe_world: StripeWorld) -> None:
        await self.paid_session(stripe_world)
        await stripe_world.simulator.drain()
        listed = (
            await stripe_world.browser.get(
                f"{API_BASE}/test/events?type=checkout.session.completed", headers=KEYED
            )
        ).json()
        [event] = listed["data"]
        [attempt] = event["deliveries"]
        assert (attempt["attempt"], attempt["status_code"], attempt["succeeded"]) == (1, 200, True)


class TestWebhookDelivery:
    async def test_failed_deliveries_are_retried_until_accepted(self, stripe_world: StripeWorld) -> None:
        stripe_world.inbox.answers = [500, ConnectionError("refused")]
        await stripe_world.customer()
        await stripe_world.simulator.drain()
        attempts = stripe_world.simulator.webhooks.attempts
        assert [(a.attempt, a.status_code, a.succeeded) for a in attempts] == [
            (1, 500, False),
            (2, None, False),
            (3, 200, True),
        ]
        assert attempts[1].error is not None and "refused" in attempts[1].error
        # Each attempt is signed afresh and verifies.
        for payload, headers in stripe_world.inbox.deliveries:
            assert (
                stripe_world.gateway.construct_event(payload, headers["Stripe-Signature"]).type
                == "customer.created"
            )

    async def test_retries_are_bounded(self, stripe_world: StripeWorld) -> None:
        stripe_world.inbox.answers = [503] * 10
        await stripe_world.customer()
        await stripe_world.simulator.drain()
        attempts = stripe_world.simulator.webhooks.attempts
        assert len(attempts) == len(FAST_RETRIES) + 1
        assert not any(a.succeeded for a in attempts)

    async def test_delivery_does_not_block_the_request(self, stripe_world: StripeWorld) -> None:
        release = asyncio.Event()

        async def slow_receiver(payload: bytes, headers: object) -> int:
            await release.wait()
            return 200

        stripe_world.simulator.webhook_target = slow_receiver
        customer_id = await asyncio.wait_for(stripe_world.customer(), timeout=5)
        assert customer_id and stripe_world.simulator.webhooks.pending == 1
        release.set()
        await stripe_world.simulator.drain()
        assert stripe_world.simulator.webhooks.pending == 0

    async def test_an_event_delivered_many_times_at_once(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        await stripe_world.submit(link, "pay", "4242424242424242")
        [completed] = await stripe_world.delivered("checkout.session.completed")
        response = await control(stripe_world, f"events/{completed.id}/deliver", {"times": 10})
        assert response.status_code == 200
        copies = await stripe_world.delivered("checkout.session.completed")
        assert len(copies) == 11
        assert {event.id for event in copies} == {completed.id}

    async def test_redeliver_unknown_event(self, stripe_world: StripeWorld) -> None:
        response = await control(stripe_world, "events/evt_nope/deliver")
        assert response.status_code == 404

    async def test_enabled_events_filter_deliveries_but_all_are_recorded(
        self, stripe_world: StripeWorld
    ) -> None:
        stripe_world.simulator.enabled_events = frozenset({"checkout.session.completed"})
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        await stripe_world.submit(link, "pay", "4242424242424242")
        assert [e.type for e in await stripe_world.delivered_events()] == ["checkout.session.completed"]
        assert await stripe_world.simulator.events("payment_intent.succeeded")


class TestDecodeForm:
    def test_nested_keys_and_arrays(self) -> None:
        body = (
            "mode=payment&metadata[purchase_id]=p1&line_items[0][quantity]=1"
            "&line_items[0][price_data][product_data][name]=50+tokens&expand[0]=a&expand[1]=b.c"
            "&metadata[empty]="
        )
        assert decode_form(body) == {
            "mode": "payment",
            "metadata": {"purchase_id": "p1", "empty": ""},
            "line_items": [{"quantity": "1", "price_data": {"product_data": {"name": "50 tokens"}}}],
            "expand": ["a", "b.c"],
        }

    def test_empty_brackets_append(self) -> None:
        assert decode_form("expand[]=a&expand[]=b") == {"expand": ["a", "b"]}

    def test_bad_key(self) -> None:
        from orgwallet.payments.simulator import StripeApiError

        with pytest.raises(StripeApiError):
            decode_form("a]b=1")
