"""Subscription plans: the catalogue platform staff manage, each plan a Stripe Product with a
recurring Price.

A plan is sold only once Stripe has both objects (``stripe_price_id`` set): ``create_plan``
commits the row, makes the product and the price in Stripe under keys derived from the plan
id, then records them. If Stripe fails, the row is deleted (so the same code can be created
again) and a product already made is archived; a plan left half made by a crash is finished
by ``createPlan`` again with the same code and values (the same keys give the same objects).

Stripe prices are immutable: a new price is a new Stripe Price, the old one is archived, and
subscriptions already on it keep paying it until they change plan. Archiving a plan
(``active=False``) archives its product: nobody can start a subscription on it.
"""

from __future__ import annotations

import calendar
import enum
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Anonymous, Principal
from orgwallet.db.engine import transaction
from orgwallet.db.models import SubscriptionPlan
from orgwallet.errors import Conflict, InvalidInput, NotFound
from orgwallet.payments.gateway import StripeGateway
from orgwallet.services import access, audit, validation
from orgwallet.services.purchases import PaymentProviderError

log = logging.getLogger(__name__)


class PlanInterval(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class RolloverPolicy(enum.StrEnum):
    EXPIRE = "expire"  # what is left of a period's allowance expires when the period ends
    ROLLOVER = "rollover"  # it rolls over, up to the plan's cap in all


#: At most a year per period (the table checks the same): Stripe allows three, but a plan that
#: bills once in several years is more likely a typo than a product.
MAX_INTERVAL_COUNT = {
    PlanInterval.DAY: 365,
    PlanInterval.WEEK: 52,
    PlanInterval.MONTH: 12,
    PlanInterval.YEAR: 1,
}


@dataclass(frozen=True, slots=True)
class PricedPlan:
    """A plan at the price one organization pays (the list price when none is asked)."""

    plan: SubscriptionPlan
    price_minor: int


def next_period_end(at: datetime, interval: str, count: int) -> datetime:
    """``at`` moved one period on (for forecasts): a month or year later keeps the day of the
    month, or takes the month's last day when it has none (as Stripe's billing cycle does; the
    real renewals come from Stripe)."""
    if interval == PlanInterval.DAY:
        return at + timedelta(days=count)
    if interval == PlanInterval.WEEK:
        return at + timedelta(weeks=count)
    index = at.month - 1 + count * (12 if interval == PlanInterval.YEAR else 1)
    year, month = at.year + index // 12, index % 12 + 1
    return at.replace(year=year, month=month, day=min(at.day, calendar.monthrange(year, month)[1]))


def previous_period_start(end: datetime, interval: str, count: int) -> datetime:
    """``end`` moved one period back (the inverse of ``next_period_end`` for days up to 28)."""
    if interval == PlanInterval.DAY:
        return end - timedelta(days=count)
    if interval == PlanInterval.WEEK:
        return end - timedelta(weeks=count)
    index = end.month - 1 - count * (12 if interval == PlanInterval.YEAR else 1)
    year, month = end.year + index // 12, index % 12 + 1
    return end.replace(year=year, month=month, day=min(end.day, calendar.monthrange(year, month)[1]))


def organization_plan_price(plan: SubscriptionPlan, organization_id: uuid.UUID | None) -> int:
    """What ``organization_id`` pays for ``plan``. The hook for per-organization plan prices:
    none exist yet, so every organization pays the list price."""
    return plan.price_minor


# ---------------------------------------------------------------- reading


def _sold() -> Any:
    """Plans Stripe has confirmed: one still being created has no price to subscribe to."""
    return col(SubscriptionPlan.stripe_price_id).is_not(None)


async def priced_plans(
    session: AsyncSession, organization_id: uuid.UUID | None, *, include_archived: bool
) -> list[PricedPlan]:
    """The plans in display order at the organization's prices (no authorization: for callers
    that checked it, and for the public list prices)."""
    statement = (
        select(SubscriptionPlan)
        .where(_sold())
        .order_by(col(SubscriptionPlan.sort), col(SubscriptionPlan.price_minor), col(SubscriptionPlan.code))
        .execution_options(populate_existing=True)
    )
    if not include_archived:
        statement = statement.where(col(SubscriptionPlan.active).is_(True))
    plans = (await session.execute(statement)).scalars()
    return [PricedPlan(plan, organization_plan_price(plan, organization_id)) for plan in plans]


async def catalogue(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID | None
) -> list[PricedPlan]:
    """``plans(organizationId)``: the active plans at the organization's prices, for whoever
    may see its wallet (another organization's is not found); list prices without one."""
    access.require_authenticated(principal)
    if organization_id is not None:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    return await priced_plans(session, organization_id, include_archived=False)


async def get_plan(session: AsyncSession, principal: Principal, plan_id: uuid.UUID) -> PricedPlan | None:
    """One plan at its list price, or None when the caller may not see it: active plans are for
    signed-in callers, archived ones for platform staff."""
    if isinstance(principal, Anonymous):
        return None
    plan = (
        await session.execute(
            select(SubscriptionPlan)
            .where(col(SubscriptionPlan.id) == plan_id, _sold())
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if plan is None or not (plan.active or principal.is_platform_admin):
        return None
    return PricedPlan(plan, organization_plan_price(plan, None))


# ---------------------------------------------------------------- validation


def _interval(value: object) -> PlanInterval:
    try:
        return PlanInterval(str(value))
    except ValueError:
        raise InvalidInput("interval must be DAY, WEEK, MONTH or YEAR", field="interval") from None


def _interval_count(value: object, interval: PlanInterval) -> int:
    highest = MAX_INTERVAL_COUNT[interval]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= highest:
        raise InvalidInput(
            f"intervalCount must be a whole number from 1 to {highest} for {interval.name} (a period of "
            "at most one year)",
            field="intervalCount",
        )
    return value


def _tokens_per_period(value: object, unlimited: bool) -> int:
    if not unlimited:
        return validation.token_amount(value, "tokensPerPeriod")
    if isinstance(value, bool) or value != 0:
        raise InvalidInput("an unlimited plan grants no tokens per period: give 0", field="tokensPerPeriod")
    return 0


def _rollover(value: object) -> RolloverPolicy:
    try:
        return RolloverPolicy(str(value))
    except ValueError:
        raise InvalidInput("rollover must be EXPIRE or ROLLOVER", field="rollover") from None


def _rollover_cap(
    value: object, rollover: RolloverPolicy, unlimited: bool, tokens_per_period: int
) -> int | None:
    """A cap exactly when unused tokens roll over (an unlimited plan has none to roll over),
    and at least one period's allowance (else the period's own grant would overflow it)."""
    if rollover is RolloverPolicy.EXPIRE or unlimited:
        if value is not None:
            raise InvalidInput(
                "only a ROLLOVER plan that is not unlimited has a rolloverCap", field="rolloverCap"
            )
        return None
    if value is None:
        raise InvalidInput("a ROLLOVER plan needs a rolloverCap", field="rolloverCap")
    cap = validation.token_amount(value, "rolloverCap")
    if cap < tokens_per_period:
        raise InvalidInput(
            f"rolloverCap must be at least one period's tokens ({tokens_per_period})", field="rolloverCap"
        )
    return cap


def _sort(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
        raise InvalidInput("sort must be a 32-bit whole number", field="sort")
    return value


def _snapshot(plan: SubscriptionPlan) -> dict[str, Any]:
    return {
        "code": plan.code,
        "name": plan.name,
        "tokens_per_period": plan.tokens_per_period,
        "unlimited": plan.unlimited,
        "interval": plan.interval,
        "interval_count": plan.interval_count,
        "price_minor": plan.price_minor,
        "currency": plan.currency,
        "rollover": plan.rollover,
        "rollover_cap": plan.rollover_cap,
        "active": plan.active,
        "sort": plan.sort,
        "stripe_product_id": plan.stripe_product_id,
        "stripe_price_id": plan.stripe_price_id,
    }


def _provider_error(error: stripe.StripeError, what: str) -> PaymentProviderError:
    detail = error.user_message or type(error).__name__
    return PaymentProviderError(f"the payment provider could not be reached or failed ({detail}); {what}")


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- creating


async def create_plan(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    *,
    code: str,
    name: str,
    tokens_per_period: object,
    unlimited: bool,
    interval: object,
    interval_count: object,
    price_minor: object,
    currency: str | None,
    rollover: object,
    rollover_cap: object | None,
    sort: object = 0,
) -> SubscriptionPlan:
    """Validates (writing nothing on bad input), commits the plan, makes its Stripe Product and
    recurring Price (no transaction open), then records them and audits ``plan.create``.
    Stripe failing is ``PaymentProviderError``, and no plan is left."""
    access.require_platform_admin(principal)
    period = _interval(interval)
    tokens = _tokens_per_period(tokens_per_period, unlimited)
    policy = _rollover(rollover)
    values: dict[str, Any] = {
        "code": validation.catalogue_code(code),
        "name": validation.text(name, "name"),
        "tokens_per_period": tokens,
        "unlimited": unlimited,
        "interval": period.value,
        "interval_count": _interval_count(interval_count, period),
        "price_minor": validation.amount_minor(price_minor, "priceMinor"),
        "currency": validation.currency_code(currency),
        "rollover": policy.value,
        "rollover_cap": _rollover_cap(rollover_cap, policy, unlimited, tokens),
        "sort": _sort(sort),
    }
    async with transaction(sessions) as session:
        inserted = await session.execute(
            insert(SubscriptionPlan)
            .values(id=uuid7(), **values)
            .on_conflict_do_nothing(index_elements=["code"])
            .returning(SubscriptionPlan)
        )
        plan = inserted.scalar_one_or_none()
        if plan is None:
            plan = await _unfinished(session, values)
    product: stripe.Product | None = None
    try:
        product = await gateway.create_product(
            name=plan.name,
            metadata={"plan_id": str(plan.id), "code": plan.code},
            idempotency_key=f"plan-{plan.id}-product",
        )
        price = await gateway.create_recurring_price(
            product_id=product.id,
            unit_amount=plan.price_minor,
            currency=plan.currency,
            interval=plan.interval,
            interval_count=plan.interval_count,
            metadata={"plan_id": str(plan.id)},
            idempotency_key=f"plan-{plan.id}-price",
        )
    except stripe.StripeError as error:
        await _abandon(sessions, gateway, plan.id, product)
        raise _provider_error(error, "the plan was not created") from error
    async with transaction(sessions) as session:
        plan = await _lock(session, plan.id)
        if plan.stripe_price_id is None:  # else a concurrent retry of the same plan recorded it
            plan.stripe_product_id = product.id
            plan.stripe_price_id = price.id
            plan.updated_at = _now()
            await session.flush()
            await audit.record(
                session,
                principal,
                action="plan.create",
                organization_id=None,
                target_type="subscription_plan",
                target_id=plan.id,
                after=_snapshot(plan),
            )
    return plan


async def _unfinished(session: AsyncSession, values: dict[str, Any]) -> SubscriptionPlan:
    """The plan that holds the code: one left without Stripe objects by a crash, asked for
    again with the same values, is finished (under the same keys); anything else is taken."""
    existing = (
        await session.execute(
            select(SubscriptionPlan)
            .where(col(SubscriptionPlan.code) == values["code"])
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if existing is None:  # a creation that Stripe failed has just given the code back
        raise Conflict("the code was in use a moment ago: try again", code="PLAN_CODE_TAKEN")
    if existing.stripe_price_id is None and all(getattr(existing, k) == v for k, v in values.items()):
        return existing
    raise Conflict(f"a plan with code {values['code']!r} exists", code="PLAN_CODE_TAKEN")


async def _abandon(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    plan_id: uuid.UUID,
    product: stripe.Product | None,
) -> None:
    """A creation Stripe failed: the row goes (nothing was sold, nothing audited), and the
    product, if it was made, is archived. A product made before a lost answer is not known
    here: it stays, unused, with the plan id in its metadata."""
    async with transaction(sessions) as session:
        await session.execute(
            delete(SubscriptionPlan).where(
                col(SubscriptionPlan.id) == plan_id, col(SubscriptionPlan.stripe_price_id).is_(None)
            )
        )
    if product is not None:
        try:
            await gateway.update_product(
                product.id, active=False, idempotency_key=f"plan-{plan_id}-product-abandoned"
            )
        except stripe.StripeError:
            log.warning("could not archive the Stripe product %s of an abandoned plan", product.id)


async def _lock(session: AsyncSession, plan_id: uuid.UUID) -> SubscriptionPlan:
    plan = await session.get(SubscriptionPlan, plan_id, with_for_update=True, populate_existing=True)
    if plan is None:
        raise NotFound("plan not found")
    return plan


# ---------------------------------------------------------------- changing


async def update_plan(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    gateway: StripeGateway,
    plan_id: uuid.UUID,
    *,
    name: str | None = None,
    price_minor: object | None = None,
    active: bool | None = None,
    sort: object | None = None,
) -> SubscriptionPlan:
    """Changes what is given (None: unchanged). Stripe first, with no transaction open: the
    product is renamed or (un)archived, a new price is a new Stripe Price; then the plan is
    recorded and audited (``plan.update``, even when nothing changes: the log records what
    staff asked for); then the old price is archived. Subscriptions on the old price keep it
    until they change plan. Stripe failing is ``PaymentProviderError`` and nothing changes."""
    access.require_platform_admin(principal)
    new_name = None if name is None else validation.text(name, "name")
    new_price = None if price_minor is None else validation.amount_minor(price_minor, "priceMinor")
    new_sort = None if sort is None else _sort(sort)
    async with transaction(sessions) as session:
        plan = await session.get(SubscriptionPlan, plan_id, populate_existing=True)
        if plan is None or plan.stripe_price_id is None or plan.stripe_product_id is None:
            raise NotFound("plan not found")  # one still being created is not a plan yet
    product_id, old_price = plan.stripe_product_id, plan.stripe_price_id
    rename = new_name is not None and new_name != plan.name
    toggle = active is not None and active != plan.active
    reprice = new_price is not None and new_price != plan.price_minor
    made_price: stripe.Price | None = None
    if rename or toggle:
        try:
            await gateway.update_product(
                product_id,
                name=new_name if rename else None,
                active=active if toggle else None,
                idempotency_key=f"plan-{plan.id}-product-{uuid7()}",
            )
        except stripe.StripeError as error:
            raise _provider_error(error, "the plan was not changed") from error
    if reprice:
        assert new_price is not None
        try:
            made_price = await gateway.create_recurring_price(
                product_id=product_id,
                unit_amount=new_price,
                currency=plan.currency,
                interval=plan.interval,
                interval_count=plan.interval_count,
                metadata={"plan_id": str(plan.id)},
                # One key per (price replaced, new amount): a retry gets the same new price.
                idempotency_key=f"plan-{plan.id}-price-{new_price}-after-{old_price}",
            )
        except stripe.StripeError as error:
            if rename or toggle:
                await _restore_product(gateway, plan)
            raise _provider_error(error, "the plan was not changed") from error

    raced = False
    async with transaction(sessions) as session:
        plan = await _lock(session, plan_id)
        if made_price is not None and plan.stripe_price_id != old_price:
            raced = True  # a concurrent update replaced the price first: its price stands
        else:
            before = _snapshot(plan)
            if new_name is not None:
                plan.name = new_name
            if new_sort is not None:
                plan.sort = new_sort
            if active is not None:
                plan.active = active
            if made_price is not None:
                assert new_price is not None
                plan.price_minor = new_price
                plan.stripe_price_id = made_price.id
            after = _snapshot(plan)
            if after != before:
                plan.updated_at = _now()
                await session.flush()
            await audit.record(
                session,
                principal,
                action="plan.update",
                organization_id=None,
                target_type="subscription_plan",
                target_id=plan.id,
                before=before,
                after=after,
            )
    if raced:
        assert made_price is not None
        await _archive_price(gateway, plan.id, made_price.id)
        raise Conflict("the plan's price was changed meanwhile: read it and try again", code="PLAN_CHANGED")
    if made_price is not None:
        await _archive_price(gateway, plan.id, old_price)
    return plan


async def _archive_price(gateway: StripeGateway, plan_id: uuid.UUID, price_id: str) -> None:
    """Best effort: a price left on sale in Stripe is one nothing here offers any more."""
    try:
        await gateway.archive_price(price_id, idempotency_key=f"plan-{plan_id}-archive-{price_id}")
    except stripe.StripeError:
        log.warning("could not archive the Stripe price %s of plan %s", price_id, plan_id)


async def _restore_product(gateway: StripeGateway, plan: SubscriptionPlan) -> None:
    """Puts the product back as the plan has it, after an update that failed half way."""
    assert plan.stripe_product_id is not None
    try:
        await gateway.update_product(
            plan.stripe_product_id,
            name=plan.name,
            active=plan.active,
            idempotency_key=f"plan-{plan.id}-product-{uuid7()}",
        )
    except stripe.StripeError:
        log.warning("could not restore the Stripe product %s of plan %s", plan.stripe_product_id, plan.id)
