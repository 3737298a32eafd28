"""GraphQL types of subscriptions: plans (``SubscriptionPlan``), an organization's subscription
(``TokenSubscription``) and its invoices, their inputs and payloads."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Self

import strawberry
from strawberry import relay

from orgwallet.db import models
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.schema.errors import Conflict, InvalidInput, NotFound, UserError, graphql_error
from orgwallet.schema.purchases import PaymentProviderError
from orgwallet.schema.scalars import BigInt
from orgwallet.schema.types import nodes_via, page_info
from orgwallet.services import plans as plan_service
from orgwallet.services import subscriptions as subscription_service

if TYPE_CHECKING:
    from orgwallet.schema.types import Organization

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


# ---------------------------------------------------------------- subscriptions

SubscriptionStatus = strawberry.enum(models.SubscriptionStatus, name="SubscriptionStatus")


@strawberry.type(description="A Stripe invoice of the subscription, with the tokens it granted.")
class SubscriptionInvoice(relay.Node):
    id: relay.NodeID[str]
    amount_minor: int
    currency: str
    status: str = strawberry.field(description="Stripe's: draft, open, paid, void, uncollectible.")
    billing_reason: str | None
    period_start: datetime
    period_end: datetime
    tokens_granted: BigInt
    hosted_invoice_url: str | None = strawberry.field(description="Stripe's page to see and pay the invoice.")
    paid_at: datetime | None

    @classmethod
    def of(cls, row: models.SubscriptionInvoice) -> Self:
        return cls(
            id=str(row.id),
            amount_minor=row.amount_minor,
            currency=row.currency,
            status=row.status,
            billing_reason=row.billing_reason,
            period_start=row.period_start,
            period_end=row.period_end,
            tokens_granted=BigInt(row.tokens_granted),
            hosted_invoice_url=row.hosted_invoice_url,
            paid_at=row.paid_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await nodes_via(info, node_ids, subscription_service.get_invoice, cls.of)


@strawberry.type
class SubscriptionInvoiceEdge:
    cursor: str
    node: SubscriptionInvoice


@strawberry.type
class SubscriptionInvoiceConnection:
    edges: list[SubscriptionInvoiceEdge]
    page_info: relay.PageInfo


@strawberry.type(
    name="TokenSubscription",
    description="The organization's subscription to a plan, as Stripe last reported it. (`Subscription` "
    "is GraphQL's root type of live updates.)",
)
class TokenSubscription(relay.Node):
    id: relay.NodeID[str]
    status: SubscriptionStatus  # type: ignore[valid-type]
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    paused_at: datetime | None
    grace_ends_at: datetime | None = strawberry.field(
        description="While PAST_DUE (and after it ended unpaid): the subscription is canceled and the "
        "wallet suspended when this passes unpaid."
    )
    created_at: datetime
    _organization_id: strawberry.Private[uuid.UUID]
    _plan_id: strawberry.Private[uuid.UUID]
    _scheduled_plan_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def of(cls, row: models.Subscription) -> Self:
        return cls(
            id=str(row.id),
            status=models.SubscriptionStatus(row.status),
            current_period_start=row.current_period_start,
            current_period_end=row.current_period_end,
            cancel_at_period_end=row.cancel_at_period_end,
            canceled_at=row.canceled_at,
            paused_at=row.paused_at,
            grace_ends_at=row.grace_ends_at,
            created_at=row.created_at,
            _organization_id=row.organization_id,
            _plan_id=row.plan_id,
            _scheduled_plan_id=row.scheduled_plan_id,
        )

    @strawberry.field
    async def organization(
        self, info: Info
    ) -> Annotated[Organization, strawberry.lazy("orgwallet.schema.types")]:
        from orgwallet.schema.types import Organization

        return await Organization.load(info, self._organization_id)

    async def _priced(self, info: Info, plan_id: uuid.UUID) -> SubscriptionPlan:
        async with info.context.reading() as session:
            plan = await session.get(models.SubscriptionPlan, plan_id)
        assert plan is not None  # plans are archived, never deleted
        return SubscriptionPlan.of(subscription_service.priced(plan, self._organization_id))

    @strawberry.field(description="The plan in force: what the current period was paid for.")
    async def plan(self, info: Info) -> SubscriptionPlan:
        return await self._priced(info, self._plan_id)

    @strawberry.field(description="A change that takes effect at the next renewal (a downgrade).")
    async def scheduled_plan(self, info: Info) -> SubscriptionPlan | None:
        return None if self._scheduled_plan_id is None else await self._priced(info, self._scheduled_plan_id)

    @strawberry.field(description="Its invoices, newest period first.")
    async def invoices(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> SubscriptionInvoiceConnection:
        async with info.context.reading() as session:
            try:
                page = await subscription_service.invoices_page(
                    session, uuid.UUID(self.id), first=20 if first is None else first, after=after
                )
            except OrgWalletError as error:
                raise graphql_error(error) from error
        edges = [
            SubscriptionInvoiceEdge(
                cursor=subscription_service.encode_cursor(row), node=SubscriptionInvoice.of(row)
            )
            for row in page.invoices
        ]
        return SubscriptionInvoiceConnection(
            edges=edges, page_info=page_info([e.cursor for e in edges], has_next=page.has_next, after=after)
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await nodes_via(info, node_ids, subscription_service.get_subscription, cls.of)


@strawberry.input
class SubscribeInput:
    organization_id: strawberry.ID
    plan_id: strawberry.ID
    success_url: str = strawberry.field(description="May contain {CHECKOUT_SESSION_ID}.")
    cancel_url: str
    idempotency_key: str | None = strawberry.field(
        default=None, description="The same key again returns the same checkout page."
    )


@strawberry.input
class ChangePlanInput:
    subscription_id: strawberry.ID
    plan_id: strawberry.ID


@strawberry.input
class SubscriptionIdInput:
    subscription_id: strawberry.ID


@strawberry.input
class CancelSubscriptionInput:
    subscription_id: strawberry.ID
    at_period_end: bool | None = strawberry.field(
        default=True, description="True: at the end of the paid period; false: now."
    )


@strawberry.type
class SubscriptionCheckoutStarted:
    checkout_url: str = strawberry.field(description="Stripe's hosted page, where the subscription is paid.")
    subscription: TokenSubscription = strawberry.field(
        description="INCOMPLETE until Stripe confirms the payment."
    )


@strawberry.type
class SubscriptionChanged:
    subscription: TokenSubscription


@strawberry.type(description="The card was declined: the plan did not change.")
class PlanChangeDeclined(UserError):
    decline_code: str | None


SubscribeResult = Annotated[
    SubscriptionCheckoutStarted | InvalidInput | NotFound | Conflict | PaymentProviderError,
    strawberry.union("SubscribeResult"),
]
SubscriptionChangeResult = Annotated[
    SubscriptionChanged | InvalidInput | NotFound | Conflict | PaymentProviderError | PlanChangeDeclined,
    strawberry.union("SubscriptionChangeResult"),
]
