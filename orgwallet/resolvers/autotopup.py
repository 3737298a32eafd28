"""Mutations of automatic top-ups. Their payloads are plain types (the contract's), so a
refused call is a GraphQL error with ``extensions.code`` (``BAD_USER_INPUT`` with the
``field``, ``PAYMENT_METHOD_REQUIRED``, ``NOT_FOUND``, ``FORBIDDEN``), and nothing is written."""

from __future__ import annotations

import uuid

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.schema.autotopup import (
    AutoTopUpPolicy,
    AutoTopUpSaved,
    DisableAutoTopUpInput,
    SetAutoTopUpInput,
)
from orgwallet.schema.context import Info
from orgwallet.schema.permissions import IsAuthenticated
from orgwallet.services import autotopup as topup_service
from orgwallet.services.validation import global_id


async def _saved(session: AsyncSession, info: Info, organization_id: uuid.UUID) -> AutoTopUpSaved:
    view = await topup_service.read_policy(
        session, info.context.principal, organization_id, info.context.runtime.clock.now()
    )
    assert view is not None
    return AutoTopUpSaved(policy=AutoTopUpPolicy.of(view))


@strawberry.type
class AutoTopUpMutations:
    @strawberry.mutation(
        permission_classes=[IsAuthenticated], description="tokens.configure; needs a saved card"
    )
    async def set_auto_top_up(self, info: Info, input: SetAutoTopUpInput) -> AutoTopUpSaved | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        package_id = (
            None if input.package_id is None else global_id(input.package_id, "TokenPackage", "packageId")
        )
        schedule = input.schedule
        async with info.context.unit_of_work() as session:
            await topup_service.set_policy(
                session,
                info.context.principal,
                info.context.settings,
                organization_id,
                now=info.context.runtime.clock.now(),
                enabled=input.enabled,
                threshold=input.threshold,
                schedule_interval=None if schedule is None else schedule.interval,
                day_of_week=None if schedule is None else schedule.day_of_week,
                day_of_month=None if schedule is None else schedule.day_of_month,
                hour=None if schedule is None else schedule.hour_utc,
                method=input.method,
                tokens=input.tokens,
                package_id=package_id,
                target_balance=input.target_balance,
                monthly_spend_cap_minor=input.monthly_spend_cap_minor,
            )
            return await _saved(session, info, organization_id)

    @strawberry.mutation(permission_classes=[IsAuthenticated], description="tokens.configure")
    async def disable_auto_top_up(self, info: Info, input: DisableAutoTopUpInput) -> AutoTopUpSaved | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        async with info.context.unit_of_work() as session:
            await topup_service.disable_policy(session, info.context.principal, organization_id)
            return await _saved(session, info, organization_id)
