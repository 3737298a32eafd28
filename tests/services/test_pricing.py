"""Prices: the seeded catalogue, volume tiers at every boundary, per-organization prices, and
the platform admins' management of all three (over GraphQL, as the SPA and staff use it)."""

from __future__ import annotations

from typing import Any

import pytest

from orgwallet.config import Settings
from orgwallet.errors import InvalidInput
from orgwallet.services import pricing
from tests.helpers import add_member, create_org, error_code
from tests.purchasing import PACKAGES, Shop

ADMIN = "root-admin"

QUOTE = """
query($org: ID!, $tokens: BigInt!) {
  quote(organizationId: $org, tokens: $tokens) { tokens priceMinor currency unitPriceMinor }
}
"""
CREATE_PACKAGE = """
mutation($input: CreateTokenPackageInput!) {
  createTokenPackage(input: $input) {
    __typename
    ... on TokenPackageSaved { package { id code name tokens priceMinor badge active savingsPercent } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""
UPDATE_PACKAGE = """
mutation($input: UpdateTokenPackageInput!) {
  updateTokenPackage(input: $input) {
    __typename
    ... on TokenPackageSaved { package { id code name tokens priceMinor badge active } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""
ARCHIVE_PACKAGE = """
mutation($id: ID!) {
  archiveTokenPackage(input: {packageId: $id}) {
    __typename
    ... on TokenPackageSaved { package { code active } }
    ... on UserError { code message }
  }
}
"""
SET_TIERS = """
mutation($input: SetPriceTiersInput!) {
  setPriceTiers(input: $input) {
    __typename
    ... on PriceTiersSet { tiers { minTokens unitPriceMinor currency } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""
SET_ORG_PRICE = """
mutation($input: SetOrganizationPriceInput!) {
  setOrganizationPrice(input: $input) {
    __typename
    ... on OrganizationPriceSet {
      price { packageId priceMinor discountPercent }
      packages { code priceMinor }
    }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""
CLEAR_ORG_PRICE = """
mutation($input: ClearOrganizationPriceInput!) {
  clearOrganizationPrice(input: $input) {
    __typename
    ... on OrganizationPriceCleared { packages { code priceMinor } }
    ... on UserError { code message }
  }
}
"""


async def catalogue(shop: Shop, org: str | None = None, as_: str | None = None) -> dict[str, dict[str, Any]]:
    data = await shop.client.data(PACKAGES, {"org": org}, as_=as_ or shop.owner)
    return {p["code"]: p for p in data["packages"]}


async def quote(shop: Shop, tokens: object, org: str | None = None) -> dict[str, Any]:
    body = await shop.client.raw(QUOTE, {"org": org or shop.org, "tokens": tokens}, as_=shop.owner)
    return body


async def as_admin(shop: Shop, document: str, field: str, variables: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = (await shop.client.data(document, variables, as_=ADMIN))[field]
    return result


class TestCatalogue:
    async def test_the_seeded_packages(self, shop: Shop) -> None:
        data = await shop.client.data(PACKAGES, {"org": shop.org}, as_=shop.owner)
        seen = [
            (
                p["code"],
                p["tokens"],
                p["priceMinor"],
                p["currency"],
                p["unitPriceMinor"],
                p["savingsPercent"],
                p["badge"],
            )
            for p in data["packages"]
        ]
        assert seen == [
            ("tokens-10", 10, 1000, "USD", 100.0, 0, None),
            ("tokens-50", 50, 4500, "USD", 90.0, 10, None),
            ("tokens-100", 100, 9000, "USD", 90.0, 10, None),
            ("tokens-500", 500, 40000, "USD", 80.0, 20, "BEST VALUE"),
        ]
        assert all(p["active"] and p["listPriceMinor"] == p["priceMinor"] for p in data["packages"])

    async def test_list_prices_without_an_organization(self, shop: Shop) -> None:
        assert (await catalogue(shop))["tokens-500"]["priceMinor"] == 40000

    async def test_a_non_member_does_not_find_the_organization(self, shop: Shop) -> None:
        await create_org(shop.client, "stranger")
        body = await shop.client.raw(PACKAGES, {"org": shop.org}, as_="stranger")
        assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert (await shop.client.raw(QUOTE, {"org": shop.org, "tokens": 5}, as_="stranger"))["errors"][0][
            "extensions"
        ]["code"] == "NOT_FOUND"

    async def test_anonymous_callers_see_nothing(self, shop: Shop) -> None:
        body = await shop.client.raw(PACKAGES, {"org": None})
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"

    async def test_a_viewer_sees_prices_and_quotes(self, shop: Shop) -> None:
        await add_member(shop.client, shop.org, subject="watcher", role="VIEWER", as_=shop.owner)
        assert len(await catalogue(shop, shop.org, as_="watcher")) == 4
        body = await shop.client.raw(QUOTE, {"org": shop.org, "tokens": 50}, as_="watcher")
        assert body["data"]["quote"]["priceMinor"] == 4500


class TestQuote:
    @pytest.mark.parametrize(
        ("tokens", "price", "unit"),
        [
            (1, 100, 100.0),
            (49, 4900, 100.0),
            (50, 4500, 90.0),
            (499, 44910, 90.0),
            (500, 40000, 80.0),
            (100_000, 8_000_000, 80.0),  # the configured maximum
        ],
    )
    async def test_tier_boundaries(self, shop: Shop, tokens: int, price: int, unit: float) -> None:
        body = await quote(shop, tokens)
        assert body["data"]["quote"] == {
            "tokens": tokens,
            "priceMinor": price,
            "currency": "USD",
            "unitPriceMinor": unit,
        }

    @pytest.mark.parametrize("tokens", [100_001, 0, -1, -500, 2.5, "12"])
    async def test_out_of_range(self, shop: Shop, tokens: object) -> None:
        body = await quote(shop, tokens)
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT", body
        assert "tokens must be a whole number between 1 and 100000" in body["errors"][0]["message"]

    def test_the_bounds_come_from_the_settings(self) -> None:
        settings = Settings(min_custom_tokens=10, max_custom_tokens=1000)
        assert pricing.custom_tokens(settings, 10) == 10
        assert pricing.custom_tokens(settings, 1000) == 1000
        for outside in (9, 1001):
            with pytest.raises(InvalidInput):
                pricing.custom_tokens(settings, outside)

    async def test_tiers_can_be_changed(self, shop: Shop) -> None:
        result = await as_admin(
            shop,
            SET_TIERS,
            "setPriceTiers",
            {
                "input": {
                    "tiers": [
                        {"minTokens": 1, "unitPriceMinor": 120},
                        {"minTokens": 1000, "unitPriceMinor": 70},
                    ]
                }
            },
        )
        assert result["tiers"] == [
            {"minTokens": 1, "unitPriceMinor": 120, "currency": "USD"},
            {"minTokens": 1000, "unitPriceMinor": 70, "currency": "USD"},
        ]
        assert (await quote(shop, 999))["data"]["quote"]["priceMinor"] == 119880
        assert (await quote(shop, 1000))["data"]["quote"]["priceMinor"] == 70000
        tiers = (await shop.client.data("{ priceTiers { minTokens unitPriceMinor } }", as_=shop.owner))[
            "priceTiers"
        ]
        assert [t["minTokens"] for t in tiers] == [1, 1000]

    @pytest.mark.parametrize(
        "tiers",
        [
            [],
            [{"minTokens": 5, "unitPriceMinor": 100}],  # 1 to 4 tokens would have no price
            [{"minTokens": 1, "unitPriceMinor": 100}, {"minTokens": 1, "unitPriceMinor": 90}],
            [{"minTokens": 1, "unitPriceMinor": 0}],
            [{"minTokens": 0, "unitPriceMinor": 100}],
        ],
    )
    async def test_bad_tiers_change_nothing(self, shop: Shop, tiers: list[dict[str, int]]) -> None:
        result = await as_admin(shop, SET_TIERS, "setPriceTiers", {"input": {"tiers": tiers}})
        assert result["__typename"] == "InvalidInput", result
        assert (await quote(shop, 50))["data"]["quote"]["priceMinor"] == 4500


class TestOrganizationPrices:
    async def test_a_fixed_price_for_one_package(self, shop: Shop) -> None:
        other = await create_org(shop.client, "other-buyer")
        package = await shop.package_id("tokens-50")
        result = await as_admin(
            shop,
            SET_ORG_PRICE,
            "setOrganizationPrice",
            {"input": {"organizationId": shop.org, "packageId": package, "priceMinor": 4000}},
        )
        assert result["__typename"] == "OrganizationPriceSet", result
        assert result["price"] == {"packageId": package, "priceMinor": 4000, "discountPercent": None}
        mine = await catalogue(shop, shop.org)
        assert (mine["tokens-50"]["priceMinor"], mine["tokens-50"]["listPriceMinor"]) == (4000, 4500)
        assert mine["tokens-50"]["savingsPercent"] == 20  # 80 a token against 100
        assert mine["tokens-10"]["priceMinor"] == 1000
        theirs = await catalogue(shop, other, as_="other-buyer")
        assert theirs["tokens-50"]["priceMinor"] == 4500
        # Buying it charges the organization's price.
        purchase, url = await shop.checkout(package="tokens-50")
        assert purchase["amountMinor"] == 4000
        assert "$40.00" in (await shop.browser.get(url)).text
        await shop.pay(url)
        assert await shop.purchase_entries() == [("purchase", 50)]

    async def test_a_discount_on_everything(self, shop: Shop) -> None:
        await as_admin(
            shop,
            SET_ORG_PRICE,
            "setOrganizationPrice",
            {"input": {"organizationId": shop.org, "discountPercent": 15}},
        )
        mine = await catalogue(shop, shop.org)
        assert {code: p["priceMinor"] for code, p in mine.items()} == {
            "tokens-10": 850,
            "tokens-50": 3825,
            "tokens-100": 7650,
            "tokens-500": 34000,
        }
        assert mine["tokens-500"]["savingsPercent"] == 20
        assert (await quote(shop, 49))["data"]["quote"]["priceMinor"] == 4165  # 4900 less 15%
        # A package's own discount wins over the discount on everything.
        package = await shop.package_id("tokens-10")
        await as_admin(
            shop,
            SET_ORG_PRICE,
            "setOrganizationPrice",
            {"input": {"organizationId": shop.org, "packageId": package, "discountPercent": 50}},
        )
        assert (await catalogue(shop, shop.org))["tokens-10"]["priceMinor"] == 500
        cleared = await as_admin(
            shop, CLEAR_ORG_PRICE, "clearOrganizationPrice", {"input": {"organizationId": shop.org}}
        )
        assert {p["code"]: p["priceMinor"] for p in cleared["packages"]}["tokens-100"] == 9000
        assert (await catalogue(shop, shop.org))["tokens-10"]["priceMinor"] == 500
        prices = (
            await shop.client.data(
                "query($org: ID!) { organizationPrices(organizationId: $org) "
                "{ priceMinor discountPercent } }",
                {"org": shop.org},
                as_=ADMIN,
            )
        )["organizationPrices"]
        assert prices == [{"priceMinor": None, "discountPercent": 50}]

    @pytest.mark.parametrize(
        "fields",
        [
            {"priceMinor": 100, "discountPercent": 10},
            {},
            {"priceMinor": 100},  # a fixed price needs a package
            {"discountPercent": 0},
            {"discountPercent": 100},
        ],
    )
    async def test_bad_prices(self, shop: Shop, fields: dict[str, Any]) -> None:
        result = await as_admin(
            shop, SET_ORG_PRICE, "setOrganizationPrice", {"input": {"organizationId": shop.org} | fields}
        )
        assert result["__typename"] == "InvalidInput", result
        assert await shop.sql("SELECT 1 FROM organization_prices") == []


class TestManagement:
    async def test_create_update_archive(self, shop: Shop) -> None:
        created = await as_admin(
            shop,
            CREATE_PACKAGE,
            "createTokenPackage",
            {
                "input": {
                    "code": "tokens-1000",
                    "name": "1000 tokens",
                    "tokens": 1000,
                    "priceMinor": 70000,
                    "badge": "NEW",
                    "sort": 50,
                }
            },
        )
        assert created["__typename"] == "TokenPackageSaved", created
        assert created["package"]["savingsPercent"] == 30
        package_id = created["package"]["id"]
        assert "tokens-1000" in await catalogue(shop, shop.org)
        taken = await as_admin(
            shop,
            CREATE_PACKAGE,
            "createTokenPackage",
            {"input": {"code": "tokens-1000", "name": "again", "tokens": 1, "priceMinor": 1}},
        )
        assert (taken["__typename"], taken["code"]) == ("Conflict", "PACKAGE_CODE_TAKEN")
        updated = await as_admin(
            shop,
            UPDATE_PACKAGE,
            "updateTokenPackage",
            {"input": {"packageId": package_id, "priceMinor": 65000, "badge": ""}},
        )
        assert (updated["package"]["priceMinor"], updated["package"]["badge"]) == (65000, None)
        archived = await as_admin(shop, ARCHIVE_PACKAGE, "archiveTokenPackage", {"id": package_id})
        assert archived["package"] == {"code": "tokens-1000", "active": False}
        assert "tokens-1000" not in await catalogue(shop, shop.org)
        everything = await shop.client.data("{ packages(includeArchived: true) { code active } }", as_=ADMIN)
        assert {"code": "tokens-1000", "active": False} in everything["packages"]
        owner_asks = await shop.client.raw("{ packages(includeArchived: true) { code } }", as_=shop.owner)
        assert owner_asks["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        actions = [
            row.action
            for row in await shop.sql(
                "SELECT action FROM audit_log WHERE target_type = 'token_package' ORDER BY at, id"
            )
        ]
        assert actions == ["package.create", "package.update", "package.archive"]

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"code": "Not A Code"}, "code"),
            ({"tokens": 0}, "tokens"),
            ({"priceMinor": 0}, "priceMinor"),
            ({"priceMinor": 100_000_000}, "priceMinor"),
            ({"currency": "dollars"}, "currency"),
            ({"name": " "}, "name"),
        ],
    )
    async def test_bad_packages(self, shop: Shop, fields: dict[str, Any], field: str) -> None:
        package = {"code": "p1", "name": "P", "tokens": 10, "priceMinor": 100} | fields
        result = await as_admin(shop, CREATE_PACKAGE, "createTokenPackage", {"input": package})
        assert (result["__typename"], result["field"]) == ("InvalidInput", field), result

    @pytest.mark.parametrize("who", ["owner", "api key"])
    async def test_only_platform_admins_manage(self, shop: Shop, who: str) -> None:
        from tests.helpers import create_api_key

        package = await shop.package_id("tokens-10")
        kwargs: dict[str, Any] = {"as_": shop.owner}
        if who == "api key":
            _, secret = await create_api_key(
                shop.client,
                shop.org,
                scopes=["tokens.view", "tokens.purchase", "tokens.configure"],
                as_=shop.owner,
            )
            kwargs = {"bearer": secret}
        calls = [
            (
                CREATE_PACKAGE,
                "createTokenPackage",
                {"input": {"code": "x", "name": "X", "tokens": 1, "priceMinor": 1}},
            ),
            (UPDATE_PACKAGE, "updateTokenPackage", {"input": {"packageId": package, "priceMinor": 1}}),
            (ARCHIVE_PACKAGE, "archiveTokenPackage", {"id": package}),
            (SET_TIERS, "setPriceTiers", {"input": {"tiers": [{"minTokens": 1, "unitPriceMinor": 1}]}}),
            (
                SET_ORG_PRICE,
                "setOrganizationPrice",
                {"input": {"organizationId": shop.org, "discountPercent": 99}},
            ),
            (CLEAR_ORG_PRICE, "clearOrganizationPrice", {"input": {"organizationId": shop.org}}),
        ]
        for document, field, variables in calls:
            body = await shop.client.raw(document, variables, **kwargs)
            assert error_code(body, field) == "FORBIDDEN", (field, body)
        assert (await catalogue(shop, shop.org))["tokens-10"]["priceMinor"] == 1000


class TestArithmetic:
    @pytest.mark.parametrize(
        ("price", "percent", "expected"), [(1000, 10, 900), (999, 15, 849), (1, 99, 1), (4500, 33, 3015)]
    )
    def test_discounts_round_half_up(self, price: int, percent: int, expected: int) -> None:
        assert pricing.discounted(price, percent) == expected

    def test_savings_are_whole_per_cent_without_floats(self) -> None:
        assert pricing.savings_percent(4500, 50, 1000, 10) == 10
        assert pricing.savings_percent(40000, 500, 1000, 10) == 20
        assert pricing.savings_percent(1000, 10, 1000, 10) == 0
        assert pricing.savings_percent(2000, 10, 1000, 10) == 0
        assert pricing.savings_percent(6666, 100, 1000, 10) == 33
