"""Mutations of the wallet: consume, reserve, capture, release, refund, grant, suspend."""

from __future__ import annotations

from typing import Any

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.db import models
from orgwallet.db.models import WalletStatus as WalletStatusModel
from orgwallet.errors import NotFound, OrgWalletError
from orgwallet.resolvers.common import mutate
from orgwallet.schema.context import Info
from orgwallet.schema.errors import user_error
from orgwallet.schema.permissions import IsAuthenticated, IsPlatformAdmin
from orgwallet.schema.wallets import (
    CaptureReservationInput,
    CaptureReservationResult,
    ConsumeTokensInput,
    ConsumeTokensResult,
    ConsumptionRefunded,
    GrantTokensInput,
    GrantTokensResult,
    LedgerEntry,
    RefundConsumptionInput,
    RefundConsumptionResult,
    ReleaseReservationInput,
    ReleaseReservationResult,
    Reservation,
    ReservationCaptured,
    ReservationReleased,
    ReserveTokensInput,
    ReserveTokensResult,
    SetWalletStatusInput,
    SetWalletStatusResult,
    TokensConsumed,
    TokensGranted,
    TokensReserved,
    Wallet,
    WalletStatusChanged,
)
from orgwallet.services import wallets as wallet_service
from orgwallet.services.validation import MetadataLimits, global_id


def _entry(posting: ledger.Posting, info: Info) -> LedgerEntry:
    assert posting.entry is not None
    return LedgerEntry.of(posting.entry, actor=info.context.principal.actor)


async def _reservation(session: AsyncSession, posting: ledger.Posting) -> Reservation:
    assert posting.reservation_id is not None
    row = await session.get(models.Reservation, posting.reservation_id, populate_existing=True)
    if row is None:
        raise NotFound("reservation not found")
    return Reservation.of(row)


@strawberry.type
class WalletMutations:
    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def consume_tokens(self, info: Info, input: ConsumeTokensInput) -> ConsumeTokensResult:
        # A consumption is one ledger call and nothing else: it goes through the group commit
        # (its own transaction, shared with concurrent consumptions of the wallet).
        try:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            granted = await info.context.authorize(organization_id, Permission.TOKENS_CONSUME)
            posting = await wallet_service.consume_tokens_batched(
                info.context.runtime.batcher,
                granted,
                actor=info.context.principal.actor,
                amount=input.amount,
                key=input.idempotency_key,
                reason=input.reason,
                metadata=input.metadata,
                metadata_limits=MetadataLimits.of(info.context.settings),
            )
        except OrgWalletError as error:
            return user_error(error)
        return TokensConsumed(
            entry=_entry(posting, info), wallet=Wallet.of(posting.wallet), replayed=posting.replayed
        )

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def reserve_tokens(self, info: Info, input: ReserveTokensInput) -> ReserveTokensResult:
        async def run(session: AsyncSession) -> TokensReserved:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            posting = await wallet_service.reserve_tokens(
                session,
                info.context.principal,
                organization_id,
                amount=input.amount,
                key=input.idempotency_key,
                ttl_seconds=900 if input.ttl_seconds is None else input.ttl_seconds,
                reason=input.reason,
            )
            return TokensReserved(
                reservation=await _reservation(session, posting),
                wallet=Wallet.of(posting.wallet),
                replayed=posting.replayed,
            )

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def capture_reservation(
        self, info: Info, input: CaptureReservationInput
    ) -> CaptureReservationResult:
        async def run(session: AsyncSession) -> ReservationCaptured:
            reservation_id = global_id(input.reservation_id, "Reservation", "reservationId")
            posting = await wallet_service.capture_reservation(
                session,
                info.context.principal,
                reservation_id,
                amount=input.amount,
                key=input.idempotency_key,
            )
            return ReservationCaptured(
                reservation=await _reservation(session, posting),
                entry=_entry(posting, info),
                wallet=Wallet.of(posting.wallet),
            )

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def release_reservation(
        self, info: Info, input: ReleaseReservationInput
    ) -> ReleaseReservationResult:
        async def run(session: AsyncSession) -> ReservationReleased:
            reservation_id = global_id(input.reservation_id, "Reservation", "reservationId")
            posting = await wallet_service.release_reservation(
                session, info.context.principal, reservation_id
            )
            return ReservationReleased(
                reservation=await _reservation(session, posting), wallet=Wallet.of(posting.wallet)
            )

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def refund_consumption(self, info: Info, input: RefundConsumptionInput) -> RefundConsumptionResult:
        async def run(session: AsyncSession) -> ConsumptionRefunded:
            entry_id = global_id(input.entry_id, "LedgerEntry", "entryId")
            posting = await wallet_service.refund_consumption(
                session,
                info.context.principal,
                entry_id,
                amount=input.amount,
                reason=input.reason,
                key=input.idempotency_key,
            )
            return ConsumptionRefunded(entry=_entry(posting, info), wallet=Wallet.of(posting.wallet))

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def grant_tokens(self, info: Info, input: GrantTokensInput) -> GrantTokensResult:
        async def run(session: AsyncSession) -> TokensGranted:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            posting = await wallet_service.grant_tokens(
                session,
                info.context.principal,
                organization_id,
                amount=input.amount,
                reason=input.reason,
                expires_at=input.expires_at,
                priority=input.priority,
                key=input.idempotency_key,
            )
            return TokensGranted(entry=_entry(posting, info), wallet=Wallet.of(posting.wallet))

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def suspend_wallet(self, info: Info, input: SetWalletStatusInput) -> SetWalletStatusResult:
        return await _set_status(info, input, WalletStatusModel.SUSPENDED)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def reactivate_wallet(self, info: Info, input: SetWalletStatusInput) -> SetWalletStatusResult:
        return await _set_status(info, input, WalletStatusModel.ACTIVE)


async def _set_status(info: Info, input: SetWalletStatusInput, status: WalletStatusModel) -> Any:
    async def run(session: AsyncSession) -> WalletStatusChanged:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        state = await wallet_service.set_wallet_status(
            session, info.context.principal, organization_id, status=status, reason=input.reason
        )
        return WalletStatusChanged(wallet=Wallet.of(state))

    return await mutate(info, run)
