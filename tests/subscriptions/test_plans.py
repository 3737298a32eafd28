"""Subscription plans: staff make each one a Stripe Product with a recurring Price (read back
from the simulator through the app's gateway, the real SDK), reprice it with a new Price and
archive it; members see the plans on sale; bad input and a failing Stripe leave nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from orgwallet.payments.gateway import StripeGateway
from tests.helpers import add_member, create_org
from tests.purchasing import Shop, stripe_unreachable

ADMIN = "root-admin"  # tests/conftest.py's platform admin

PLAN_FIELDS = """
  id code name tokensPerPeriod unlimited interval intervalCount priceMinor currency rollover
  rolloverCap active sort
"""
CREATE_PLAN = f"""
mutation($input: CreatePlanInput!) {{
  createPlan(input: $input) {{
    __typename
    ... on PlanSaved {{ plan {{ {PLAN_FIELDS} }} }}
    ... on UserError {{ code message }}
    ... on InvalidInput {{ field }}
  }}
}}
"""
UPDATE_PLAN = f"""
mutation($input: UpdatePlanInput!) {{
  updatePlan(input: $input) {{
    __typename
    ... on PlanSaved {{ plan {{ {PLAN_FIELDS} }} }}
    ... on UserError {{ code message }}
    ... on InvalidInput {{ field }}
  }}
}}
"""
PLANS = f"query($org: ID) {{ plans(organizationId: $org) {{ {PLAN_FIELDS} }} }}"
NODE = "query($id: ID!) { node(id: $id) { ... on SubscriptionPlan { code active priceMinor } } }"

PRO = {
    "code": "pro-monthly",
    "name": "Pro",
    "tokensPerPeriod": 1000,
    "interval": "MONTH",
    "priceMinor": 2900,
}


def plan_input(**changes: Any) -> dict[str, Any]:
    return PRO | changes


async def create_plan(shop: Shop, as_: str = ADMIN, **changes: Any) -> dict[str, Any]:
    """The raw result of createPlan."""
    data = await shop.client.data(CREATE_PLAN, {"input": plan_input(**changes)}, as_=as_)
    result: dict[str, Any] = data["createPlan"]
    return result


async def created(shop: Shop, **changes: Any) -> dict[str, Any]:
    """A plan made by staff (the plan's fields)."""
    result = await create_plan(shop, **changes)
    assert result["__typename"] == "PlanSaved", result
    plan: dict[str, Any] = result["plan"]
    return plan


async def update_plan(shop: Shop, plan_id: str, as_: str = ADMIN, **changes: Any) -> dict[str, Any]:
    data = await shop.client.data(UPDATE_PLAN, {"input": {"planId": plan_id, **changes}}, as_=as_)
    result: dict[str, Any] = data["updatePlan"]
    return result


async def plan_rows(shop: Shop) -> list[Any]:
    return await shop.sql(
        "SELECT id, code, price_minor, active, stripe_product_id, stripe_price_id FROM subscription_plans"
    )


async def stripe_ids(shop: Shop, code: str) -> tuple[str, str]:
    [row] = await shop.sql(
        "SELECT stripe_product_id, stripe_price_id FROM subscription_plans WHERE code = :code", code=code
    )
    return row.stripe_product_id, row.stripe_price_id


async def plan_audit(shop: Shop) -> list[Any]:
    return await shop.sql(
        "SELECT action, actor, target_id, before, after FROM audit_log"
        " WHERE target_type = 'subscription_plan' ORDER BY id"
    )


async def stripe_made(shop: Shop) -> int:
    """Products and prices the simulator has made."""
    return len(await shop.simulator.events("product.created")) + len(
        await shop.simulator.events("price.created")
    )


async def codes(shop: Shop, org: str | None, as_: str) -> list[str]:
    return [plan["code"] for plan in (await shop.client.data(PLANS, {"org": org}, as_=as_))["plans"]]


class TestCreatePlan:
    async def test_a_plan_is_a_stripe_product_with_a_monthly_price(self, shop: Shop) -> None:
        plan = await created(shop)
        assert plan | {"id": None} == {
            "id": None,
            "code": "pro-monthly",
            "name": "Pro",
            "tokensPerPeriod": 1000,
            "unlimited": False,
            "interval": "MONTH",
            "intervalCount": 1,
            "priceMinor": 2900,
            "currency": "USD",
            "rollover": "EXPIRE",
            "rolloverCap": None,
            "active": True,
            "sort": 0,
        }
        product_id, price_id = await stripe_ids(shop, "pro-monthly")
        [row] = await plan_rows(shop)
        gateway: StripeGateway = shop.gateway
        product = await gateway.retrieve_product(product_id)
        assert (product.name, product.active) == ("Pro", True)
        assert product.metadata.to_dict() == {"plan_id": str(row.id), "code": "pro-monthly"}
        price = await gateway.retrieve_price(price_id)
        assert (price.product, price.unit_amount, price.currency, price.active) == (
            product_id,
            2900,
            "usd",
            True,
        )
        assert price.recurring is not None
        assert (price.recurring.interval, price.recurring.interval_count) == ("month", 1)
        assert price.metadata.to_dict() == {"plan_id": str(row.id)}

        [entry] = await plan_audit(shop)
        assert (entry.action, entry.actor, entry.target_id, entry.before) == (
            "plan.create",
            ADMIN,
            str(row.id),
            None,
        )
        assert entry.after["stripe_price_id"] == price_id and entry.after["price_minor"] == 2900

    async def test_members_and_any_signed_in_caller_see_the_plans_on_sale(self, shop: Shop) -> None:
        await created(shop, code="team", name="Team", priceMinor=9900, sort=2)
        await created(shop)
        await created(
            shop,
            code="daily-unlimited",
            name="Unlimited",
            tokensPerPeriod=0,
            unlimited=True,
            interval="DAY",
            intervalCount=7,
            priceMinor=500,
            sort=1,
        )
        assert await codes(shop, shop.org, shop.owner) == ["pro-monthly", "daily-unlimited", "team"]
        assert await codes(shop, None, "someone-signed-in") == ["pro-monthly", "daily-unlimited", "team"]
        [unlimited] = [
            p
            for p in (await shop.client.data(PLANS, {"org": None}, as_=shop.owner))["plans"]
            if p["unlimited"]
        ]
        assert (unlimited["tokensPerPeriod"], unlimited["interval"], unlimited["intervalCount"]) == (
            0,
            "DAY",
            7,
        )

    async def test_a_rollover_plan_keeps_its_cap(self, shop: Shop) -> None:
        plan = await created(shop, rollover="ROLLOVER", rolloverCap=3000)
        assert (plan["rollover"], plan["rolloverCap"]) == ("ROLLOVER", 3000)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"code": "Pro Monthly"}, "code"),
            ({"name": "   "}, "name"),
            ({"tokensPerPeriod": 0}, "tokensPerPeriod"),
            ({"tokensPerPeriod": -5}, "tokensPerPeriod"),
            ({"tokensPerPeriod": 1.5}, "tokensPerPeriod"),
            ({"unlimited": True, "tokensPerPeriod": 5}, "tokensPerPeriod"),
            ({"intervalCount": 0}, "intervalCount"),
            ({"intervalCount": 13}, "intervalCount"),
            ({"interval": "WEEK", "intervalCount": 53}, "intervalCount"),
            ({"interval": "DAY", "intervalCount": 366}, "intervalCount"),
            ({"interval": "YEAR", "intervalCount": 2}, "intervalCount"),
            ({"priceMinor": 0}, "priceMinor"),
            ({"priceMinor": 100_000_000}, "priceMinor"),
            ({"currency": "dollars"}, "currency"),
            ({"rollover": "ROLLOVER"}, "rolloverCap"),
            ({"rollover": "ROLLOVER", "rolloverCap": 999}, "rolloverCap"),
            ({"rollover": "EXPIRE", "rolloverCap": 5000}, "rolloverCap"),
            (
                {"unlimited": True, "tokensPerPeriod": 0, "rollover": "ROLLOVER", "rolloverCap": 5},
                "rolloverCap",
            ),
        ],
    )
    async def test_bad_input_is_typed_and_writes_nothing(
        self, shop: Shop, changes: dict[str, Any], field: str
    ) -> None:
        result = await create_plan(shop, **changes)
        assert (result["__typename"], result["code"], result["field"]) == (
            "InvalidInput",
            "INVALID_INPUT",
            field,
        )
        assert await plan_rows(shop) == []
        assert await stripe_made(shop) == 0
        assert await plan_audit(shop) == []

    async def test_a_code_is_taken_once(self, shop: Shop) -> None:
        await created(shop)
        made = await stripe_made(shop)
        again = await create_plan(shop, name="Another")
        assert (again["__typename"], again["code"]) == ("Conflict", "PLAN_CODE_TAKEN")
        assert len(await plan_rows(shop)) == 1
        assert await stripe_made(shop) == made

    async def test_a_plan_left_half_made_is_finished_by_the_same_request(self, shop: Shop) -> None:
        """A crash between the plan's commit and Stripe's answer leaves a row without Stripe
        ids: not on sale, and createPlan with the same values finishes it (another is refused)."""
        await shop.sql_write(
            "INSERT INTO subscription_plans (code, name, tokens_per_period, interval, price_minor, rollover)"
            " VALUES ('pro-monthly', 'Pro', 1000, 'month', 2900, 'expire')"
        )
        assert await codes(shop, None, shop.owner) == []
        different = await create_plan(shop, priceMinor=3900)
        assert (different["__typename"], different["code"]) == ("Conflict", "PLAN_CODE_TAKEN")
        [half_made] = await plan_rows(shop)
        plan = await created(shop)
        [row] = await plan_rows(shop)
        assert row.id == half_made.id and row.stripe_price_id is not None
        assert await codes(shop, None, shop.owner) == [plan["code"]]

    @pytest.mark.parametrize(
        "values",
        [
            {
                "tokens": 5,
                "unlimited": True,
                "interval": "month",
                "count": 1,
                "rollover": "expire",
                "cap": None,
            },
            {
                "tokens": 5,
                "unlimited": False,
                "interval": "month",
                "count": 1,
                "rollover": "rollover",
                "cap": None,
            },
            {
                "tokens": 5,
                "unlimited": False,
                "interval": "month",
                "count": 1,
                "rollover": "expire",
                "cap": 10,
            },
            {
                "tokens": 5,
                "unlimited": False,
                "interval": "month",
                "count": 1,
                "rollover": "rollover",
                "cap": 4,
            },
            {
                "tokens": 5,
                "unlimited": False,
                "interval": "year",
                "count": 2,
                "rollover": "expire",
                "cap": None,
            },
            {
                "tokens": 5,
                "unlimited": False,
                "interval": "week",
                "count": 53,
                "rollover": "expire",
                "cap": None,
            },
            {
                "tokens": 0,
                "unlimited": False,
                "interval": "month",
                "count": 1,
                "rollover": "expire",
                "cap": None,
            },
        ],
        ids=[
            "unlimited-with-tokens",
            "rollover-no-cap",
            "cap-without-rollover",
            "cap-below-a-period",
            "two-years",
            "53-weeks",
            "no-tokens",
        ],
    )
    async def test_the_database_refuses_a_plan_that_breaks_the_rules(
        self, shop: Shop, values: dict[str, Any]
    ) -> None:
        with pytest.raises(IntegrityError, match="CheckViolation"):
            await shop.sql_write(
                "INSERT INTO subscription_plans (code, name, tokens_per_period, unlimited, interval,"
                " interval_count, rollover, rollover_cap, price_minor)"
                " VALUES ('broken', 'Broken', :tokens, :unlimited, :interval, :count, :rollover, :cap, 100)",
                **values,
            )
        assert await plan_rows(shop) == []

    async def test_only_platform_admins_create_plans(self, shop: Shop) -> None:
        body = await shop.client.raw(CREATE_PLAN, {"input": plan_input()}, as_=shop.owner)
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        anonymous = await shop.client.raw(CREATE_PLAN, {"input": plan_input()})
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert await plan_rows(shop) == []
        assert await stripe_made(shop) == 0

    async def test_stripe_unreachable_is_typed_and_leaves_no_plan(self, shop: Shop) -> None:
        with stripe_unreachable(shop):
            result = await create_plan(shop)
        assert (result["__typename"], result["code"]) == ("PaymentProviderError", "PAYMENT_PROVIDER_ERROR")
        assert "the plan was not created" in result["message"]
        assert await plan_rows(shop) == []
        assert await plan_audit(shop) == []
        # Nothing holds the code: the same plan can be created once Stripe answers.
        assert (await created(shop))["code"] == "pro-monthly"


class TestUpdatePlan:
    async def test_a_new_price_is_a_new_stripe_price_and_the_old_one_is_archived(self, shop: Shop) -> None:
        plan = await created(shop)
        product_id, old_price = await stripe_ids(shop, "pro-monthly")
        result = await update_plan(shop, plan["id"], priceMinor=3400)
        assert result["__typename"] == "PlanSaved", result
        assert result["plan"]["priceMinor"] == 3400
        same_product, new_price = await stripe_ids(shop, "pro-monthly")
        assert same_product == product_id and new_price != old_price
        gateway: StripeGateway = shop.gateway
        assert (await gateway.retrieve_price(old_price)).active is False
        price = await gateway.retrieve_price(new_price)
        assert (price.unit_amount, price.active, price.product) == (3400, True, product_id)
        assert price.recurring is not None and price.recurring.interval == "month"
        assert [
            p["priceMinor"]
            for p in (await shop.client.data(PLANS, {"org": shop.org}, as_=shop.owner))["plans"]
        ] == [3400]

        update = (await plan_audit(shop))[-1]
        assert update.action == "plan.update"
        assert (update.before["price_minor"], update.before["stripe_price_id"]) == (2900, old_price)
        assert (update.after["price_minor"], update.after["stripe_price_id"]) == (3400, new_price)

    async def test_a_rename_renames_the_stripe_product(self, shop: Shop) -> None:
        plan = await created(shop)
        result = await update_plan(shop, plan["id"], name="Pro (2027)")
        assert result["plan"]["name"] == "Pro (2027)"
        product_id, _ = await stripe_ids(shop, "pro-monthly")
        assert (await shop.gateway.retrieve_product(product_id)).name == "Pro (2027)"

    async def test_an_archived_plan_is_off_sale_and_visible_to_staff_only(self, shop: Shop) -> None:
        plan = await created(shop)
        result = await update_plan(shop, plan["id"], active=False)
        assert result["plan"]["active"] is False
        product_id, _ = await stripe_ids(shop, "pro-monthly")
        assert (await shop.gateway.retrieve_product(product_id)).active is False
        assert await codes(shop, shop.org, shop.owner) == []
        assert await codes(shop, None, ADMIN) == []
        member_view = await shop.client.data(NODE, {"id": plan["id"]}, as_=shop.owner)
        assert member_view["node"] is None
        staff_view = await shop.client.data(NODE, {"id": plan["id"]}, as_=ADMIN)
        assert staff_view["node"] == {"code": "pro-monthly", "active": False, "priceMinor": 2900}
        [_, archive] = await plan_audit(shop)
        assert (archive.action, archive.before["active"], archive.after["active"]) == (
            "plan.update",
            True,
            False,
        )

        restored = await update_plan(shop, plan["id"], active=True)
        assert restored["plan"]["active"] is True
        assert (await shop.gateway.retrieve_product(product_id)).active is True
        assert await codes(shop, shop.org, shop.owner) == ["pro-monthly"]

    async def test_members_see_active_plans_through_node(self, shop: Shop) -> None:
        plan = await created(shop)
        found = await shop.client.data(NODE, {"id": plan["id"]}, as_=shop.owner)
        assert found["node"] == {"code": "pro-monthly", "active": True, "priceMinor": 2900}
        anonymous = await shop.client.raw(NODE, {"id": plan["id"]})
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"

    async def test_bad_input_and_an_unknown_plan_change_nothing(self, shop: Shop) -> None:
        plan = await created(shop)
        before = await plan_rows(shop)
        made = await stripe_made(shop)
        bad_price = await update_plan(shop, plan["id"], priceMinor=0)
        assert (bad_price["__typename"], bad_price["field"]) == ("InvalidInput", "priceMinor")
        bad_name = await update_plan(shop, plan["id"], name="")
        assert (bad_name["__typename"], bad_name["field"]) == ("InvalidInput", "name")
        not_an_id = await update_plan(shop, "nope", name="X")
        assert (not_an_id["__typename"], not_an_id["field"]) == ("InvalidInput", "planId")
        package_id = await shop.package_id("tokens-10")
        other_type = await update_plan(shop, package_id, name="X")
        assert other_type["__typename"] == "NotFound"
        assert await plan_rows(shop) == before
        assert await stripe_made(shop) == made
        assert len(await plan_audit(shop)) == 1  # the creation only

    async def test_only_platform_admins_update_plans(self, shop: Shop) -> None:
        plan = await created(shop)
        body = await shop.client.raw(
            UPDATE_PLAN, {"input": {"planId": plan["id"], "active": False}}, as_=shop.owner
        )
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        assert [row.active for row in await plan_rows(shop)] == [True]

    async def test_stripe_unreachable_is_typed_and_changes_nothing(self, shop: Shop) -> None:
        plan = await created(shop)
        before = await plan_rows(shop)
        with stripe_unreachable(shop):
            result = await update_plan(shop, plan["id"], priceMinor=3400, active=False)
        assert (result["__typename"], result["code"]) == ("PaymentProviderError", "PAYMENT_PROVIDER_ERROR")
        assert await plan_rows(shop) == before
        assert len(await plan_audit(shop)) == 1


class TestPlansQuery:
    async def test_another_organizations_plans_are_not_found(self, shop: Shop) -> None:
        await created(shop)
        other = await create_org(shop.client, "other-owner", name="Other")
        body = await shop.client.raw(PLANS, {"org": other}, as_=shop.owner)
        assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert body["data"] is None

    async def test_any_member_role_may_read_them_and_staff_any_organization(self, shop: Shop) -> None:
        await created(shop)
        await add_member(shop.client, shop.org, subject="viewer-1", role="VIEWER", as_=shop.owner)
        assert await codes(shop, shop.org, "viewer-1") == ["pro-monthly"]
        assert await codes(shop, shop.org, ADMIN) == ["pro-monthly"]

    async def test_anonymous_callers_are_unauthenticated(self, shop: Shop) -> None:
        body = await shop.client.raw(PLANS, {"org": None})
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
