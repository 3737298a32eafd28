"""Buying tokens in tests: the app with its offline Stripe simulator (the real ``stripe`` SDK
reaches it in-process, webhooks come back to the app's own route), an organization that buys,
and small helpers to start, pay and inspect purchases."""

from __future__ import annotations

import itertools
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet import ledger
from orgwallet.payments.gateway import StripeGateway
from orgwallet.payments.simulator import Simulator
from tests.helpers import GraphQLClient, create_org

FAST_RETRIES = (0.01, 0.02, 0.04)
SUCCESS_URL = "https://app.example/purchases/done?session={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.example/purchases/cancelled"
GOOD_CARD = "4242 4242 4242 4242"
DECLINED_CARD = "4000 0000 0000 0002"
SAVES_BUT_DECLINES = "4000 0000 0000 0341"

PURCHASE_FIELDS = """
  id reference status method tokens amountMinor currency receiptUrl createdAt paidAt
  failureReason refundedMinor tokensClawedBack shortfall package { code priceMinor }
  organization { id }
"""

START_CHECKOUT = f"""
mutation($input: StartCheckoutInput!) {{
  startCheckout(input: $input) {{
    __typename
    ... on CheckoutStarted {{ checkoutUrl purchase {{ {PURCHASE_FIELDS} }} }}
    ... on UserError {{ code message }}
    ... on InvalidInput {{ field }}
  }}
}}
"""

PURCHASE_WITH_SAVED_CARD = f"""
mutation($input: PurchaseWithSavedCardInput!) {{
  purchaseWithSavedCard(input: $input) {{
    __typename
    ... on PurchaseStarted {{ purchase {{ {PURCHASE_FIELDS} }} }}
    ... on PaymentDeclined {{ declineCode purchase {{ {PURCHASE_FIELDS} }} }}
    ... on UserError {{ code message }}
    ... on InvalidInput {{ field }}
  }}
}}
"""

SETUP_PAYMENT_METHOD = """
mutation($input: SetupPaymentMethodInput!) {
  setupPaymentMethod(input: $input) {
    __typename
    ... on PaymentMethodSetupStarted { checkoutUrl }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""

PURCHASE = f"query($id: ID!) {{ purchase(id: $id) {{ {PURCHASE_FIELDS} }} }}"
WALLET = "query($id: ID!) { organization(id: $id) { wallet { balance lifetimePurchased } } }"
PACKAGES = """
query($org: ID) {
  packages(organizationId: $org) {
    id code name tokens priceMinor listPriceMinor currency unitPriceMinor savingsPercent badge active
  }
}
"""

_orgs = itertools.count()


def session_id(checkout_url: str) -> str:
    return checkout_url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Shop:
    """One organization buying tokens from the app, its owner acting."""

    app: FastAPI
    client: GraphQLClient
    browser: httpx.AsyncClient
    org: str  # global id
    owner: str

    @property
    def simulator(self) -> Simulator:
        simulator = self.app.state.runtime.simulator
        assert simulator is not None
        return simulator

    @property
    def gateway(self) -> StripeGateway:
        gateway: StripeGateway = self.app.state.runtime.gateway
        return gateway

    @property
    def org_id(self) -> uuid.UUID:
        return uuid.UUID(GlobalID.from_id(self.org).node_id)

    async def package_id(self, code: str) -> str:
        packages = (await self.client.data(PACKAGES, {"org": self.org}, as_=self.owner))["packages"]
        [found] = [p["id"] for p in packages if p["code"] == code]
        return str(found)

    async def start_checkout(
        self,
        *,
        package: str | None = None,
        tokens: int | None = None,
        key: str | None = None,
        as_: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The raw result of startCheckout (package by code)."""
        variables = {
            "organizationId": self.org,
            "packageId": await self.package_id(package) if package else None,
            "tokens": tokens,
            "successUrl": SUCCESS_URL,
            "cancelUrl": CANCEL_URL,
            "idempotencyKey": key,
        } | extra
        data = await self.client.data(START_CHECKOUT, {"input": variables}, as_=as_ or self.owner)
        result: dict[str, Any] = data["startCheckout"]
        return result

    async def checkout(self, **kwargs: Any) -> tuple[dict[str, Any], str]:
        """A started checkout: (purchase, checkout URL)."""
        result = await self.start_checkout(**kwargs)
        assert result["__typename"] == "CheckoutStarted", result
        return result["purchase"], result["checkoutUrl"]

    async def press(self, checkout_url: str, action: str = "pay", card: str = GOOD_CARD) -> httpx.Response:
        """Submit the hosted checkout page's form, as a browser would."""
        return await self.browser.post(checkout_url, data={"card_number": card, "action": action})

    async def pay(self, checkout_url: str, card: str = GOOD_CARD) -> None:
        response = await self.press(checkout_url, "pay", card)
        assert response.status_code == 303, response.text
        await self.drain()

    async def drain(self) -> None:
        await self.simulator.drain(10)

    async def purchase(self, purchase_id: str) -> dict[str, Any]:
        found: dict[str, Any] = (await self.client.data(PURCHASE, {"id": purchase_id}, as_=self.owner))[
            "purchase"
        ]
        return found

    async def balance(self) -> int:
        data = await self.client.data(WALLET, {"id": self.org}, as_=self.owner)
        return int(data["organization"]["wallet"]["balance"])

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        async with self.app.state.runtime.engine.connect() as connection:
            return list((await connection.execute(text(statement), params)).all())

    async def sql_write(self, statement: str, **params: Any) -> None:
        """Committed at once. Without parameters, a script of several statements."""
        async with self.app.state.runtime.engine.begin() as connection:
            if params:
                await connection.execute(text(statement), params)
            else:
                raw = await connection.get_raw_connection()
                await raw.driver_connection.execute(statement)

    async def purchase_entries(self) -> list[tuple[str, int]]:
        """(kind, amount) of the wallet's purchase and clawback entries, in order."""
        rows = await self.sql(
            """
            SELECT e.kind, e.amount FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id
            WHERE w.organization_id = :org AND e.kind IN ('purchase', 'clawback') ORDER BY e.seq
            """,
            org=self.org_id,
        )
        return [(row.kind, int(row.amount)) for row in rows]

    async def violations(self) -> dict[uuid.UUID, list[str]]:
        async with self.app.state.runtime.sessions() as session:
            return await ledger.violations(session)

    async def spend(self, amount: int) -> None:
        query = """
        mutation($org: ID!, $amount: BigInt!, $key: String!) {
          consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) { __typename }
        }
        """
        variables = {"org": self.org, "amount": amount, "key": f"spend-{uuid.uuid4()}"}
        result = (await self.client.data(query, variables, as_=self.owner))["consumeTokens"]
        assert result["__typename"] == "TokensConsumed", result

    async def stripe_events(self) -> list[Any]:
        return await self.sql(
            "SELECT event_id, type, handled_at, outcome, error, attempts FROM stripe_events"
        )


async def new_shop(app: FastAPI, client: GraphQLClient, browser: httpx.AsyncClient) -> Shop:
    owner = f"buyer-{next(_orgs)}"
    org = await create_org(client, owner, name=f"Buyer {owner}")
    return Shop(app, client, browser, org, owner)


@pytest.fixture
async def shop(app: FastAPI, client: GraphQLClient) -> AsyncIterator[Shop]:
    """An organization buying from the app; its browser reaches the checkout pages in-process
    (any host goes to the app)."""
    app.state.runtime.simulator.webhooks.retry_delays = FAST_RETRIES
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as browser:
        yield await new_shop(app, client, browser)


@contextmanager
def stripe_unreachable(shop: Shop) -> Iterator[None]:
    """The app's Stripe is a closed loopback port (the real SDK, no retries) while inside."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connection = shop.app.state.runtime.stripe
    reachable = connection.gateway
    connection.gateway = StripeGateway(
        "sk_test_unreachable", "whsec_unused", api_base=f"http://127.0.0.1:{port}", max_network_retries=0
    )
    try:
        yield
    finally:
        connection.gateway = reachable
