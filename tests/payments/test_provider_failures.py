"""A payment provider call that fails (not a decline) is a typed error, and the purchase it was
for is FAILED with the reason: never "Unexpected error." and a PENDING purchase that nobody
will finish. Stripe is the simulator, reached through the real SDK: it refuses a card it does
not know; and a Stripe nobody listens for is a loopback port that is closed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orgwallet.services import purchases
from tests.payments.test_purchases import buy_with_saved_card, save_card
from tests.purchasing import CANCEL_URL, PURCHASE_FIELDS, SUCCESS_URL, Shop, stripe_unreachable

PROVIDER_ERROR = f"... on PaymentProviderError {{ code message purchase {{ {PURCHASE_FIELDS} }} }}"
START = f"""
mutation($input: StartCheckoutInput!) {{
  startCheckout(input: $input) {{ __typename {PROVIDER_ERROR} ... on UserError {{ code message }} }}
}}
"""
SAVED = f"""
mutation($input: PurchaseWithSavedCardInput!) {{
  purchaseWithSavedCard(input: $input) {{ __typename {PROVIDER_ERROR} ... on UserError {{ code message }} }}
}}
"""
SETUP = """
mutation($input: SetupPaymentMethodInput!) {
  setupPaymentMethod(input: $input) { __typename ... on UserError { code message } }
}
"""


@pytest.fixture
def unreachable_stripe(shop: Shop) -> Iterator[None]:
    with stripe_unreachable(shop):
        yield


async def _purchases(shop: Shop) -> list[Any]:
    return await shop.sql(
        "SELECT status, failure_reason FROM purchases WHERE organization_id = :org ORDER BY created_at",
        org=shop.org_id,
    )


async def test_a_saved_card_stripe_does_not_know_fails_the_purchase(shop: Shop) -> None:
    await save_card(shop)
    await shop.sql_write(
        "UPDATE stripe_customers SET default_payment_method = 'pm_unknown' WHERE organization_id = :org",
        org=shop.org_id,
    )
    balance = await shop.balance()
    variables = {
        "organizationId": shop.org,
        "idempotencyKey": "k1",
        "packageId": await shop.package_id("tokens-10"),
    }
    result = (await shop.client.data(SAVED, {"input": variables}, as_=shop.owner))["purchaseWithSavedCard"]
    assert result["__typename"] == "PaymentProviderError", result
    assert result["code"] == "PAYMENT_PROVIDER_ERROR"
    assert "refused" in result["message"]
    assert result["purchase"]["status"] == "FAILED"
    assert [row.status for row in await _purchases(shop)] == ["failed"]
    assert await shop.balance() == balance
    told = await shop.sql(
        "SELECT kind FROM notifications WHERE organization_id = :org AND kind = 'purchase_failed'",
        org=shop.org_id,
    )
    assert len(told) == 1

    # The same key again: the same failed purchase, nothing charged, nothing new.
    again = await buy_with_saved_card(shop, "k1", packageId=await shop.package_id("tokens-10"))
    assert again["__typename"] == "PaymentDeclined" and again["purchase"]["status"] == "FAILED", again
    assert len(await _purchases(shop)) == 1


@pytest.mark.usefixtures("unreachable_stripe")
async def test_checkout_with_stripe_unreachable_is_typed_and_leaves_no_pending_purchase(shop: Shop) -> None:
    base = {"organizationId": shop.org, "tokens": 25, "successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL}
    keyless = (await shop.client.data(START, {"input": base}, as_=shop.owner))["startCheckout"]
    assert keyless["__typename"] == "PaymentProviderError", keyless
    assert keyless["purchase"] is None and "could not be reached" in keyless["message"]
    assert await _purchases(shop) == []  # nobody can come back for it: nothing is left

    # With a key, Stripe may have made the session before the connection failed: the purchase
    # waits for the same key (Stripe's idempotency key then gives the same session)...
    keyed = base | {"idempotencyKey": "checkout-1"}
    first = (await shop.client.data(START, {"input": keyed}, as_=shop.owner))["startCheckout"]
    assert first["__typename"] == "PaymentProviderError", first
    assert "try again with the same idempotency key" in first["message"]
    assert [row.status for row in await _purchases(shop)] == ["pending"]
    # ... and if nobody comes back, the duty removes it: nothing is left PENDING.
    now = datetime.now(UTC)
    assert await purchases.remove_abandoned(shop.app.state.runtime.sessions, now) == 0
    later = now + purchases.ABANDONED_AFTER + timedelta(seconds=1)
    assert await purchases.remove_abandoned(shop.app.state.runtime.sessions, later) == 1
    assert await _purchases(shop) == []


@pytest.mark.usefixtures("unreachable_stripe")
async def test_saving_a_card_with_stripe_unreachable_is_typed_and_writes_nothing(shop: Shop) -> None:
    before = await shop.sql("SELECT count(*) AS n FROM stripe_customers")
    variables = {"input": {"organizationId": shop.org, "successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL}}
    result = (await shop.client.data(SETUP, variables, as_=shop.owner))["setupPaymentMethod"]
    assert result == {
        "__typename": "PaymentProviderError",
        "code": "PAYMENT_PROVIDER_ERROR",
        "message": result["message"],
    }
    assert await shop.sql("SELECT count(*) AS n FROM stripe_customers") == before
