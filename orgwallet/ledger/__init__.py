"""The ledger: the only code that writes ``wallets``, ``credit_lots``, ``ledger_entries``,
``ledger_allocations`` and ``reservations``.

Each operation is one PL/pgSQL function (migration 0002) called in ONE round trip, inside
the caller's transaction. The function locks the wallet row (the lock every writer of a
wallet takes first; lots are then locked in draw-down order), settles what is due (expired
reservations return their tokens, then expired lots are swept), checks the idempotency
key, and appends entries. Same key and same arguments returns the first entry
(``Posting.replayed``); same key and other arguments raises ``IdempotencyConflict``.

Invariants, true after every transaction and checked by ``violations`` (``orgwallet check``):

1. ``wallet.balance``  = sum of ``ledger_entries.amount``       (available tokens)
2. ``wallet.reserved`` = sum of ``ledger_entries.held_change``  (tokens held by reservations)
3. ``wallet.balance``  = sum of ``credit_lots.remaining``; a reservation draws its tokens
   out of the lots when it is made, so held tokens are in no lot's ``remaining``.
   Lots past ``expires_at`` count until the sweep writes their EXPIRATION entry (every
   operation on the wallet sweeps first, so no operation ever draws an expired lot).
4. ``wallet.reserved`` = sum of ``reservations.amount`` over open reservations that are not
   covered (a covered hold holds nothing).
5. For every lot, ``remaining`` = sum of its ``ledger_allocations.amount`` (the lot's
   credit, draws negative, give-backs positive).
6. Entries are numbered 1..``wallet.entry_seq`` without gaps, and each ``balance_after`` is
   the running sum of ``amount``; the last one equals the wallet's balance and reserved.

Hence balance + reserved = sum of lots' remaining + held amounts = sum of signed entries
(amount + held_change). The database enforces ``balance >= 0``, ``reserved >= 0``,
``0 <= remaining <= amount``, each kind's direction of ``amount``, one idempotency key per
wallet, and append-only ``ledger_entries`` and ``ledger_allocations`` (triggers).

The wallet-change signal: every committed change of a balance passes one trigger
(``wallets_signal``). A change that leaves the wallet's watch band (``watch``) enqueues, in
the same transaction, one ``wallet.signal`` job, whose handler (``jobs.signal``) lets the
listeners (balance alerts; next, automatic top-ups and live updates) act and sets the next band.

Subscriptions (migration 0014). A period's allowance is a SUBSCRIPTION lot for its billing
period (``grant_subscription_period``). An unlimited plan covers the wallet until
``wallets.covered_until`` (``set_coverage``): while covered, every consumption path (single,
group commit, reservations) records its entry with ``amount = 0`` and the tokens asked for in
``covered`` (``Entry.covered``); it draws no lot, cannot lack tokens, and moves no lifetime
counter: ``lifetime_consumed`` counts tokens drawn. A suspended wallet still refuses.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet import metrics
from orgwallet.errors import (
    IdempotencyConflict,
    InsufficientTokens,
    InvalidInput,
    NotFound,
    NotRefundable,
    ReservationNotOpen,
    WalletSuspended,
)

#: The most tokens a wallet may hold or have been given: BigInt is exact up to 2**53-1 (a JSON
#: number), and the columns (bigint) would overflow not far beyond.
MAX_TOKENS = 2**53 - 1


class EntryKind(enum.StrEnum):
    PURCHASE = "purchase"
    SUBSCRIPTION_GRANT = "subscription_grant"
    TRIAL_GRANT = "trial_grant"
    ADMIN_GRANT = "admin_grant"
    CONSUMPTION = "consumption"
    RESERVATION = "reservation"
    CAPTURE = "capture"
    RELEASE = "release"
    REFUND = "refund"
    EXPIRATION = "expiration"
    CLAWBACK = "clawback"
    ADJUSTMENT = "adjustment"


class GrantSource(enum.StrEnum):
    PURCHASE = "purchase"
    SUBSCRIPTION = "subscription"
    TRIAL = "trial"
    ADMIN = "admin"
    REFUND = "refund"


#: Draw-down order (lower first): trial and promotional grants, then subscription
#: allowances, then purchased tokens.
DEFAULT_PRIORITY: dict[GrantSource, int] = {
    GrantSource.TRIAL: 10,
    GrantSource.ADMIN: 10,
    GrantSource.SUBSCRIPTION: 20,
    GrantSource.PURCHASE: 30,
    GrantSource.REFUND: 30,
}

_CREDIT_KINDS = {
    GrantSource.PURCHASE: EntryKind.PURCHASE,
    GrantSource.SUBSCRIPTION: EntryKind.SUBSCRIPTION_GRANT,
    GrantSource.TRIAL: EntryKind.TRIAL_GRANT,
    GrantSource.ADMIN: EntryKind.ADMIN_GRANT,
}


@dataclass(frozen=True, slots=True)
class WalletState:
    id: uuid.UUID
    organization_id: uuid.UUID
    status: str
    balance: int
    reserved: int
    lifetime_purchased: int
    lifetime_granted: int
    lifetime_consumed: int
    lifetime_expired: int


@dataclass(frozen=True, slots=True)
class Entry:
    id: uuid.UUID
    wallet_id: uuid.UUID
    seq: int
    kind: EntryKind
    amount: int
    held_change: int
    balance_after: int
    reserved_after: int
    idempotency_key: str | None
    reason: str | None
    metadata: Any
    created_at: datetime
    actor: str | None = None  # read back from the table; a posting's entry leaves it to the caller
    #: Tokens used under an unlimited plan (``amount`` is then 0); None for an entry not covered.
    covered: int | None = None


@dataclass(frozen=True, slots=True)
class Posting:
    """What a ledger operation did: the entry written (or replayed), the wallet afterwards."""

    entry: Entry | None
    wallet: WalletState
    replayed: bool = False
    reservation_id: uuid.UUID | None = None
    reservation_status: str | None = None
    shortfall: int = 0


async def _call(session: AsyncSession, function: str, params: dict[str, Any]) -> Any:
    """``SELECT * FROM function(...)``: one statement, one round trip. The last argument is
    always the clock: the transaction's ``now()`` unless a test moves it."""
    placeholders = ", ".join(f":{name}" for name in params if name != "now")
    statement = text(
        f"SELECT * FROM {function}({placeholders}, coalesce(CAST(:now AS timestamptz), now()))"  # noqa: S608
    )
    return (await session.execute(statement, params)).one()


async def _spend(session: AsyncSession, path: str, function: str, params: dict[str, Any]) -> Any:
    """``_call`` for a function that spends tokens, its outcome counted on ``path`` (/metrics)."""
    try:
        row = await _call(session, function, params)
    except Exception:
        metrics.consumption(path, "error")
        raise
    metrics.consumption(path, row.outcome)
    return row


def _posting(
    row: Any, *, requested: int | None = None, key: str | None = None, what: str = "wallet"
) -> Posting:
    outcome = row.outcome
    if outcome == "not_found":
        raise NotFound(f"{what} not found")
    wallet = WalletState(
        id=row.wallet_id,
        organization_id=row.organization_id,
        status=row.wallet_status,
        balance=row.wallet_balance,
        reserved=row.wallet_reserved,
        lifetime_purchased=row.lifetime_purchased,
        lifetime_granted=row.lifetime_granted,
        lifetime_consumed=row.lifetime_consumed,
        lifetime_expired=row.lifetime_expired,
    )
    if outcome == "suspended":
        raise WalletSuspended(wallet.id)
    if outcome == "insufficient":
        raise InsufficientTokens(wallet.id, requested or 0, row.detail)
    if outcome == "conflict":
        raise IdempotencyConflict(wallet.id, key or "")
    if outcome == "not_open":
        raise ReservationNotOpen(row.reservation_id, row.reservation_status)
    if outcome == "too_much":
        raise InvalidInput(f"amount must be at most {row.detail}", field="amount")
    if outcome == "not_refundable":
        raise NotRefundable(row.entry_id, "only consumptions and captures with tokens left to refund")
    assert outcome in ("ok", "replayed"), outcome
    entry = None
    if row.entry_id is not None:
        entry = Entry(
            id=row.entry_id,
            wallet_id=wallet.id,
            seq=row.entry_seq,
            kind=EntryKind(row.entry_kind),
            amount=row.entry_amount,
            held_change=row.entry_held,
            balance_after=row.balance_after,
            reserved_after=row.reserved_after,
            idempotency_key=row.entry_key,
            reason=row.entry_reason,
            metadata=row.entry_metadata,
            created_at=row.entry_created_at,
            covered=row.entry_covered,
        )
    return Posting(
        entry=entry,
        wallet=wallet,
        replayed=outcome == "replayed",
        reservation_id=row.reservation_id,
        reservation_status=row.reservation_status,
        shortfall=row.detail or 0,
    )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


async def open_wallet(session: AsyncSession, organization_id: uuid.UUID) -> uuid.UUID:
    """Creates the organization's wallet (empty, active)."""
    wallet_id: uuid.UUID = (
        await session.execute(
            text("INSERT INTO wallets (organization_id) VALUES (:org) RETURNING id"),
            {"org": organization_id},
        )
    ).scalar_one()
    return wallet_id


async def credit(
    session: AsyncSession,
    wallet_id: uuid.UUID,
    *,
    amount: int,
    source: GrantSource,
    actor: str,
    key: str | None = None,
    priority: int | None = None,
    expires_at: datetime | None = None,
    cost_minor: int | None = None,
    currency: str | None = None,
    reason: str | None = None,
    metadata: Any = None,
    reference_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> Posting:
    """Adds a lot of ``amount`` tokens and its entry (purchase, grant...)."""
    kind = _CREDIT_KINDS[source]
    row = await _call(
        session,
        "ledger_credit",
        {
            "wallet": wallet_id,
            "kind": kind.value,
            "source": source.value,
            "amount": amount,
            "priority": DEFAULT_PRIORITY[source] if priority is None else priority,
            "expires_at": expires_at,
            "cost_minor": cost_minor,
            "currency": currency,
            "key": key,
            "reason": reason,
            "metadata": _json(metadata),
            "actor": actor,
            "reference": reference_id,
            "now": now,
        },
    )
    return _within_limits(_posting(row, key=key))


def _within_limits(posting: Posting, field: str = "amount") -> Posting:
    """A credit's answer, unless it took the wallet past ``MAX_TOKENS``. Checked on the
    function's answer, under the wallet's lock; the caller's transaction rolls back on this
    error as on any other, so nothing stays written."""
    wallet = posting.wallet
    if max(wallet.balance + wallet.reserved, wallet.lifetime_purchased, wallet.lifetime_granted) > MAX_TOKENS:
        raise InvalidInput(
            f"{field} would take the wallet past {MAX_TOKENS} tokens, the most the API counts exactly",
            field=field,
        )
    return posting


def _whole(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_TOKENS


@dataclass(frozen=True, slots=True)
class PeriodGrant:
    """What ``grant_subscription_period`` did: the grant's posting, and the tokens carried over
    from earlier periods beyond the rollover cap that it expired (0 on a replay)."""

    posting: Posting
    cut: int


async def grant_subscription_period(
    session: AsyncSession,
    wallet_id: uuid.UUID,
    *,
    tokens: int,
    period_start: datetime,
    period_end: datetime,
    rollover: Literal["expire", "rollover"],
    cap: int | None,
    key: str,
    actor: str,
    reason: str | None = None,
    metadata: Any = None,
    cost_minor: int | None = None,
    currency: str | None = None,
    reference_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> PeriodGrant:
    """Credits one billing period's allowance, ``[period_start, period_end)``, as a SUBSCRIPTION
    lot, once per ``key`` (the invoice's: ``subscription-invoice:<id>``).

    ``expire``: the lot expires at ``period_end``. ``rollover``: it does not; ``cap`` bounds the
    remainder carried into a new period: the subscription lots of earlier periods (those whose
    period ended by ``period_start``) keep at most ``cap`` tokens in all once this grant is
    made, the excess expired oldest lot first (EXPIRATION entries), in the same call. ``cap``
    None: everything rolls over. Under ``expire`` the carried remainder is cut to 0 (lots left
    by an earlier rollover plan). The new grant itself is never cut, so the allowance after a
    renewal is at most ``cap + tokens``. A grant that comes after a later period's (webhooks
    arrive in any order) is capped at that later period's start instead, itself counted, so the
    lots end as they would have in order (migration 0015). A mid-period upgrade grants the
    difference with its own key and ``period_start`` at the upgrade: the current period's lots
    are not "earlier"."""
    if not _whole(tokens, 1):
        raise InvalidInput(f"tokens must be a whole number between 1 and {MAX_TOKENS}", field="tokens")
    if period_start.tzinfo is None or period_end.tzinfo is None:
        raise InvalidInput("a period's bounds must carry a time zone", field="periodEnd")
    if period_end <= period_start:
        raise InvalidInput("a period must end after it starts", field="periodEnd")
    if rollover == "expire":
        if cap is not None:
            raise InvalidInput("a rollover cap needs the rollover policy", field="rolloverCap")
        carried_cap: int | None = 0
        expires_at: datetime | None = period_end
    elif rollover == "rollover":
        if cap is not None and not _whole(cap, 0):
            raise InvalidInput(f"rolloverCap must be between 0 and {MAX_TOKENS}", field="rolloverCap")
        carried_cap, expires_at = cap, None
    else:
        raise InvalidInput("rollover must be 'expire' or 'rollover'", field="rollover")
    row = await _call(
        session,
        "ledger_grant_subscription",
        {
            "wallet": wallet_id,
            "amount": tokens,
            "priority": DEFAULT_PRIORITY[GrantSource.SUBSCRIPTION],
            "period_start": period_start,
            "period_end": period_end,
            "expires_at": expires_at,
            "cap": carried_cap,
            "cost_minor": cost_minor,
            "currency": currency,
            "key": key,
            "reason": reason,
            "metadata": _json(metadata),
            "actor": actor,
            "reference": reference_id,
            "now": now,
        },
    )
    posting = _within_limits(_posting(row, key=key), field="tokens")
    return PeriodGrant(posting=replace(posting, shortfall=0), cut=row.detail or 0)


@dataclass(frozen=True, slots=True)
class Coverage:
    """A change of the wallet's coverage by an unlimited plan, for the caller's audit."""

    wallet_id: uuid.UUID
    before: datetime | None
    until: datetime | None


async def set_coverage(
    session: AsyncSession, wallet_id: uuid.UUID, until: datetime | None, *, now: datetime | None = None
) -> Coverage:
    """Covers the wallet's consumptions until ``until`` (None: no longer covered). Covered, a
    consumption (single, batched, reserved) is recorded but draws nothing and cannot lack
    tokens. Setting the same value again changes nothing, so it is idempotent as it stands."""
    if until is not None and until.tzinfo is None:
        raise InvalidInput("coveredUntil must carry a time zone", field="coveredUntil")
    row = await _call(session, "ledger_set_coverage", {"wallet": wallet_id, "until": until, "now": now})
    if not row.wallet_found:
        raise NotFound("wallet not found")
    return Coverage(wallet_id=wallet_id, before=row.covered_before, until=until)


async def consume(
    session: AsyncSession,
    wallet_id: uuid.UUID,
    *,
    amount: int,
    key: str,
    actor: str,
    reason: str | None = None,
    metadata: Any = None,
    now: datetime | None = None,
) -> Posting:
    """Spends ``amount`` tokens, drawing lots in draw-down order; ``InsufficientTokens``
    (nothing written) when the available balance is short."""
    row = await _spend(
        session,
        "consume",
        "ledger_consume",
        {
            "wallet": wallet_id,
            "amount": amount,
            "key": key,
            "reason": reason,
            "metadata": _json(metadata),
            "actor": actor,
            "now": now,
        },
    )
    return _posting(row, requested=amount, key=key)


async def reserve(
    session: AsyncSession,
    wallet_id: uuid.UUID,
    *,
    amount: int,
    key: str,
    ttl_seconds: int,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> Posting:
    """Holds ``amount`` tokens for work in flight; they return by themselves after the TTL."""
    row = await _spend(
        session,
        "reserve",
        "ledger_reserve",
        {
            "wallet": wallet_id,
            "amount": amount,
            "key": key,
            "ttl": ttl_seconds,
            "reason": reason,
            "actor": actor,
            "now": now,
        },
    )
    return _posting(row, requested=amount, key=key)


async def capture(
    session: AsyncSession,
    reservation_id: uuid.UUID,
    *,
    actor: str,
    amount: int | None = None,
    key: str | None = None,
    now: datetime | None = None,
) -> Posting:
    """Consumes ``amount`` (default: all) of an open reservation; the rest returns."""
    row = await _spend(
        session,
        "capture",
        "ledger_capture",
        {"reservation": reservation_id, "amount": amount, "key": key, "actor": actor, "now": now},
    )
    return _posting(row, key=key, what="reservation")


async def release(
    session: AsyncSession, reservation_id: uuid.UUID, *, actor: str, now: datetime | None = None
) -> Posting:
    """Returns an open reservation's tokens; releasing a released one replays."""
    row = await _call(session, "ledger_release", {"reservation": reservation_id, "actor": actor, "now": now})
    return _posting(row, what="reservation")


async def refund(
    session: AsyncSession,
    entry_id: uuid.UUID,
    *,
    actor: str,
    amount: int | None = None,
    key: str | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> Posting:
    """Gives back consumed tokens (default: all not yet refunded) to the lots they came from,
    or to a new lot where those have expired. Never more than the entry consumed."""
    row = await _call(
        session,
        "ledger_refund",
        {"entry": entry_id, "amount": amount, "key": key, "reason": reason, "actor": actor, "now": now},
    )
    return _posting(row, key=key, what="ledger entry")


async def clawback(
    session: AsyncSession,
    lot_id: uuid.UUID,
    *,
    amount: int,
    key: str,
    actor: str,
    reason: str | None = None,
    reference_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> Posting:
    """Takes back up to ``amount`` of what is left in a lot; ``Posting.shortfall`` is the part
    already spent that could not be taken back."""
    row = await _call(
        session,
        "ledger_clawback",
        {
            "lot": lot_id,
            "amount": amount,
            "key": key,
            "reason": reason,
            "actor": actor,
            "reference": reference_id,
            "now": now,
        },
    )
    return _posting(row, key=key, what="credit lot")


async def reinstate(
    session: AsyncSession,
    lot_id: uuid.UUID,
    *,
    clawback_key: str,
    key: str,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> Posting:
    """Gives back what the clawback under ``clawback_key`` took from lot ``lot_id`` (a dispute
    won), to that lot: once, and never more than it took, whatever the key. ``Posting.entry``
    is None when that clawback took nothing (or never happened). A lot that has expired
    meanwhile is swept again at once: giving back does not extend a token's life."""
    row = await _call(
        session,
        "ledger_reinstate",
        {
            "lot": lot_id,
            "clawback_key": clawback_key,
            "key": key,
            "reason": reason,
            "actor": actor,
            "now": now,
        },
    )
    return _posting(row, key=key, what="credit lot")


async def settle(session: AsyncSession, wallet_id: uuid.UUID, *, now: datetime | None = None) -> WalletState:
    """Locks the wallet and settles what is due (expired reservations and lots)."""
    row = await _call(session, "ledger_settle", {"wallet": wallet_id, "now": now})
    return _posting(row).wallet


async def set_status(
    session: AsyncSession, wallet_id: uuid.UUID, status: str, *, now: datetime | None = None
) -> WalletState:
    row = await _call(session, "ledger_set_status", {"wallet": wallet_id, "status": status, "now": now})
    return _posting(row).wallet


async def lock_wallet(session: AsyncSession, wallet_id: uuid.UUID) -> tuple[WalletState, int] | None:
    """Locks the wallet row (as every ledger operation does first) and reads it: the state and
    its entry sequence. For listeners of the wallet-change signal, which act on a balance that
    cannot move until they commit."""
    row = (
        await session.execute(
            text(
                """
                SELECT id, organization_id, status, balance, reserved, lifetime_purchased,
                       lifetime_granted, lifetime_consumed, lifetime_expired, entry_seq
                FROM wallets WHERE id = :wallet FOR UPDATE
                """
            ),
            {"wallet": wallet_id},
        )
    ).one_or_none()
    if row is None:
        return None
    return WalletState(*row[:9]), row.entry_seq


async def watch(
    session: AsyncSession, wallet_id: uuid.UUID, *, below: int | None, at_or_above: int | None
) -> None:
    """Sets the wallet's watch band: the next balance change that leaves
    ``[below, at_or_above)`` enqueues one ``wallet.signal`` job (trigger ``wallets_signal``,
    migration 0007). None on a side watches nothing there. Call it holding the wallet's lock
    (``lock_wallet``), with a band that holds the current balance."""
    await session.execute(
        text("UPDATE wallets SET watch_below = :below, watch_at_or_above = :above WHERE id = :wallet"),
        {"wallet": wallet_id, "below": below, "above": at_or_above},
    )


async def due_wallets(
    session: AsyncSession, *, now: datetime | None = None, limit: int = 1000
) -> list[uuid.UUID]:
    """Wallets with a reservation or a lot past its expiry, for the sweep."""
    rows = await session.execute(
        text(
            """
            SELECT wallet_id FROM reservations
            WHERE status = 'open' AND expires_at <= coalesce(CAST(:now AS timestamptz), now())
            UNION
            SELECT wallet_id FROM credit_lots
            WHERE remaining > 0 AND expires_at <= coalesce(CAST(:now AS timestamptz), now())
            LIMIT :limit
            """
        ),
        {"now": now, "limit": limit},
    )
    return list(rows.scalars())


async def violations(session: AsyncSession, wallet_id: uuid.UUID | None = None) -> dict[uuid.UUID, list[str]]:
    """Every broken invariant, by wallet (all wallets, or one)."""
    rows = await session.execute(
        text(
            """
            SELECT w.id, v.problem FROM wallets w, LATERAL ledger_violations(w.id) AS v(problem)
            WHERE CAST(:wallet AS uuid) IS NULL OR w.id = CAST(:wallet AS uuid)
            ORDER BY w.id
            """
        ),
        {"wallet": wallet_id},
    )
    found: dict[uuid.UUID, list[str]] = {}
    for wid, problem in rows:
        found.setdefault(wid, []).append(problem)
    return found
