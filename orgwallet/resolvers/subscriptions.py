"""Queries and mutations of subscription plans."""

from __future__ import annotations

import strawberry

from orgwallet.db import models
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.schema.errors import user_error
from orgwallet.schema.permissions import IsAuthenticated, IsPlatformAdmin
from orgwallet.schema.purchases import PaymentProviderError
from orgwallet.schema.subscriptions import (
    CreatePlanInput,
    PlanResult,
    PlanSaved,
    SubscriptionPlan,
    UpdatePlanInput,
)
from orgwallet.services import plans as plan_service
from orgwallet.services.purchases import PaymentProviderError as ProviderFailure
from orgwallet.services.validation import global_id


@strawberry.type
class SubscriptionQueries:
    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="The plans on sale in display order, at the organization's prices (list prices "
        "without one).",
    )
    async def plans(self, info: Info, organization_id: strawberry.ID | None = None) -> list[SubscriptionPlan]:
        organization = (
            None if organization_id is None else global_id(organization_id, "Organization", "organizationId")
        )
        async with info.context.reading() as session:
            items = await plan_service.catalogue(session, info.context.principal, organization)
        return [SubscriptionPlan.of(item) for item in items]


@strawberry.type
class SubscriptionMutations:
    @strawberry.mutation(
        permission_classes=[IsPlatformAdmin],
        description="A plan, made a Stripe Product with a recurring Price. Platform admins only.",
    )
    async def create_plan(self, info: Info, input: CreatePlanInput) -> PlanResult:
        # Not in a unit of work: the service commits the plan before it calls Stripe.
        try:
            plan = await plan_service.create_plan(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                code=input.code,
                name=input.name,
                tokens_per_period=input.tokens_per_period,
                unlimited=bool(input.unlimited),
                interval=input.interval,
                interval_count=1 if input.interval_count is None else input.interval_count,
                price_minor=input.price_minor,
                currency=input.currency,
                rollover=input.rollover or plan_service.RolloverPolicy.EXPIRE,
                rollover_cap=input.rollover_cap,
                sort=input.sort or 0,
            )
        except ProviderFailure as error:
            return PaymentProviderError(message=error.message, code=error.code, purchase=None)
        except OrgWalletError as error:
            return user_error(error)
        return _saved(plan)

    @strawberry.mutation(
        permission_classes=[IsPlatformAdmin],
        description="Renames, reprices (a new Stripe Price; subscriptions keep theirs until they change "
        "plan) or archives a plan. Platform admins only.",
    )
    async def update_plan(self, info: Info, input: UpdatePlanInput) -> PlanResult:
        try:
            plan = await plan_service.update_plan(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                global_id(input.plan_id, "SubscriptionPlan", "planId"),
                name=input.name,
                price_minor=input.price_minor,
                active=input.active,
                sort=input.sort,
            )
        except ProviderFailure as error:
            return PaymentProviderError(message=error.message, code=error.code, purchase=None)
        except OrgWalletError as error:
            return user_error(error)
        return _saved(plan)


def _saved(plan: models.SubscriptionPlan) -> PlanSaved:
    """At the list price: staff save the catalogue, not one organization's view of it."""
    return PlanSaved(
        plan=SubscriptionPlan.of(
            plan_service.PricedPlan(plan, plan_service.organization_plan_price(plan, None))
        )
    )


__all__ = ["SubscriptionMutations", "SubscriptionQueries"]
