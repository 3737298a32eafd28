"""Subscribing in a real browser, on the real server: `orgwallet serve` (embedded PostgreSQL,
the Stripe simulator mounted at /_stripe), a plan made by platform staff through createPlan, a
new organization's owner calling subscribe with the simulator's own done page as success URL,
the subscription-mode checkout page in headless Chromium (every request that leaves the server
refused) with the test card already there, Subscribe clicked, the simulator's "Subscribed"
page; then the organization's subscription is ACTIVE on the plan with its first invoice paid
and the plan's tokens in the wallet (credited by the simulator's signed webhooks to the app's
own /webhooks/stripe).

Needs Debian's ``chromium`` and Playwright, as tests/payments/test_browser.py (whose ``served``
fixture starts the server); skipped without them."""

from __future__ import annotations

from typing import Any

import httpx

from orgwallet.config import Settings
from tests.helpers import GraphQLClient, create_org, eventually
from tests.payments.test_browser import CHROMIUM, CHROMIUM_FLAGS, JWT_SECRET, Served
from tests.payments.test_browser import served as served  # the fixture: `orgwallet serve`
from tests.subscriptions.harness import CREATE_PLAN, STAFF, SUBSCRIBE

OWNER = "browser-subscriber"
PLAN = {
    "code": "browser-pro",
    "name": "Browser Pro",
    "tokensPerPeriod": 750,
    "interval": "MONTH",
    "priceMinor": 1900,
}
PRICE = "$19.00"
STATE = """
query($id: ID!) {
  organization(id: $id) {
    subscription {
      status
      plan { code }
      invoices { edges { node { status tokensGranted } } }
    }
    wallet { balance }
  }
}
"""


async def test_subscribe_on_the_checkout_page_in_chromium(served: Served) -> None:
    from playwright.async_api import Route, async_playwright

    refused: list[str] = []

    async def only_the_server(route: Route) -> None:
        if route.request.url.startswith(served.base):
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort("internetdisconnected")

    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        client = GraphQLClient(http, Settings(jwt_secret=JWT_SECRET))
        # Platform staff: the embedded server honours the admin claim (no platform_admins here).
        staff = client.token(STAFF, admin=True)
        made = (await client.data(CREATE_PLAN, {"input": PLAN}, bearer=staff))["createPlan"]
        assert made["__typename"] == "PlanSaved", made
        plan = made["plan"]
        assert plan["tokensPerPeriod"] == PLAN["tokensPerPeriod"]

        org = await create_org(client, OWNER, name="Browser Subscriber Co")
        before = await client.data(STATE, {"id": org}, as_=OWNER)
        assert before["organization"]["subscription"] is None, before
        balance_before = int(before["organization"]["wallet"]["balance"])

        subscribe = {
            "organizationId": org,
            "planId": plan["id"],
            "successUrl": f"{served.base}/_stripe/done/{{CHECKOUT_SESSION_ID}}",
            "cancelUrl": f"{served.base}/_stripe/cancelled",
        }
        started = (await client.data(SUBSCRIBE, {"input": subscribe}, as_=OWNER))["subscribe"]
        assert started["__typename"] == "SubscriptionCheckoutStarted", started
        url = started["checkoutUrl"]
        assert url.startswith(f"{served.base}/_stripe/checkout/cs_"), url
        session_id = url.rsplit("/", 1)[-1]

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                context = await browser.new_context()
                await context.route("**/*", only_the_server)
                page = await context.new_page()
                await page.goto(url)
                main = await page.inner_text("main")
                assert PLAN["name"] in main, main
                amount = await page.inner_text("#amount")
                assert PRICE in amount and "per month" in amount, amount
                assert await page.inner_text("#test-mode") == "TEST MODE"
                assert await page.input_value("#card_number") == "4242 4242 4242 4242"
                button = page.locator("#pay")
                assert (await button.inner_text()).strip() == "Subscribe"
                await button.click()
                await page.wait_for_url(f"{served.base}/_stripe/done/{session_id}", timeout=15_000)
                done = await page.inner_text("main")
                assert "Subscribed" in done, done
                assert PLAN["name"] in await page.inner_text("#plan")
                assert PRICE in await page.inner_text("#paid")
            finally:
                await browser.close()
        assert refused == [], f"the checkout pages asked for outside resources: {refused}"

        granted = int(PLAN["tokensPerPeriod"])

        async def subscribed() -> dict[str, Any] | None:
            found = (await client.data(STATE, {"id": org}, as_=OWNER))["organization"]
            subscription = found["subscription"]
            if subscription is None or subscription["status"] != "ACTIVE":
                return None
            invoices = [edge["node"] for edge in subscription["invoices"]["edges"]]
            if not any(invoice["status"] == "paid" for invoice in invoices):
                return None
            if int(found["wallet"]["balance"]) < balance_before + granted:
                return None
            return found

        state = await eventually(subscribed, within=30, what="the subscription, its invoice and its tokens")
        subscription = state["subscription"]
        assert subscription["plan"]["code"] == PLAN["code"]
        invoices = [edge["node"] for edge in subscription["invoices"]["edges"]]
        assert [(i["status"], int(i["tokensGranted"])) for i in invoices] == [("paid", granted)], invoices
        assert int(state["wallet"]["balance"]) == balance_before + granted, (balance_before, state)
