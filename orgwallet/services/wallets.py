"""Wallet operations as callers see them: authorize, validate, then call the ledger.

Reads are built from the principal's access like every other organization read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction
from orgwallet.db.models import CreditLot, LedgerEntry, Reservation, Wallet, WalletStatus
from orgwallet.errors import InvalidInput, NotFound
from orgwallet.ledger import EntryKind, GrantSource, batching
from orgwallet.services import access, audit, notifications, validation
from orgwallet.services.notifications import NotificationKind

MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_PAGE = 500


async def open_wallet(
    session: AsyncSession, principal: Principal, settings: Settings, organization_id: uuid.UUID
) -> uuid.UUID:
    """The new organization's wallet, with its trial grant when one is configured."""
    wallet_id = await ledger.open_wallet(session, organization_id)
    if settings.trial_tokens > 0:
        await ledger.credit(
            session,
            wallet_id,
            amount=settings.trial_tokens,
            source=GrantSource.TRIAL,
            actor=principal.actor,
            key="trial",
            expires_at=datetime.now(UTC) + timedelta(days=settings.trial_days),
            reason="trial grant",
        )
    return wallet_id


async def wallet_id_of(session: AsyncSession, organization_id: uuid.UUID) -> uuid.UUID:
    wallet_id = await session.scalar(
        select(col(Wallet.id)).where(col(Wallet.organization_id) == organization_id)
    )
    if wallet_id is None:
        raise NotFound("wallet not found")
    return wallet_id


def _reason(value: str | None) -> str | None:
    return validation.text(value, "reason", max_length=1000, required=False) or None


async def consume_tokens(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    amount: object,
    key: str,
    reason: str | None = None,
    metadata: Any = None,
    metadata_limits: validation.MetadataLimits = validation.DEFAULT_METADATA_LIMITS,
) -> ledger.Posting:
    """Spends tokens inside the caller's unit of work (``session``'s transaction)."""
    await access.authorize(session, principal, organization_id, Permission.TOKENS_CONSUME)
    wallet_id = await wallet_id_of(session, organization_id)
    return await ledger.consume(
        session,
        wallet_id,
        amount=validation.token_amount(amount),
        key=validation.ledger_key(key),
        actor=principal.actor,
        reason=_reason(reason),
        metadata=validation.metadata(metadata, metadata_limits),
    )


async def consume_tokens_batched(
    batcher: batching.ConsumptionBatcher,
    granted: access.Access,
    *,
    actor: str,
    amount: object,
    key: str,
    reason: str | None = None,
    metadata: Any = None,
    metadata_limits: validation.MetadataLimits = validation.DEFAULT_METADATA_LIMITS,
) -> ledger.Posting:
    """Spends tokens in a transaction of their own, through the group commit: batched with the
    concurrent consumptions of the same wallet (``ledger.batching``). ``granted``: the caller's
    access to the organization, already read (an API key's is known without the database)."""
    access.check(granted, Permission.TOKENS_CONSUME)
    return await batcher.consume_for_organization(
        granted.organization_id,
        amount=validation.token_amount(amount),
        key=validation.ledger_key(key),
        actor=actor,
        reason=_reason(reason),
        metadata=validation.metadata(metadata, metadata_limits),
    )


async def reserve_tokens(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    amount: object,
    key: str,
    ttl_seconds: int,
    reason: str | None = None,
) -> ledger.Posting:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_CONSUME)
    tokens = validation.token_amount(amount)
    key = validation.ledger_key(key)
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(f"ttlSeconds must be between 1 and {MAX_TTL_SECONDS}", field="ttlSeconds")
    wallet_id = await wallet_id_of(session, organization_id)
    return await ledger.reserve(
        session,
        wallet_id,
        amount=tokens,
        key=key,
        ttl_seconds=ttl_seconds,
        actor=principal.actor,
        reason=_reason(reason),
    )


async def _organization_of(session: AsyncSession, table: str, object_id: uuid.UUID) -> uuid.UUID | None:
    organization_id: uuid.UUID | None = await session.scalar(
        text(
            f"SELECT w.organization_id FROM {table} t JOIN wallets w ON w.id = t.wallet_id "  # noqa: S608
            "WHERE t.id = :id"
        ),
        {"id": object_id},
    )
    return organization_id


async def _authorize_on(
    session: AsyncSession, principal: Principal, table: str, object_id: uuid.UUID, what: str
) -> None:
    """Authorizes tokens.consume in the organization owning a reservation or entry; one of
    another organization is not found."""
    organization_id = await _organization_of(session, table, object_id)
    if organization_id is None:
        raise NotFound(f"{what} not found")
    try:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_CONSUME)
    except NotFound as exc:
        raise NotFound(f"{what} not found") from exc


async def capture_reservation(
    session: AsyncSession,
    principal: Principal,
    reservation_id: uuid.UUID,
    *,
    amount: object | None,
    key: str | None,
) -> ledger.Posting:
    await _authorize_on(session, principal, "reservations", reservation_id, "reservation")
    tokens = None if amount is None else validation.token_amount(amount)
    key = None if key is None else validation.ledger_key(key)
    return await ledger.capture(session, reservation_id, amount=tokens, key=key, actor=principal.actor)


async def release_reservation(
    session: AsyncSession, principal: Principal, reservation_id: uuid.UUID
) -> ledger.Posting:
    await _authorize_on(session, principal, "reservations", reservation_id, "reservation")
    return await ledger.release(session, reservation_id, actor=principal.actor)


async def refund_consumption(
    session: AsyncSession,
    principal: Principal,
    entry_id: uuid.UUID,
    *,
    amount: object | None,
    reason: str | None,
    key: str | None,
) -> ledger.Posting:
    await _authorize_on(session, principal, "ledger_entries", entry_id, "ledger entry")
    tokens = None if amount is None else validation.token_amount(amount)
    key = None if key is None else validation.ledger_key(key)
    return await ledger.refund(
        session, entry_id, amount=tokens, key=key, reason=_reason(reason), actor=principal.actor
    )


async def grant_tokens(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    amount: object,
    reason: str,
    expires_at: datetime | None,
    priority: int | None,
    key: str | None,
) -> ledger.Posting:
    access.require_platform_admin(principal)
    tokens = validation.token_amount(amount)
    text_reason = validation.text(reason, "reason", max_length=1000)
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidInput("expiresAt must carry a time zone", field="expiresAt")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise InvalidInput("expiresAt must be in the future", field="expiresAt")
    if priority is not None and not 0 <= priority <= 1000:
        raise InvalidInput("priority must be between 0 and 1000", field="priority")
    key = None if key is None else validation.ledger_key(key)
    wallet_id = await wallet_id_of(session, organization_id)
    posting = await ledger.credit(
        session,
        wallet_id,
        amount=tokens,
        source=GrantSource.ADMIN,
        actor=principal.actor,
        key=key,
        priority=priority,
        expires_at=expires_at,
        reason=text_reason,
    )
    if not posting.replayed:
        await audit.record(
            session,
            principal,
            action="wallet.grant",
            organization_id=organization_id,
            target_type="wallet",
            target_id=wallet_id,
            after={
                "amount": tokens,
                "reason": text_reason,
                "entry": str(posting.entry.id if posting.entry else ""),
            },
        )
    return posting


async def set_wallet_status(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    status: WalletStatus,
    reason: str,
) -> ledger.WalletState:
    access.require_platform_admin(principal)
    text_reason = validation.text(reason, "reason", max_length=1000)
    wallet_id = await wallet_id_of(session, organization_id)
    state = await change_status(session, principal, organization_id, wallet_id, status, text_reason)
    # Staff take the wallet's status over: a suspension by an unpaid subscription is theirs now,
    # and a later payment of that subscription does not undo it.
    await session.execute(
        text(
            "UPDATE subscriptions SET wallet_suspended_at = NULL "
            "WHERE organization_id = :org AND wallet_suspended_at IS NOT NULL"
        ),
        {"org": organization_id},
    )
    return state


async def change_status(
    session: AsyncSession,
    actor: audit.Actor,
    organization_id: uuid.UUID,
    wallet_id: uuid.UUID,
    status: WalletStatus,
    reason: str,
    *,
    now: datetime | None = None,
) -> ledger.WalletState:
    """Sets the wallet's status through the ledger. A change (not the same status again) tells
    the organization and is audited under ``actor`` (staff, or a duty or Stripe's event)."""
    before = await session.scalar(select(col(Wallet.status)).where(col(Wallet.id) == wallet_id))
    state = await ledger.set_status(session, wallet_id, status.value, now=now)
    if before != status.value:
        suspended = status == WalletStatus.SUSPENDED
        await notifications.notify(
            session,
            organization_id,
            NotificationKind.WALLET_SUSPENDED if suspended else NotificationKind.WALLET_REACTIVATED,
            key=f"wallet-status:{uuid7()}",  # each change of status is a cause of its own
            title="Wallet suspended" if suspended else "Wallet reactivated",
            body=(
                f"The wallet was suspended: consumptions are refused. Reason: {reason}"
                if suspended
                else f"The wallet is active again. Reason: {reason}"
            ),
            data={"status": status.value, "reason": reason},
            now=now,
        )
        await audit.record(
            session,
            actor,
            action="wallet.suspend" if suspended else "wallet.reactivate",
            organization_id=organization_id,
            target_type="wallet",
            target_id=wallet_id,
            before={"status": before},
            after={"status": status.value, "reason": reason},
        )
    return state


async def sweep_expired(sessions: async_sessionmaker[AsyncSession], now: datetime | None = None) -> int:
    """Settles every wallet with a reservation or a lot past its expiry at ``now`` (the
    database's time when None): how many wallets were settled. One short transaction per
    wallet, so each wallet lock is held only for its own sweep."""
    settled = 0
    while True:
        async with sessions() as session:
            due = await ledger.due_wallets(session, now=now)
        if not due:
            return settled
        for wallet_id in due:
            async with transaction(sessions) as session:
                await ledger.settle(session, wallet_id, now=now)
            settled += 1


# ---------------------------------------------------------------- reads


# The wallet, and whether a reservation or a lot of it is past due: one round trip, on the
# driver's connection (it is most of a balance read). WALLET_STATE is also joined to the
# organization by organizations.get_organization_of_key.
WALLET_STATE = """
    SELECT w.id AS wallet_id, w.organization_id AS wallet_organization_id, w.status AS wallet_status,
           w.balance, w.reserved, w.lifetime_purchased, w.lifetime_granted, w.lifetime_consumed,
           w.lifetime_expired,
           EXISTS (SELECT 1 FROM reservations r
                   WHERE r.wallet_id = w.id AND r.status = 'open' AND r.expires_at <= now())
        OR EXISTS (SELECT 1 FROM credit_lots l
                   WHERE l.wallet_id = w.id AND l.remaining > 0 AND l.expires_at <= now()) AS due
    FROM wallets w
"""
_READ_WALLET = WALLET_STATE + " WHERE w.organization_id = $1"


def wallet_state(row: Any) -> ledger.WalletState | None:
    """The wallet of a ``WALLET_STATE`` row as it stands; None when there is none, or when a
    reservation or lot is past due (``read_wallet`` settles it first)."""
    if row["wallet_id"] is None or row["due"]:
        return None
    return ledger.WalletState(
        id=row["wallet_id"],
        organization_id=row["wallet_organization_id"],
        status=row["wallet_status"],
        balance=row["balance"],
        reserved=row["reserved"],
        lifetime_purchased=row["lifetime_purchased"],
        lifetime_granted=row["lifetime_granted"],
        lifetime_consumed=row["lifetime_consumed"],
        lifetime_expired=row["lifetime_expired"],
    )


async def read_wallet(
    connection: Any, sessions: async_sessionmaker[AsyncSession], organization_id: uuid.UUID
) -> ledger.WalletState:
    """The organization's wallet, read on an asyncpg ``connection``. When a reservation or lot
    is past due, it is settled first (in its own short transaction), so a read never shows
    tokens that already went back."""
    row = await connection.fetchrow(_READ_WALLET, organization_id)
    if row is None:
        raise NotFound("wallet not found")
    state = wallet_state(row)
    if state is None:  # past due
        async with transaction(sessions) as writer:
            return await ledger.settle(writer, row["wallet_id"])
    return state


async def grants(session: AsyncSession, wallet_id: uuid.UUID) -> list[CreditLot]:
    """Lots with tokens remaining and not expired, in draw-down order."""
    rows = await session.execute(
        select(CreditLot)
        .where(
            col(CreditLot.wallet_id) == wallet_id,
            col(CreditLot.remaining) > 0,
            (col(CreditLot.expires_at).is_(None)) | (col(CreditLot.expires_at) > text("now()")),
        )
        .order_by(
            col(CreditLot.priority),
            col(CreditLot.expires_at).asc().nulls_last(),
            col(CreditLot.seq),
        )
    )
    return list(rows.scalars())


async def expiring_soon(session: AsyncSession, wallet_id: uuid.UUID, days: int) -> int:
    if not 0 <= days <= 3650:
        raise InvalidInput("days must be between 0 and 3650", field="days")
    total = await session.scalar(
        text(
            """
            SELECT coalesce(sum(remaining), 0) FROM credit_lots
            WHERE wallet_id = :wallet AND remaining > 0
              AND expires_at > now() AND expires_at <= now() + make_interval(days => :days)
            """
        ),
        {"wallet": wallet_id, "days": days},
    )
    return int(total or 0)


@dataclass(frozen=True, slots=True)
class EntryPage:
    entries: list[ledger.Entry]
    has_next: bool


# A page is read on the driver's connection, as plain records: up to MAX_PAGE entries, for
# which ORM objects, or even SQLAlchemy's row processing, cost more than the query.
_PAGE = (
    "SELECT id, wallet_id, seq, kind, amount, held_change, balance_after, reserved_after,"
    " idempotency_key, reason, metadata, created_at, actor, covered FROM ledger_entries WHERE wallet_id = $1"
)
_KINDS = {kind.value: kind for kind in EntryKind}


async def ledger_page(
    connection: Any,
    wallet_id: uuid.UUID,
    *,
    first: int,
    after_seq: int | None,
    kinds: list[EntryKind] | None,
    since: datetime | None,
    until: datetime | None,
) -> EntryPage:
    """Newest first, keyed on the wallet's gap-free entry sequence: a page never shifts
    when new entries arrive."""
    if not 0 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 0 and {MAX_PAGE}", field="first")
    conditions: list[str] = [_PAGE]
    params: list[Any] = [wallet_id]
    for condition, value in (
        ("seq < ${}", after_seq),
        ("kind = ANY(${}::text[])", [k.value for k in kinds] if kinds else None),
        ("created_at >= ${}", since),
        ("created_at < ${}", until),
    ):
        if value is not None:
            params.append(value)
            conditions.append(condition.format(len(params)))
    params.append(first + 1)
    query = " AND ".join(conditions) + f" ORDER BY seq DESC LIMIT ${len(params)}"
    rows = await connection.fetch(query, *params)
    entries = [
        ledger.Entry(
            id=r[0],
            wallet_id=r[1],
            seq=r[2],
            kind=_KINDS[r[3]],
            amount=r[4],
            held_change=r[5],
            balance_after=r[6],
            reserved_after=r[7],
            idempotency_key=r[8],
            reason=r[9],
            metadata=r[10],
            created_at=r[11],
            actor=r[12],
            covered=r[13],
        )
        for r in rows[:first]
    ]
    return EntryPage(entries=entries, has_next=len(rows) > first)


async def reservation(session: AsyncSession, reservation_id: uuid.UUID) -> Reservation | None:
    return await session.get(Reservation, reservation_id)


async def entry(session: AsyncSession, entry_id: uuid.UUID) -> LedgerEntry | None:
    return await session.get(LedgerEntry, entry_id)
