"""StripeGateway through the real SDK against the simulator."""

from __future__ import annotations

import pytest
import stripe

from orgwallet.payments.gateway import (
    STRIPE_API_VERSION,
    CheckoutLink,
    PaymentDeclined,
    StripeGateway,
    TransportHTTPClient,
)
from tests.payments.conftest import API_BASE, CANCEL_URL, StripeWorld, key


def test_api_version_is_the_one_the_sdk_is_generated_for() -> None:
    assert stripe.api_version == STRIPE_API_VERSION


class TestCreateCustomer:
    async def test_creates_and_retrieves(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer("Acme Inc")
        assert customer_id.startswith("cus_")
        customer = await stripe_world.gateway.retrieve_customer(customer_id)
        assert customer.name == "Acme Inc"
        assert customer.metadata.to_dict() == {"organization_id": "org-1"}
        assert await stripe_world.gateway.default_payment_method_id(customer_id) is None

    async def test_same_idempotency_key_returns_the_same_customer(self, stripe_world: StripeWorld) -> None:
        gateway = stripe_world.gateway
        first = await gateway.create_customer(name="A", email=None, metadata={}, idempotency_key="org-1-cus")
        again = await gateway.create_customer(name="A", email=None, metadata={}, idempotency_key="org-1-cus")
        assert again.id == first.id
        assert len(await stripe_world.simulator.events("customer.created")) == 1

    async def test_same_key_with_other_parameters_is_refused(self, stripe_world: StripeWorld) -> None:
        gateway = stripe_world.gateway
        await gateway.create_customer(name="A", email=None, metadata={}, idempotency_key="org-2-cus")
        with pytest.raises(stripe.IdempotencyError):
            await gateway.create_customer(name="B", email=None, metadata={}, idempotency_key="org-2-cus")

    async def test_unknown_customer_is_invalid_request(self, stripe_world: StripeWorld) -> None:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            await stripe_world.gateway.retrieve_customer("cus_missing")
        assert raised.value.http_status == 404
        assert raised.value.code == "resource_missing"

    async def test_a_key_that_is_not_a_test_key_is_refused(self, stripe_world: StripeWorld) -> None:
        gateway = StripeGateway(
            "sk_live_nope",
            "whsec_x",
            api_base=API_BASE,
            http_client=TransportHTTPClient(stripe_world.transport),
        )
        with pytest.raises(stripe.AuthenticationError):
            await gateway.create_customer(name=None, email=None, metadata={}, idempotency_key=key("cus"))
        await gateway.close()


class TestCreatePaymentCheckout:
    async def test_session_carries_amount_product_and_purchase(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.payment_checkout(customer_id, purchase_id="pur-42", amount_minor=4500)
        assert link.session_id.startswith("cs_")
        assert link.url == f"{API_BASE}/checkout/{link.session_id}"
        session = await stripe_world.gateway.retrieve_checkout_session(link.session_id)
        assert (session.mode, session.status, session.payment_status) == ("payment", "open", "unpaid")
        assert (session.amount_total, session.currency, session.customer) == (4500, "usd", customer_id)
        assert session.metadata.to_dict() == {"purchase_id": "pur-42"}
        assert session.client_reference_id == "pur-42"
        assert session.cancel_url == CANCEL_URL
        items = (await stripe_world.simulator.checkout_line_items(link.session_id))["data"]
        assert [(i["description"], i["quantity"], i["amount_total"]) for i in items] == [
            ("50 tokens", 1, 4500)
        ]

    async def test_same_idempotency_key_returns_the_same_session(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()

        async def start() -> CheckoutLink:
            return await stripe_world.gateway.create_payment_checkout(
                customer_id=customer_id,
                purchase_id="pur-7",
                amount_minor=1000,
                currency="usd",
                product_name="10 tokens",
                success_url="https://app.example/ok",
                cancel_url=CANCEL_URL,
                idempotency_key="purchase-pur-7-checkout",
            )

        first = await start()
        assert await start() == first

    async def test_paid_session_leads_to_intent_charge_and_receipt(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.payment_checkout(customer_id, purchase_id="pur-9")
        response = await stripe_world.submit(link, "pay", "4242 4242 4242 4242")
        assert response.status_code == 303
        gateway = stripe_world.gateway
        session = await gateway.retrieve_checkout_session(link.session_id)
        assert (session.status, session.payment_status) == ("complete", "paid")
        assert isinstance(session.payment_intent, str)
        intent = await gateway.retrieve_payment_intent(session.payment_intent)
        assert (intent.status, intent.amount_received) == ("succeeded", 4500)
        assert intent.metadata.to_dict() == {"purchase_id": "pur-9"}
        assert isinstance(intent.latest_charge, str)
        charge = await gateway.retrieve_charge(intent.latest_charge)
        assert charge.paid and charge.receipt_url
        assert await gateway.receipt_url(intent.id) == charge.receipt_url
        receipt = await stripe_world.browser.get(charge.receipt_url)
        assert receipt.status_code == 200 and "$45.00" in receipt.text

    async def test_expire(self, stripe_world: StripeWorld) -> None:
        link = await stripe_world.payment_checkout(await stripe_world.customer())
        session = await stripe_world.gateway.expire_checkout_session(link.session_id)
        assert (session.status, session.url) == ("expired", None)
        [event] = await stripe_world.delivered("checkout.session.expired")
        assert event.data.object["metadata"]["purchase_id"] == "pur-1"
        with pytest.raises(stripe.InvalidRequestError):
            await stripe_world.gateway.expire_checkout_session(link.session_id)
        page = await stripe_world.browser.get(link.url)
        assert page.status_code == 410


class TestCreateSetupCheckout:
    async def test_saved_card_becomes_the_default(self, stripe_world: StripeWorld) -> None:
        gateway = stripe_world.gateway
        customer_id = await stripe_world.customer()
        link = await stripe_world.setup_checkout(customer_id)
        page = await stripe_world.browser.get(link.url)
        assert page.status_code == 200 and "Save card" in page.text
        response = await stripe_world.submit(link, "pay", "4242424242424242")
        assert response.status_code == 303

        [completed] = await stripe_world.delivered("checkout.session.completed")
        session = completed.data.object
        assert (session["mode"], session["status"], session["customer"]) == ("setup", "complete", customer_id)
        [succeeded] = await stripe_world.delivered("setup_intent.succeeded")
        assert succeeded.data.object["id"] == session["setup_intent"]
        assert succeeded.data.object["metadata"].to_dict() == {"organization_id": "org-1"}
        payment_method_id = succeeded.data.object["payment_method"]

        [saved] = await gateway.list_payment_methods(customer_id)
        assert saved.id == payment_method_id and saved.card is not None and saved.card.last4 == "4242"
        customer = await gateway.set_default_payment_method(customer_id, payment_method_id)
        assert customer.invoice_settings is not None
        assert customer.invoice_settings.default_payment_method == payment_method_id
        assert await gateway.default_payment_method_id(customer_id) == payment_method_id

    async def test_a_declining_card_is_not_saved(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        link = await stripe_world.setup_checkout(customer_id)
        response = await stripe_world.submit(link, "pay", "4000 0000 0000 0002")
        assert response.status_code == 402 and "Your card was declined." in response.text
        assert await stripe_world.gateway.list_payment_methods(customer_id) == []
        assert await stripe_world.delivered("setup_intent.setup_failed")

    async def test_default_must_be_a_card_of_the_customer(self, stripe_world: StripeWorld) -> None:
        owner = await stripe_world.customer("Owner")
        other = await stripe_world.customer("Other")
        payment_method_id = await stripe_world.save_card(owner, "4242424242424242")
        with pytest.raises(stripe.InvalidRequestError):
            await stripe_world.gateway.set_default_payment_method(other, payment_method_id)


class TestChargeSavedPaymentMethod:
    async def charge(
        self, world: StripeWorld, customer_id: str, payment_method_id: str, idem: str
    ) -> stripe.PaymentIntent:
        return await world.gateway.charge_saved_payment_method(
            customer_id=customer_id,
            payment_method_id=payment_method_id,
            amount_minor=9000,
            currency="usd",
            metadata={"purchase_id": "pur-off"},
            idempotency_key=idem,
        )

    async def test_succeeds_with_a_good_card(self, stripe_world: StripeWorld) -> None:
        customer_id = await stripe_world.customer()
        payment_method_id = await stripe_world.save_card(customer_id, "4242424242424242")
        intent = await self.charge(stripe_world, customer_id, payment_method_id, key("off"))
        assert intent.id.startswith("pi_")
        assert (intent.status, intent.amount, intent.payment_method) == ("succeeded", 9000, payment_method_id)
        [event] = await stripe_world.delivered("payment_intent.succeeded")
        assert event.data.object["id"] == intent.id
        assert event.data.object["metadata"].to_dict() == {"purchase_id": "pur-off"}
        assert await stripe_world.gateway.receipt_url(intent.id)

    async def test_a_saved_card_that_declines_raises_payment_declined(
        self, stripe_world: StripeWorld
    ) -> None:
        customer_id = await stripe_world.customer()
        payment_method_id = await stripe_world.save_card(customer_id, "4000 0000 0000 0341")
        with pytest.raises(PaymentDeclined) as raised:
            await self.charge(stripe_world, customer_id, payment_method_id, "pur-off-charge")
        declined = raised.value
        assert (declined.stripe_code, declined.decline_code) == ("card_declined", "generic_decline")
        assert declined.message == "Your card was declined."
        assert declined.payment_intent_id is not None and declined.payment_intent_id.startswith("pi_")
        assert declined.charge_id is not None and declined.charge_id.startswith("ch_")

        intent = await stripe_world.gateway.retrieve_payment_intent(declined.payment_intent_id)
        assert intent.status == "requires_payment_method"
        [failed] = await stripe_world.delivered("payment_intent.payment_failed")
        assert failed.data.object["id"] == declined.payment_intent_id
        assert failed.data.object["metadata"].to_dict() == {"purchase_id": "pur-off"}
        assert failed.data.object["last_payment_error"]["decline_code"] == "generic_decline"

        # The same key replays the first answer: the same decline, no second attempt.
        with pytest.raises(PaymentDeclined) as again:
            await self.charge(stripe_world, customer_id, payment_method_id, "pur-off-charge")
        assert again.value.payment_intent_id == declined.payment_intent_id
        assert len(await stripe_world.simulator.events("payment_intent.payment_failed")) == 1

    async def test_a_card_of_another_customer_is_refused(self, stripe_world: StripeWorld) -> None:
        owner = await stripe_world.customer("Owner")
        payment_method_id = await stripe_world.save_card(owner, "4242424242424242")
        with pytest.raises(stripe.InvalidRequestError):
            await self.charge(
                stripe_world, await stripe_world.customer("Other"), payment_method_id, key("off")
            )


class TestCreateRefund:
    async def paid_intent(self, world: StripeWorld) -> str:
        link = await world.payment_checkout(await world.customer(), amount_minor=4500)
        await world.submit(link, "pay", "4242424242424242")
        session = await world.gateway.retrieve_checkout_session(link.session_id)
        assert isinstance(session.payment_intent, str)
        return session.payment_intent

    async def test_partial_then_the_rest(self, stripe_world: StripeWorld) -> None:
        intent_id = await self.paid_intent(stripe_world)
        gateway = stripe_world.gateway
        part = await gateway.create_refund(
            payment_intent_id=intent_id, amount_minor=1500, idempotency_key="r1"
        )
        assert (part.id[:3], part.amount, part.status) == ("re_", 1500, "succeeded")
        again = await gateway.create_refund(
            payment_intent_id=intent_id, amount_minor=1500, idempotency_key="r1"
        )
        assert again.id == part.id
        rest = await gateway.create_refund(payment_intent_id=intent_id, idempotency_key="r2")
        assert rest.amount == 3000

        refunded = await stripe_world.delivered("charge.refunded")
        assert [(e.data.object["amount_refunded"], e.data.object["refunded"]) for e in refunded] == [
            (1500, False),
            (4500, True),
        ]
        assert refunded[0].data.object["payment_intent"] == intent_id
        with pytest.raises(stripe.InvalidRequestError) as raised:
            await gateway.create_refund(payment_intent_id=intent_id, idempotency_key="r3")
        assert raised.value.code == "charge_already_refunded"

    async def test_more_than_was_paid_is_refused(self, stripe_world: StripeWorld) -> None:
        intent_id = await self.paid_intent(stripe_world)
        with pytest.raises(stripe.InvalidRequestError):
            await stripe_world.gateway.create_refund(
                payment_intent_id=intent_id, amount_minor=4501, idempotency_key=key("r")
            )


class TestRetrieveEvent:
    async def test_delivered_event_can_be_fetched_again(self, stripe_world: StripeWorld) -> None:
        await stripe_world.customer()
        [delivered] = await stripe_world.delivered("customer.created")
        fetched = await stripe_world.gateway.retrieve_event(delivered.id)
        assert (fetched.id, fetched.type) == (delivered.id, "customer.created")
        assert fetched.api_version == STRIPE_API_VERSION
