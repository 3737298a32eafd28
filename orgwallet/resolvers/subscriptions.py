"""Queries and mutations of subscription plans."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import strawberry

from orgwallet.db import models
from orgwallet.errors import OrgWalletError
from orgwallet.payments.gateway import PaymentDeclined
from orgwallet.schema.context import Info
from orgwallet.schema.errors import user_error
from orgwallet.schema.permissions import IsAuthenticated, IsPlatformAdmin
from orgwallet.schema.purchases import PaymentProviderError
from orgwallet.schema.subscriptions import (
    CancelSubscriptionInput,
    ChangePlanInput,
    CreatePlanInput,
    PlanChangeDeclined,
    PlanResult,
    PlanSaved,
    SubscribeInput,
    SubscribeResult,
    SubscriptionChanged,
    SubscriptionChangeResult,
    SubscriptionCheckoutStarted,
    SubscriptionIdInput,
    SubscriptionPlan,
    TokenSubscription,
    UpdatePlanInput,
)
from orgwallet.services import plans as plan_service
from orgwallet.services import subscriptions as subscription_service
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

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Starts a subscription to a plan: Stripe's hosted Checkout page (mode subscription). "
        "The subscription is ACTIVE, with the period's tokens, when Stripe confirms the payment. "
        "tokens.configure; one live subscription per organization.",
    )
    async def subscribe(self, info: Info, input: SubscribeInput) -> SubscribeResult:
        # Not in a unit of work: the service commits the subscription before it calls Stripe.
        try:
            started = await subscription_service.subscribe(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                global_id(input.organization_id, "Organization", "organizationId"),
                plan_id=_plan_id(input.plan_id),
                success_url=input.success_url,
                cancel_url=input.cancel_url,
                idempotency_key=input.idempotency_key,
            )
        except ProviderFailure as error:
            return PaymentProviderError(message=error.message, code=error.code, purchase=None)
        except OrgWalletError as error:
            return user_error(error)
        return SubscriptionCheckoutStarted(
            checkout_url=started.checkout_url, subscription=TokenSubscription.of(started.subscription)
        )

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="An upgrade (a plan costing more) takes effect now, charged by proration, with the "
        "prorated difference of tokens; a downgrade at the next renewal (scheduledPlan). tokens.configure.",
    )
    async def change_plan(self, info: Info, input: ChangePlanInput) -> SubscriptionChangeResult:
        async def run(subscription_id: uuid.UUID) -> models.Subscription:
            return await subscription_service.change_plan(
                _asked(info), subscription_id, _plan_id(input.plan_id)
            )

        return await _change(info, input.subscription_id, run)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Pauses collection: renewals are voided and grant nothing until resumed. "
        "tokens.configure.",
    )
    async def pause_subscription(self, info: Info, input: SubscriptionIdInput) -> SubscriptionChangeResult:
        async def run(subscription_id: uuid.UUID) -> models.Subscription:
            return await subscription_service.pause(_asked(info), subscription_id)

        return await _change(info, input.subscription_id, run)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Resumes a paused subscription, or one set to cancel at the period's end. "
        "tokens.configure.",
    )
    async def resume_subscription(self, info: Info, input: SubscriptionIdInput) -> SubscriptionChangeResult:
        async def run(subscription_id: uuid.UUID) -> models.Subscription:
            return await subscription_service.resume(_asked(info), subscription_id)

        return await _change(info, input.subscription_id, run)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Cancels at the end of the paid period (the default) or now. Tokens already granted "
        "stay until they expire. tokens.configure.",
    )
    async def cancel_subscription(
        self, info: Info, input: CancelSubscriptionInput
    ) -> SubscriptionChangeResult:
        async def run(subscription_id: uuid.UUID) -> models.Subscription:
            return await subscription_service.cancel(
                _asked(info), subscription_id, at_period_end=input.at_period_end is not False
            )

        return await _change(info, input.subscription_id, run)


def _plan_id(value: strawberry.ID) -> uuid.UUID:
    return global_id(value, "SubscriptionPlan", "planId")


def _asked(info: Info) -> subscription_service.Asked:
    runtime = info.context.runtime
    return subscription_service.Asked(
        sessions=info.context.sessions,
        principal=info.context.principal,
        gateway=runtime.gateway,
        now=runtime.clock.now(),
        grace=subscription_service.grace_period(runtime),
    )


async def _change(
    info: Info,
    subscription_id: strawberry.ID,
    run: Callable[[uuid.UUID], Awaitable[models.Subscription]],
) -> SubscriptionChangeResult:
    """A member's change, through Stripe (not in a unit of work: no transaction may be open)."""
    try:
        row = await run(global_id(subscription_id, "TokenSubscription", "subscriptionId"))
    except PaymentDeclined as error:
        return PlanChangeDeclined(message=error.message, code=error.code, decline_code=error.decline_code)
    except ProviderFailure as error:
        return PaymentProviderError(message=error.message, code=error.code, purchase=None)
    except OrgWalletError as error:
        return user_error(error)
    return SubscriptionChanged(subscription=TokenSubscription.of(row))


def _saved(plan: models.SubscriptionPlan) -> PlanSaved:
    """At the list price: staff save the catalogue, not one organization's view of it."""
    return PlanSaved(
        plan=SubscriptionPlan.of(
            plan_service.PricedPlan(plan, plan_service.organization_plan_price(plan, None))
        )
    )


__all__ = ["SubscriptionMutations", "SubscriptionQueries"]
