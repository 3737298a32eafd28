"""A Stripe world for payment tests: the simulator mounted at /_stripe in a host app (its
state in the test's database), the gateway (real SDK) reaching it in-process, a recording
webhook receiver, and a "browser" (no key: what it opens is the hosted pages)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI

from orgwallet.payments.gateway import CheckoutLink, StripeGateway, TransportHTTPClient
from orgwallet.payments.simulator import Simulator, create_simulator

SECRET_KEY = "sk_test_payments_0123456789abcdef"  # the test simulator's only key
KEYED = {"Authorization": f"Bearer {SECRET_KEY}"}  # for its /test controls
WEBHOOK_SECRET = "whsec_test_payments_0123456789"
HOST = "http://stripe.test"
API_BASE = f"{HOST}/_stripe"
SUCCESS_URL = "https://app.example/purchases/done?session={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.example/purchases/cancelled"
FAST_RETRIES = (0.01, 0.02, 0.04)
MAX_WAIT = 5.0

_keys = itertools.count()


def key(label: str) -> str:
    """A fresh idempotency key."""
    return f"{label}-{next(_keys)}"


@dataclass
class Inbox:
    """A webhook receiver that records every delivery. It answers the statuses queued in
    ``answers`` (an exception stands for a connection error), then 200."""

    deliveries: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    answers: list[int | Exception] = field(default_factory=list)

    async def __call__(self, payload: bytes, headers: Mapping[str, str]) -> int:
        self.deliveries.append((payload, dict(headers)))
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return 200


@dataclass
class StripeWorld:
    gateway: StripeGateway
    simulator: Simulator
    inbox: Inbox
    browser: httpx.AsyncClient
    transport: httpx.ASGITransport

    async def delivered_events(self) -> list[stripe.Event]:
        """Every delivery so far, verified and parsed by the gateway as the webhook route will."""
        await self.simulator.drain(MAX_WAIT)
        return [
            self.gateway.construct_event(payload, headers["Stripe-Signature"])
            for payload, headers in self.inbox.deliveries
        ]

    async def delivered(self, event_type: str) -> list[stripe.Event]:
        return [event for event in await self.delivered_events() if event.type == event_type]

    async def customer(self, name: str = "Acme") -> str:
        customer = await self.gateway.create_customer(
            name=name,
            email="billing@acme.test",
            metadata={"organization_id": "org-1"},
            idempotency_key=key("cus"),
        )
        return customer.id

    async def payment_checkout(
        self, customer_id: str, *, purchase_id: str = "pur-1", amount_minor: int = 4500
    ) -> CheckoutLink:
        return await self.gateway.create_payment_checkout(
            customer_id=customer_id,
            purchase_id=purchase_id,
            amount_minor=amount_minor,
            currency="usd",
            product_name="50 tokens",
            success_url=SUCCESS_URL,
            cancel_url=CANCEL_URL,
            idempotency_key=key("checkout"),
        )

    async def setup_checkout(self, customer_id: str) -> CheckoutLink:
        return await self.gateway.create_setup_checkout(
            customer_id=customer_id,
            success_url=SUCCESS_URL,
            cancel_url=CANCEL_URL,
            idempotency_key=key("setup"),
            metadata={"organization_id": "org-1"},
        )

    async def submit(self, link: CheckoutLink, action: str, card_number: str = "") -> httpx.Response:
        """Press a button on the hosted checkout page, as a browser posts its form."""
        return await self.browser.post(link.url, data={"card_number": card_number, "action": action})

    async def save_card(self, customer_id: str, card_number: str) -> str:
        """Save a card through a setup-mode Checkout; returns the payment method id."""
        link = await self.setup_checkout(customer_id)
        response = await self.submit(link, "pay", card_number)
        assert response.status_code == 303, response.text
        session = await self.gateway.retrieve_checkout_session(link.session_id)
        assert isinstance(session.setup_intent, str)
        setup_intent = await self.gateway.retrieve_setup_intent(session.setup_intent)
        assert isinstance(setup_intent.payment_method, str)
        return setup_intent.payment_method


@asynccontextmanager
async def simulated_stripe(database_url: str, **settings: Any) -> AsyncIterator[StripeWorld]:
    """A simulator on ``database_url`` (``settings``: more of ``create_simulator``'s), mounted
    in a host app of its own, as one process would have it."""
    inbox = Inbox()
    host = FastAPI()
    stripe_app, simulator = create_simulator(
        secret_key=SECRET_KEY,
        database_url=database_url,
        webhook_secret=WEBHOOK_SECRET,
        public_base_url=API_BASE,
        deliver=inbox,
        retry_delays=FAST_RETRIES,
        **settings,
    )
    host.mount("/_stripe", stripe_app)
    transport = httpx.ASGITransport(app=host)
    gateway = StripeGateway(
        SECRET_KEY, WEBHOOK_SECRET, api_base=API_BASE, http_client=TransportHTTPClient(transport)
    )
    try:
        async with httpx.AsyncClient(transport=transport, base_url=HOST) as browser:
            yield StripeWorld(gateway, simulator, inbox, browser, transport)
    finally:
        await simulator.close()
        await gateway.close()


@pytest.fixture
async def stripe_world(database_url: str) -> AsyncIterator[StripeWorld]:
    async with simulated_stripe(database_url) as world:
        yield world


# The app's own Stripe (the simulator it mounts) and an organization buying from it, for the
# purchase tests in this package (tests/purchasing.py).
from tests.purchasing import shop  # noqa: E402, F401
