"""StripeGateway.construct_event accepts exactly what Stripe (and the simulator) signs."""

from __future__ import annotations

import json
import time

import pytest
import stripe

from orgwallet.payments.gateway import InvalidStripeWebhook
from orgwallet.payments.simulator import stripe_signature
from tests.payments.conftest import API_BASE, KEYED, WEBHOOK_SECRET, StripeWorld


async def one_delivery(world: StripeWorld) -> tuple[bytes, str]:
    await world.customer()
    await world.simulator.drain()
    [(payload, headers)] = world.inbox.deliveries
    return payload, headers["Stripe-Signature"]


class TestConstructEvent:
    async def test_accepts_a_delivery_signed_like_stripe(self, stripe_world: StripeWorld) -> None:
        payload, signature = await one_delivery(stripe_world)
        assert signature.startswith("t=") and ",v1=" in signature
        event = stripe_world.gateway.construct_event(payload, signature)
        assert isinstance(event, stripe.Event)
        assert event.type == "customer.created"
        # The SDK's own verifier agrees (the simulator does not use it to sign).
        assert stripe.Webhook.construct_event(payload, signature, WEBHOOK_SECRET).id == event.id

    async def test_another_secret(self, stripe_world: StripeWorld) -> None:
        payload, _ = await one_delivery(stripe_world)
        forged = stripe_signature(payload, "whsec_someone_else", int(time.time()))
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(payload, forged)

    async def test_stale_timestamp(self, stripe_world: StripeWorld) -> None:
        payload, _ = await one_delivery(stripe_world)
        stale = stripe_signature(payload, WEBHOOK_SECRET, int(time.time()) - 301)
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(payload, stale)
        recent = stripe_signature(payload, WEBHOOK_SECRET, int(time.time()) - 200)
        assert stripe_world.gateway.construct_event(payload, recent).type == "customer.created"

    async def test_tampered_body(self, stripe_world: StripeWorld) -> None:
        payload, signature = await one_delivery(stripe_world)
        event = json.loads(payload)
        event["data"]["object"]["metadata"]["organization_id"] = "org-2"
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(json.dumps(event, indent=2).encode(), signature)
        # Even reformatting the same JSON breaks the signature: verify the raw bytes.
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(json.dumps(json.loads(payload)).encode(), signature)

    @pytest.mark.parametrize("header", [None, "", "garbage", "t=abc,v1=00", "t=1700000000"])
    async def test_missing_or_malformed_header(self, stripe_world: StripeWorld, header: str | None) -> None:
        payload, _ = await one_delivery(stripe_world)
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(payload, header)

    @pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[]", b'{"object": "event"}'])
    def test_signed_body_that_is_not_an_event(self, stripe_world: StripeWorld, body: bytes) -> None:
        signature = stripe_signature(body, WEBHOOK_SECRET, int(time.time()))
        with pytest.raises(InvalidStripeWebhook):
            stripe_world.gateway.construct_event(body, signature)

    async def test_controls_send_deliveries_that_must_be_rejected(self, stripe_world: StripeWorld) -> None:
        await stripe_world.customer()
        [event] = await stripe_world.simulator.events("customer.created")
        await stripe_world.simulator.drain()
        stripe_world.inbox.deliveries.clear()
        for body in ({"secret": "whsec_wrong"}, {"timestamp": int(time.time()) - 3600}):
            response = await stripe_world.browser.post(
                f"{API_BASE}/test/events/{event['id']}/deliver", json=body, headers=KEYED
            )
            assert response.status_code == 200
        await stripe_world.simulator.drain()
        assert len(stripe_world.inbox.deliveries) == 2
        for payload, headers in stripe_world.inbox.deliveries:
            with pytest.raises(InvalidStripeWebhook):
                stripe_world.gateway.construct_event(payload, headers["Stripe-Signature"])
