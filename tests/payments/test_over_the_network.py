"""The same flow over real HTTP: uvicorn on a free 127.0.0.1 port, the gateway on the SDK's
stock ``stripe.HTTPXClient``, webhooks POSTed to a receiver route that verifies them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import stripe
import uvicorn
from fastapi import FastAPI, Request, Response

from orgwallet.payments.gateway import InvalidStripeWebhook, StripeGateway
from orgwallet.payments.simulator import Simulator, create_simulator, http_webhook_target
from tests.payments.conftest import (
    CANCEL_URL,
    FAST_RETRIES,
    KEYED,
    SECRET_KEY,
    SUCCESS_URL,
    WEBHOOK_SECRET,
)


class Server:
    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Server:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        async with asyncio.timeout(10):
            while not self.server.started:  # noqa: ASYNC110  # uvicorn offers only a flag
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        try:
            async with asyncio.timeout(10):
                await self.task
        finally:
            self.sock.close()


@dataclass
class Served:
    base_url: str
    simulator: Simulator
    received: list[stripe.Event] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[Served]:
    host = FastAPI()
    server = Server(host)
    receiver = StripeGateway(SECRET_KEY, WEBHOOK_SECRET, api_base=f"{server.base_url}/_stripe")

    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        stripe_app, simulator = create_simulator(
            secret_key=SECRET_KEY,
            database_url=database_url,
            webhook_secret=WEBHOOK_SECRET,
            public_base_url=f"{server.base_url}/_stripe",
            deliver=http_webhook_target(http, "/webhooks/stripe"),
            retry_delays=FAST_RETRIES,
        )
        served = Served(server.base_url, simulator)

        @host.post("/webhooks/stripe")
        async def webhook(request: Request) -> Response:
            try:
                event = receiver.construct_event(
                    await request.body(), request.headers.get("stripe-signature")
                )
            except InvalidStripeWebhook:
                served.rejected.append(400)
                return Response(status_code=400)
            served.received.append(event)
            return Response(status_code=200)

        host.mount("/_stripe", stripe_app)
        async with server:
            yield served
            await simulator.close()
    await receiver.close()


async def test_checkout_paid_over_http(served: Served) -> None:
    gateway = StripeGateway(SECRET_KEY, WEBHOOK_SECRET, api_base=f"{served.base_url}/_stripe")
    try:
        customer = await gateway.create_customer(
            name="Net", email=None, metadata={}, idempotency_key="net-cus"
        )
        link = await gateway.create_payment_checkout(
            customer_id=customer.id,
            purchase_id="pur-net",
            amount_minor=1000,
            currency="usd",
            product_name="10 tokens",
            success_url=SUCCESS_URL,
            cancel_url=CANCEL_URL,
            idempotency_key="net-checkout",
        )
        assert link.url.startswith(f"{served.base_url}/_stripe/checkout/")
        async with httpx.AsyncClient(timeout=10) as browser:
            page = await browser.get(link.url)
            assert "$10.00" in page.text
            paid = await browser.post(link.url, data={"card_number": "4242424242424242", "action": "pay"})
            assert paid.status_code == 303
            await served.simulator.drain(5)
            [completed] = [e for e in served.received if e.type == "checkout.session.completed"]
            assert completed.data.object["metadata"].to_dict() == {"purchase_id": "pur-net"}
            assert completed.data.object["payment_status"] == "paid"
            assert served.rejected == []

            # A copy signed with another secret reaches the route and is refused there, and retried.
            forged = await browser.post(
                f"{served.base_url}/_stripe/test/events/{completed.id}/deliver",
                json={"secret": "whsec_wrong"},
                headers=KEYED,
            )
            assert forged.status_code == 200
            await served.simulator.drain(5)
            assert served.rejected == [400] * (len(FAST_RETRIES) + 1)
        session = await gateway.retrieve_checkout_session(link.session_id)
        assert session.status == "complete"
    finally:
        await gateway.close()
