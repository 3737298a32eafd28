"""Buying tokens over GraphQL: startCheckout, setupPaymentMethod, purchaseWithSavedCard, and the
purchase history, against the app's own Stripe simulator through the real SDK."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.helpers import add_member, create_api_key, create_org, error_code
from tests.purchasing import (
    GOOD_CARD,
    PURCHASE,
    PURCHASE_FIELDS,
    PURCHASE_WITH_SAVED_CARD,
    SAVES_BUT_DECLINES,
    SETUP_PAYMENT_METHOD,
    START_CHECKOUT,
    Shop,
    session_id,
)


async def save_card(shop: Shop, card: str = GOOD_CARD) -> None:
    data = await shop.client.data(
        SETUP_PAYMENT_METHOD,
        {
            "input": {
                "organizationId": shop.org,
                "successUrl": "https://a.example/ok",
                "cancelUrl": "https://a.example/no",
            }
        },
        as_=shop.owner,
    )
    result = data["setupPaymentMethod"]
    assert result["__typename"] == "PaymentMethodSetupStarted", result
    assert "Save card" in (await shop.browser.get(result["checkoutUrl"])).text
    await shop.pay(result["checkoutUrl"], card)


async def buy_with_saved_card(shop: Shop, key: str, **fields: Any) -> dict[str, Any]:
    variables = {"organizationId": shop.org, "idempotencyKey": key} | fields
    if "packageId" not in fields and "tokens" not in fields:
        variables["packageId"] = await shop.package_id("tokens-100")
    result: dict[str, Any] = (
        await shop.client.data(PURCHASE_WITH_SAVED_CARD, {"input": variables}, as_=shop.owner)
    )["purchaseWithSavedCard"]
    return result


async def count(shop: Shop, table: str) -> int:
    [row] = await shop.sql(f"SELECT count(*) AS n FROM {table}")  # noqa: S608
    return int(row.n)


class TestStartCheckout:
    async def test_a_package(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        assert re.fullmatch(r"PUR-\d{6}", purchase["reference"])
        assert (purchase["status"], purchase["method"], purchase["tokens"]) == ("PENDING", "CHECKOUT", 50)
        assert (purchase["amountMinor"], purchase["currency"]) == (4500, "USD")
        assert purchase["package"]["code"] == "tokens-50"
        assert purchase["receiptUrl"] is None and purchase["paidAt"] is None
        assert url.startswith("http://127.0.0.1:8000/_stripe/checkout/cs_test_")
        page = await shop.browser.get(url)
        assert page.status_code == 200 and "$45.00" in page.text and "50 tokens" in page.text
        session = await shop.gateway.retrieve_checkout_session(session_id(url))
        purchase_uuid = (await shop.sql("SELECT id FROM purchases"))[0].id
        assert session.metadata["purchase_id"] == str(purchase_uuid)
        assert (session.mode, session.amount_total, session.currency) == ("payment", 4500, "usd")
        [audit] = await shop.sql("SELECT actor, action FROM audit_log WHERE target_type = 'purchase'")
        assert (audit.actor, audit.action) == (shop.owner, "purchase.start_checkout")

    async def test_a_custom_amount_is_priced_by_tiers(self, shop: Shop) -> None:
        purchase, url = await shop.checkout(tokens=120)
        assert (purchase["tokens"], purchase["amountMinor"], purchase["package"]) == (120, 10800, None)
        assert "$108.00" in (await shop.browser.get(url)).text

    async def test_references_follow_each_other(self, shop: Shop) -> None:
        first, _ = await shop.checkout(tokens=5)
        second, _ = await shop.checkout(tokens=6)
        assert int(second["reference"][4:]) == int(first["reference"][4:]) + 1

    async def test_one_stripe_customer_per_organization(self, shop: Shop) -> None:
        await shop.checkout(tokens=5)
        await shop.checkout(tokens=6)
        assert len(await shop.simulator.events("customer.created")) == 1
        [row] = await shop.sql("SELECT customer_id FROM stripe_customers")
        assert row.customer_id.startswith("cus_")

    async def test_a_customer_stripe_forgot_is_made_again(self, shop: Shop) -> None:
        await shop.checkout(tokens=5)
        await shop.sql_write("UPDATE stripe_customers SET customer_id = :gone", gone="cus_deleted_meanwhile")
        purchase, url = await shop.checkout(tokens=6)
        [row] = await shop.sql("SELECT customer_id FROM stripe_customers")
        assert row.customer_id != "cus_deleted_meanwhile"
        await shop.pay(url)
        assert (await shop.purchase(purchase["id"]))["status"] == "PAID"

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"tokens": 10, "package": "tokens-10"}, "packageId"),
            ({}, "packageId"),
            ({"tokens": 0}, "tokens"),
            ({"tokens": -5}, "tokens"),
            ({"tokens": 100_001}, "tokens"),
            ({"tokens": 1.5}, "tokens"),
            ({"tokens": 10, "successUrl": "ftp://files.example/x"}, "successUrl"),
            ({"tokens": 10, "successUrl": "not a url"}, "successUrl"),
            ({"tokens": 10, "cancelUrl": ""}, "cancelUrl"),
            ({"tokens": 10, "cancelUrl": "javascript:alert(1)"}, "cancelUrl"),
            ({"tokens": 10, "key": ""}, "idempotencyKey"),
        ],
    )
    async def test_bad_input_writes_nothing(self, shop: Shop, fields: dict[str, Any], field: str) -> None:
        result = await shop.start_checkout(**fields)
        assert (result["__typename"], result["field"]) == ("InvalidInput", field), result
        assert await count(shop, "purchases") == 0
        assert await count(shop, "stripe_customers") == 0
        assert await shop.simulator.events("customer.created") == []

    async def test_an_unknown_or_archived_package(self, shop: Shop) -> None:
        missing = "VG9rZW5QYWNrYWdlOjAwMDAwMDAwLTAwMDAtNzAwMC04MDAwLTAwMDAwMDAwMDAwMA=="
        result = await shop.start_checkout(packageId=missing)
        assert result["__typename"] == "NotFound"
        await shop.sql_write("UPDATE token_packages SET active = false WHERE code = 'tokens-10'")
        packages = await shop.sql("SELECT id FROM token_packages WHERE code = 'tokens-10'")
        from strawberry.relay import GlobalID

        archived = str(GlobalID("TokenPackage", str(packages[0].id)))
        result = await shop.start_checkout(packageId=archived)
        assert (result["__typename"], result["field"]) == ("InvalidInput", "packageId")

    async def test_the_same_idempotency_key_is_the_same_purchase(self, shop: Shop) -> None:
        first, first_url = await shop.checkout(package="tokens-50", key="buy-1")
        again, again_url = await shop.checkout(package="tokens-50", key="buy-1")
        assert (again["id"], again_url) == (first["id"], first_url)
        assert await count(shop, "purchases") == 1
        assert len([e for e in await shop.simulator.events() if e["type"] == "customer.created"]) == 1
        conflict = await shop.start_checkout(package="tokens-100", key="buy-1")
        assert (conflict["__typename"], conflict["code"]) == ("IdempotencyConflict", "IDEMPOTENCY_CONFLICT")
        custom = await shop.start_checkout(tokens=7, key="buy-2")
        assert custom["__typename"] == "CheckoutStarted"
        assert (await shop.start_checkout(tokens=8, key="buy-2"))["__typename"] == "IdempotencyConflict"
        assert await count(shop, "purchases") == 2

    async def test_who_may_buy(self, shop: Shop) -> None:
        for role in ("VIEWER", "MEMBER", "BILLING", "ADMIN"):
            await add_member(shop.client, shop.org, subject=f"{shop.owner}-{role}", role=role, as_=shop.owner)
        for role, expected in (
            ("VIEWER", "FORBIDDEN"),
            ("MEMBER", "FORBIDDEN"),
            ("BILLING", None),
            ("ADMIN", None),
        ):
            body = await shop.client.raw(
                START_CHECKOUT,
                {
                    "input": {
                        "organizationId": shop.org,
                        "tokens": 5,
                        "successUrl": "https://a.example",
                        "cancelUrl": "https://a.example",
                    }
                },
                as_=f"{shop.owner}-{role}",
            )
            assert error_code(body, "startCheckout") == expected, (role, body)
        outsider_org = await create_org(shop.client, "outsider-buyer")
        assert outsider_org
        body = await shop.client.raw(
            START_CHECKOUT,
            {
                "input": {
                    "organizationId": shop.org,
                    "tokens": 5,
                    "successUrl": "https://a.example",
                    "cancelUrl": "https://a.example",
                }
            },
            as_="outsider-buyer",
        )
        assert error_code(body, "startCheckout") == "NOT_FOUND"
        _, with_scope = await create_api_key(
            shop.client, shop.org, scopes=["tokens.purchase"], as_=shop.owner
        )
        _, without = await create_api_key(
            shop.client, shop.org, scopes=["tokens.view", "tokens.consume"], as_=shop.owner
        )
        variables = {
            "input": {
                "organizationId": shop.org,
                "tokens": 5,
                "successUrl": "https://a.example",
                "cancelUrl": "https://a.example",
            }
        }
        assert (
            error_code(await shop.client.raw(START_CHECKOUT, variables, bearer=with_scope), "startCheckout")
            is None
        )
        assert error_code(
            await shop.client.raw(START_CHECKOUT, variables, bearer=without), "startCheckout"
        ) == ("FORBIDDEN")
        rows = await shop.sql("SELECT created_by FROM purchases ORDER BY id")
        assert [r.created_by.split(":")[0] for r in rows] == [
            f"{shop.owner}-BILLING",
            f"{shop.owner}-ADMIN",
            "apikey",
        ]


class TestSavedCard:
    async def test_without_a_saved_card(self, shop: Shop) -> None:
        result = await buy_with_saved_card(shop, "k1")
        assert (result["__typename"], result["code"]) == ("PaymentMethodRequired", "PAYMENT_METHOD_REQUIRED")
        assert await count(shop, "purchases") == 0

    async def test_save_a_card_then_buy_with_it(self, shop: Shop) -> None:
        await save_card(shop)
        [customer] = await shop.sql("SELECT customer_id, default_payment_method FROM stripe_customers")
        assert customer.default_payment_method.startswith("pm_")
        assert (
            await shop.gateway.default_payment_method_id(customer.customer_id)
            == customer.default_payment_method
        )
        saved = [
            row.outcome
            for row in await shop.stripe_events()
            if row.type in ("setup_intent.succeeded", "checkout.session.completed")
        ]
        assert sorted(saved) == ["already_saved", "payment_method_saved"]
        before = await shop.balance()
        result = await buy_with_saved_card(shop, "k1")
        assert result["__typename"] == "PurchaseStarted", result
        assert (result["purchase"]["method"], result["purchase"]["amountMinor"]) == ("SAVED_CARD", 9000)
        await shop.drain()
        paid = await shop.purchase(result["purchase"]["id"])
        assert paid["status"] == "PAID" and paid["receiptUrl"]
        assert await shop.balance() == before + 100
        # The same request again: the same purchase, not a second charge.
        again = await buy_with_saved_card(shop, "k1")
        assert again["purchase"]["id"] == paid["id"]
        await shop.drain()
        assert len(await shop.simulator.events("payment_intent.succeeded")) == 1
        assert await shop.purchase_entries() == [("purchase", 100)]
        conflict = await buy_with_saved_card(shop, "k1", tokens=3)
        assert conflict["__typename"] == "IdempotencyConflict"

    async def test_a_declined_card(self, shop: Shop) -> None:
        await save_card(shop, SAVES_BUT_DECLINES)
        result = await buy_with_saved_card(shop, "k1", tokens=30)
        assert (result["__typename"], result["code"], result["declineCode"]) == (
            "PaymentDeclined",
            "PAYMENT_DECLINED",
            "generic_decline",
        )
        assert result["purchase"]["status"] == "FAILED"
        assert "declined" in result["purchase"]["failureReason"]
        await shop.drain()
        assert (await shop.purchase(result["purchase"]["id"]))["status"] == "FAILED"
        assert await shop.purchase_entries() == []
        again = await buy_with_saved_card(shop, "k1", tokens=30)
        assert (again["__typename"], again["purchase"]["id"]) == ("PaymentDeclined", result["purchase"]["id"])
        assert len(await shop.simulator.events("payment_intent.payment_failed")) == 1

    async def test_who_may_save_a_card(self, shop: Shop) -> None:
        await add_member(shop.client, shop.org, subject=f"{shop.owner}-m", role="MEMBER", as_=shop.owner)
        variables = {
            "input": {
                "organizationId": shop.org,
                "successUrl": "https://a.example",
                "cancelUrl": "https://a.example",
            }
        }
        body = await shop.client.raw(SETUP_PAYMENT_METHOD, variables, as_=f"{shop.owner}-m")
        assert error_code(body, "setupPaymentMethod") == "FORBIDDEN"
        bad = {"input": {**variables["input"], "successUrl": "nope"}}
        result = (await shop.client.data(SETUP_PAYMENT_METHOD, bad, as_=shop.owner))["setupPaymentMethod"]
        assert (result["__typename"], result["field"]) == ("InvalidInput", "successUrl")


HISTORY = f"""
query($id: ID!, $first: Int, $after: String, $status: [PurchaseStatus!]) {{
  organization(id: $id) {{
    purchases(first: $first, after: $after, status: $status) {{
      edges {{ cursor node {{ {PURCHASE_FIELDS} }} }}
      pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
    }}
  }}
}}
"""


class TestHistory:
    async def test_pages_newest_first_and_filters_by_status(self, shop: Shop) -> None:
        made = []
        for tokens in (1, 2, 3):
            purchase, url = await shop.checkout(tokens=tokens)
            made.append(purchase["id"])
        await shop.pay(url)  # the last one is paid
        page = (await shop.client.data(HISTORY, {"id": shop.org, "first": 2}, as_=shop.owner))[
            "organization"
        ]["purchases"]
        assert [e["node"]["tokens"] for e in page["edges"]] == [3, 2]
        assert page["pageInfo"]["hasNextPage"] is True
        rest = (
            await shop.client.data(
                HISTORY, {"id": shop.org, "first": 2, "after": page["pageInfo"]["endCursor"]}, as_=shop.owner
            )
        )["organization"]["purchases"]
        assert [e["node"]["tokens"] for e in rest["edges"]] == [1]
        assert rest["pageInfo"] == {**rest["pageInfo"], "hasNextPage": False, "hasPreviousPage": True}
        paid = (await shop.client.data(HISTORY, {"id": shop.org, "status": ["PAID"]}, as_=shop.owner))[
            "organization"
        ]["purchases"]
        assert [e["node"]["id"] for e in paid["edges"]] == [made[-1]]
        bad = await shop.client.raw(HISTORY, {"id": shop.org, "after": "bm9wZQ=="}, as_=shop.owner)
        assert bad["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

    async def test_another_organizations_purchase_is_not_found(self, shop: Shop) -> None:
        purchase, _ = await shop.checkout(tokens=4)
        await create_org(shop.client, "someone-else")
        assert (await shop.client.data(PURCHASE, {"id": purchase["id"]}, as_="someone-else"))[
            "purchase"
        ] is None
        node = "query($id: ID!) { node(id: $id) { ... on Purchase { reference } } }"
        assert (await shop.client.data(node, {"id": purchase["id"]}, as_="someone-else"))["node"] is None
        mine = (await shop.client.data(node, {"id": purchase["id"]}, as_=shop.owner))["node"]
        assert mine == {"reference": purchase["reference"]}
        assert (await shop.client.data(PURCHASE, {"id": "garbage"}, as_=shop.owner))["purchase"] is None
