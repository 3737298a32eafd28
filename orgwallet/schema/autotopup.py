"""Automatic top-ups: the policy as clients see it, its input and payload."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Self

import strawberry

from orgwallet.schema.context import Info
from orgwallet.schema.purchases import Purchase, TokenPackage, package_of
from orgwallet.schema.scalars import BigInt
from orgwallet.services import autotopup as topup_service

AutoTopUpMethod = strawberry.enum(topup_service.AutoTopUpMethod, name="AutoTopUpMethod")
ScheduleInterval = strawberry.enum(topup_service.ScheduleInterval, name="ScheduleInterval")


@strawberry.type
class TopUpSchedule:
    interval: ScheduleInterval  # type: ignore[valid-type]
    day_of_week: int | None = strawberry.field(description="WEEKLY: 1 (Monday) .. 7")
    day_of_month: int | None = strawberry.field(description="MONTHLY: 1 .. 28")
    hour_utc: int
    next_run_at: datetime


@strawberry.type
class AutoTopUpPolicy:
    enabled: bool
    threshold: BigInt | None = strawberry.field(
        description="A top-up starts when the available balance falls below this."
    )
    schedule: TopUpSchedule | None
    method: AutoTopUpMethod  # type: ignore[valid-type]
    tokens: BigInt | None
    target_balance: BigInt | None
    monthly_spend_cap_minor: int | None = strawberry.field(description="A calendar month in UTC.")
    spent_this_month_minor: int
    currency: str
    consecutive_failures: int
    next_retry_at: datetime | None = strawberry.field(
        description="After a failed attempt, when it tries again."
    )
    disabled_reason: str | None = strawberry.field(description="Why it turned itself off.")
    in_flight: Purchase | None = strawberry.field(description="The top-up being paid now.")
    last_top_up: Purchase | None
    _organization_id: strawberry.Private[uuid.UUID]
    _package_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def of(cls, view: topup_service.PolicyView) -> Self:
        policy = view.policy
        schedule = None
        if policy.schedule is not None:
            assert view.next_run_at is not None
            schedule = TopUpSchedule(
                interval=policy.schedule.interval,
                day_of_week=policy.schedule.day_of_week,
                day_of_month=policy.schedule.day_of_month,
                hour_utc=policy.schedule.hour,
                next_run_at=view.next_run_at,
            )
        return cls(
            enabled=policy.enabled,
            threshold=None if policy.threshold is None else BigInt(policy.threshold),
            schedule=schedule,
            method=policy.method,
            tokens=None if policy.tokens is None else BigInt(policy.tokens),
            target_balance=None if policy.target_balance is None else BigInt(policy.target_balance),
            monthly_spend_cap_minor=policy.monthly_spend_cap_minor,
            spent_this_month_minor=view.spent_this_month_minor,
            currency=policy.currency,
            consecutive_failures=policy.consecutive_failures,
            next_retry_at=policy.next_retry_at() if policy.enabled else None,
            disabled_reason=policy.disabled_reason,
            in_flight=None if view.in_flight is None else Purchase.of(view.in_flight),
            last_top_up=None if view.last_top_up is None else Purchase.of(view.last_top_up),
            _organization_id=policy.organization_id,
            _package_id=policy.package_id,
        )

    @strawberry.field(description="FIXED: the package bought, at the organization's price.")
    async def package(self, info: Info) -> TokenPackage | None:
        return await package_of(info, self._organization_id, self._package_id)


@strawberry.input
class TopUpScheduleInput:
    interval: ScheduleInterval  # type: ignore[valid-type]
    day_of_week: int | None = None
    day_of_month: int | None = None
    hour_utc: int | None = 0


@strawberry.input
class SetAutoTopUpInput:
    organization_id: strawberry.ID
    enabled: bool
    method: AutoTopUpMethod  # type: ignore[valid-type]
    threshold: BigInt | None = None
    schedule: TopUpScheduleInput | None = None
    tokens: BigInt | None = None
    package_id: strawberry.ID | None = None
    target_balance: BigInt | None = None
    monthly_spend_cap_minor: int | None = None


@strawberry.input
class DisableAutoTopUpInput:
    organization_id: strawberry.ID


@strawberry.type
class AutoTopUpSaved:
    policy: AutoTopUpPolicy
