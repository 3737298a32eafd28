"""The simulator's hosted pages over HTTP, as the app serves them (its own simulator, reached
in-process): Checkout ready to pay with the test card, what Stripe's page shows (merchant,
organization, items, total, TEST MODE), the simulator's own "payment received" and "payment
cancelled" pages, receipts; each page shows only its own object, and escapes what an
organization typed."""

from __future__ import annotations

from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import httpx
from fastapi import FastAPI

from tests.helpers import GraphQLClient, create_org
from tests.purchasing import SETUP_PAYMENT_METHOD, Shop, session_id

GOOD_CARD = "4242 4242 4242 4242"


class Inputs(HTMLParser):
    """The value of every ``<input>`` of a page and the target of every link, by id; the
    scripts, external resources and inline event handlers it has."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.loads: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("id"):
            self.values[str(found["id"])] = found.get("value") or ""
        if tag == "a" and found.get("id"):
            self.links[str(found["id"])] = found.get("href") or ""
        if tag in ("script", "link", "img", "iframe") or any(name.startswith("on") for name in found):
            self.loads.append(tag)


def simulator_url(shop: Shop, path: str) -> str:
    return f"{shop.simulator.public_base_url}{path}"


async def organization_name(shop: Shop) -> str:
    data = await shop.client.data(
        "query($id: ID!) { organization(id: $id) { name } }", {"id": shop.org}, as_=shop.owner
    )
    return str(data["organization"]["name"])


async def paid_through_the_page(shop: Shop) -> tuple[dict[str, Any], httpx.Response]:
    """A checkout of 50 tokens whose success URL is the simulator's own page, paid with the card
    the page comes with; (purchase, the redirect)."""
    purchase, url = await shop.checkout(
        package="tokens-50", successUrl=simulator_url(shop, "/done/{CHECKOUT_SESSION_ID}")
    )
    page = Inputs((await shop.browser.get(url)).text)
    response = await shop.browser.post(url, data={"card_number": page.values["card_number"], "action": "pay"})
    assert response.status_code == 303, response.text
    await shop.drain()
    return purchase, response


class TestCheckoutPage:
    async def test_comes_ready_to_pay_and_shows_what_stripe_shows(self, shop: Shop) -> None:
        _, url = await shop.checkout(package="tokens-50")
        response = await shop.browser.get(url)
        assert response.status_code == 200
        page = Inputs(response.text)
        assert page.values["card_number"] == GOOD_CARD
        month, year = (int(part) for part in page.values["expiry"].split("/"))
        assert (2000 + year, month) > (datetime.now(UTC).year, datetime.now(UTC).month)
        assert page.values["cvc"].isdigit()
        text = response.text
        for shown in (
            "TEST MODE",
            "orgwallet",
            await organization_name(shop),
            "50 tokens",
            "$45.00",
            "Total",
        ):
            assert shown in text, shown
        # The other test cards, one click each (decline, authentication, saves-then-declines),
        # and the bank debit.
        for number in ("4000 0000 0000 0002", "4000 0027 6000 3184", "4000 0000 0000 0341"):
            assert f"value='{number.replace(' ', '')}'" in text and number in text
        assert "value='pay_async'" in text
        # Works offline: nothing loaded from anywhere, no script.
        assert page.loads == []
        assert "default-src 'none'" in response.headers["content-security-policy"]

    async def test_a_test_card_button_pays_with_that_card(self, shop: Shop) -> None:
        _, url = await shop.checkout(package="tokens-50")
        declined = await shop.browser.post(
            url, data={"card_number": GOOD_CARD, "test_card": "4000000000009995", "action": "pay"}
        )
        assert declined.status_code == 402
        assert "Your card has insufficient funds." in declined.text
        # The page again keeps what was tried.
        assert Inputs(declined.text).values["card_number"] == "4000000000009995"

    async def test_setup_page_comes_ready(self, shop: Shop) -> None:
        variables = {
            "organizationId": shop.org,
            "successUrl": "https://app.example/ok",
            "cancelUrl": "https://app.example/no",
        }
        result = (await shop.client.data(SETUP_PAYMENT_METHOD, {"input": variables}, as_=shop.owner))[
            "setupPaymentMethod"
        ]
        response = await shop.browser.get(result["checkoutUrl"])
        assert response.status_code == 200
        assert Inputs(response.text).values["card_number"] == GOOD_CARD
        for shown in ("TEST MODE", "Save a card with orgwallet", await organization_name(shop), "Save card"):
            assert shown in response.text, shown
        assert "value='pay_async'" not in response.text

    async def test_unknown_session(self, shop: Shop) -> None:
        _, url = await shop.checkout(package="tokens-50")  # another session exists
        name = await organization_name(shop)
        for method, path in (
            ("GET", "/checkout/cs_test_nope"),
            ("POST", "/checkout/cs_test_nope"),
            ("GET", "/done/cs_test_nope"),
            ("GET", f"/receipts/{session_id(url)}"),  # a session is not a receipt
        ):
            response = await shop.browser.request(method, simulator_url(shop, path), data={"action": "pay"})
            assert response.status_code == 404, (path, response.text)
            assert "There is no such" in response.text
            assert name not in response.text and "$45.00" not in response.text
            assert session_id(url) not in response.text


class TestAfterPaying:
    async def test_done_page_shows_this_payment(self, shop: Shop) -> None:
        other, other_url = await shop.checkout(package="tokens-100")  # open, not paid
        purchase, redirect = await paid_through_the_page(shop)
        done_url = redirect.headers["location"]
        assert done_url.startswith(simulator_url(shop, "/done/cs_test_"))
        response = await shop.browser.get(done_url)
        assert response.status_code == 200
        text = response.text
        for shown in ("Payment received", "50 tokens", await organization_name(shop), purchase["reference"]):
            assert shown in text, shown
        assert other["reference"] not in text and session_id(other_url) not in text
        # The other session's own page says it is not paid.
        assert (
            "Not paid yet"
            in (await shop.browser.get(simulator_url(shop, f"/done/{session_id(other_url)}"))).text
        )

    async def test_receipt_shows_date_reference_tokens_and_refunds(self, shop: Shop) -> None:
        purchase, redirect = await paid_through_the_page(shop)
        done = await shop.browser.get(redirect.headers["location"])
        receipt_url = Inputs(done.text).links["receipt"]
        assert receipt_url == (await shop.purchase(purchase["id"]))["receiptUrl"]
        charge = await shop.gateway.retrieve_charge(receipt_url.rsplit("/", 1)[-1])
        paid_at = datetime.fromtimestamp(charge.created, UTC)
        response = await shop.browser.get(receipt_url)
        assert response.status_code == 200
        text = response.text
        for shown in (
            "Receipt from orgwallet",
            f"{paid_at.day} {paid_at:%B %Y}",
            purchase["reference"],
            "<dd id='tokens'>50</dd>",
            "$45.00",
            "Visa ending in 4242",
            await organization_name(shop),
        ):
            assert shown in text, shown
        assert "Refunded" not in text
        assert isinstance(charge.payment_intent, str)
        await shop.gateway.create_refund(
            payment_intent_id=charge.payment_intent, amount_minor=1500, idempotency_key="r1"
        )
        await shop.gateway.create_refund(
            payment_intent_id=charge.payment_intent, amount_minor=500, idempotency_key="r2"
        )
        refunded = (await shop.browser.get(receipt_url)).text
        assert "<dd id='refunded'>$20.00</dd>" in refunded
        assert refunded.count(f"Refund, {paid_at.day} {paid_at:%B %Y}") == 2
        assert "&minus;$15.00" in refunded and "&minus;$5.00" in refunded

    async def test_cancelled_page(self, shop: Shop) -> None:
        _, url = await shop.checkout(package="tokens-50", cancelUrl=simulator_url(shop, "/cancelled"))
        pressed = await shop.press(url, "cancel")
        assert (pressed.status_code, pressed.headers["location"]) == (303, simulator_url(shop, "/cancelled"))
        response = await shop.browser.get(pressed.headers["location"])
        assert response.status_code == 200
        assert "Payment cancelled" in response.text and "nothing was charged" in response.text
        assert await organization_name(shop) not in response.text and "$45.00" not in response.text
        assert (await shop.gateway.retrieve_checkout_session(session_id(url))).status == "open"


async def test_what_an_organization_typed_is_escaped(app: FastAPI, client: GraphQLClient, shop: Shop) -> None:
    org = await create_org(client, "evil-owner", name="<script>alert(1)</script>")
    evil = Shop(app, client, shop.browser, org, "evil-owner")
    _, checkout_url = await evil.checkout(package="tokens-10")
    purchase, redirect = await paid_through_the_page(evil)
    setup = (
        await evil.client.data(
            SETUP_PAYMENT_METHOD,
            {
                "input": {
                    "organizationId": evil.org,
                    "successUrl": "https://a.example",
                    "cancelUrl": "https://a.example",
                }
            },
            as_=evil.owner,
        )
    )["setupPaymentMethod"]["checkoutUrl"]
    receipt_url = (await evil.purchase(purchase["id"]))["receiptUrl"]
    for url in (checkout_url, redirect.headers["location"], setup, receipt_url):
        text = (await evil.browser.get(url)).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, url
        assert "<script>" not in text, url
