"""GraphQL types of subscriptions: plans (``SubscriptionPlan``), their inputs and payloads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Self

import strawberry
from strawberry import relay

from orgwallet.schema.context import Info
from orgwallet.schema.errors import Conflict, InvalidInput, NotFound
from orgwallet.schema.purchases import PaymentProviderError
from orgwallet.schema.scalars import BigInt
from orgwallet.schema.types import nodes_via
from orgwallet.services import plans as plan_service

# strawberry.enum registers the service's classes themselves (values by name: DAY, EXPIRE...),
# so fields are annotated with them.
strawberry.enum(plan_service.PlanInterval, name="PlanInterval")
strawberry.enum(plan_service.RolloverPolicy, name="RolloverPolicy")


@strawberry.type(description="A plan billed by Stripe every `intervalCount` `interval`s.")
class SubscriptionPlan(relay.Node):
    id: relay.NodeID[str]
    code: str
    name: str
    tokens_per_period: BigInt = strawberry.field(description="0 for an unlimited plan.")
    unlimited: bool = strawberry.field(description="Consumption is covered by the plan and draws no tokens.")
    interval: plan_service.PlanInterval
    interval_count: int
    price_minor: int = strawberry.field(description="The price for the organization asked about.")
    currency: str
    rollover: plan_service.RolloverPolicy
    rollover_cap: BigInt | None = strawberry.field(
        description="With ROLLOVER: the most tokens of the plan's allowance kept in all."
    )
    active: bool = strawberry.field(description="False: archived, no new subscriptions.")
    sort: int = strawberry.field(description="Display order, lowest first.")

    @classmethod
    def of(cls, priced: plan_service.PricedPlan) -> Self:
        plan = priced.plan
        return cls(
            id=str(plan.id),
            code=plan.code,
            name=plan.name,
            tokens_per_period=BigInt(plan.tokens_per_period),
            unlimited=plan.unlimited,
            interval=plan_service.PlanInterval(plan.interval),
            interval_count=plan.interval_count,
            price_minor=priced.price_minor,
            currency=plan.currency,
            rollover=plan_service.RolloverPolicy(plan.rollover),
            rollover_cap=None if plan.rollover_cap is None else BigInt(plan.rollover_cap),
            active=plan.active,
            sort=plan.sort,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        """At list prices; active plans for signed-in callers, archived ones for staff only."""
        return await nodes_via(info, node_ids, plan_service.get_plan, cls.of)


@strawberry.input
class CreatePlanInput:
    code: str = strawberry.field(description="Stable identifier: lowercase letters, digits, '-', '_'.")
    name: str
    tokens_per_period: BigInt = strawberry.field(description="0 exactly when the plan is unlimited.")
    unlimited: bool | None = False
    interval: plan_service.PlanInterval
    interval_count: int | None = strawberry.field(
        default=1, description="At most a year: DAY 365, WEEK 52, MONTH 12, YEAR 1."
    )
    price_minor: int
    currency: str | None = "USD"
    rollover: plan_service.RolloverPolicy | None = plan_service.RolloverPolicy.EXPIRE
    rollover_cap: BigInt | None = strawberry.field(
        default=None,
        description="Required with ROLLOVER (unless unlimited), at least tokensPerPeriod; null otherwise.",
    )
    sort: int | None = 0


@strawberry.input(
    description="Fields left out (or null) stay as they are. A new price is a new Stripe Price: "
    "subscriptions already on the plan keep the price they have until they change plan. "
    "`active: false` archives the plan: no new subscriptions."
)
class UpdatePlanInput:
    plan_id: strawberry.ID
    name: str | None = None
    price_minor: int | None = None
    active: bool | None = None
    sort: int | None = None


@strawberry.type
class PlanSaved:
    plan: SubscriptionPlan


PlanResult = Annotated[
    PlanSaved | PaymentProviderError | InvalidInput | NotFound | Conflict,
    strawberry.union("PlanResult"),
]
