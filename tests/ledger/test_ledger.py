"""The ledger module against a real PostgreSQL: rules, idempotency, concurrency, database guards."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.db.engine import transaction
from orgwallet.errors import (
    IdempotencyConflict,
    InsufficientTokens,
    InvalidInput,
    NotFound,
    NotRefundable,
    ReservationNotOpen,
    WalletSuspended,
)
from orgwallet.ledger import EntryKind, GrantSource

Sessions = async_sessionmaker[AsyncSession]
T0 = datetime(2030, 1, 1, tzinfo=UTC)


async def credit(
    sessions: Sessions,
    wallet: uuid.UUID,
    amount: int,
    source: GrantSource = GrantSource.PURCHASE,
    *,
    expires_at: datetime | None = None,
    priority: int | None = None,
    now: datetime = T0,
) -> ledger.Posting:
    async with transaction(sessions) as s:
        return await ledger.credit(
            s,
            wallet,
            amount=amount,
            source=source,
            actor="test",
            key=f"credit-{uuid.uuid4()}",
            expires_at=expires_at,
            priority=priority,
            now=now,
        )


async def consume(
    sessions: Sessions, wallet: uuid.UUID, amount: int, key: str | None = None, now: datetime = T0
) -> ledger.Posting:
    async with transaction(sessions) as s:
        return await ledger.consume(
            s, wallet, amount=amount, key=key or str(uuid.uuid4()), actor="t", now=now
        )


async def lots(sessions: Sessions, wallet: uuid.UUID) -> list[tuple[str, int, int]]:
    async with sessions() as s:
        rows = await s.execute(
            text(
                "SELECT source, amount, remaining FROM credit_lots WHERE wallet_id = :w "
                "ORDER BY created_at, id"
            ),
            {"w": wallet},
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def count(sessions: Sessions, table: str) -> int:
    async with sessions() as s:
        return int(await s.scalar(text(f"SELECT count(*) FROM {table}")) or 0)  # noqa: S608


async def assert_sound(sessions: Sessions) -> None:
    async with sessions() as s:
        assert await ledger.violations(s) == {}


class TestCredit:
    async def test_credit_creates_lot_and_entry(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        posting = await credit(sessions, wallet, 10)
        assert posting.entry is not None
        assert (posting.entry.kind, posting.entry.amount, posting.entry.balance_after) == (
            EntryKind.PURCHASE,
            10,
            10,
        )
        assert posting.wallet.balance == 10 and posting.wallet.lifetime_purchased == 10
        assert await lots(sessions, wallet) == [("purchase", 10, 10)]
        await assert_sound(sessions)

    async def test_same_key_same_arguments_replays(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        async with transaction(sessions) as s:
            first = await ledger.credit(s, wallet, amount=5, source=GrantSource.ADMIN, actor="a", key="g")
        async with transaction(sessions) as s:
            again = await ledger.credit(s, wallet, amount=5, source=GrantSource.ADMIN, actor="a", key="g")
        assert again.replayed and again.entry and first.entry and again.entry.id == first.entry.id
        assert again.wallet.balance == 5
        with pytest.raises(IdempotencyConflict):
            async with transaction(sessions) as s:
                await ledger.credit(s, wallet, amount=6, source=GrantSource.ADMIN, actor="a", key="g")

    async def test_unknown_wallet_is_not_found(self, sessions: Sessions) -> None:
        with pytest.raises(NotFound):
            async with transaction(sessions) as s:
                await ledger.credit(s, uuid.uuid4(), amount=5, source=GrantSource.ADMIN, actor="a")


class TestConsume:
    async def test_draw_down_order_priority_then_expiry_then_age(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        purchased = await credit(sessions, wallet, 10, GrantSource.PURCHASE)
        later = await credit(sessions, wallet, 3, GrantSource.ADMIN, expires_at=T0 + timedelta(days=9))
        sooner = await credit(sessions, wallet, 2, GrantSource.ADMIN, expires_at=T0 + timedelta(days=3))
        never = await credit(sessions, wallet, 4, GrantSource.ADMIN)
        subscription = await credit(sessions, wallet, 5, GrantSource.SUBSCRIPTION)
        await consume(sessions, wallet, 12)
        # admin lots (priority 10): soonest expiry first (2, then 3), then no expiry (4);
        # then the subscription lot (20) gives 3; purchased (30) untouched.
        remaining = {
            p.entry.id: r
            for p, r in ((sooner, 0), (later, 0), (never, 0), (subscription, 2), (purchased, 10))
        }
        async with sessions() as s:
            rows = await s.execute(
                text("SELECT entry_id, remaining FROM credit_lots WHERE wallet_id = :w"), {"w": wallet}
            )
            assert {r.entry_id: r.remaining for r in rows} == remaining
        await assert_sound(sessions)

    async def test_insufficient_writes_nothing(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 3)
        entries = await count(sessions, "ledger_entries")
        with pytest.raises(InsufficientTokens) as raised:
            await consume(sessions, wallet, 4)
        assert (raised.value.requested, raised.value.available) == (4, 3)
        assert await count(sessions, "ledger_entries") == entries
        assert await lots(sessions, wallet) == [("purchase", 3, 3)]

    async def test_expired_lots_are_never_drawn(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 5, GrantSource.TRIAL, expires_at=T0 + timedelta(hours=1))
        await credit(sessions, wallet, 2)
        with pytest.raises(InsufficientTokens) as raised:
            await consume(sessions, wallet, 3, now=T0 + timedelta(hours=2))
        assert raised.value.available == 2
        # The failed call rolled back, sweep included; the next successful one sweeps for good.
        posting = await consume(sessions, wallet, 2, now=T0 + timedelta(hours=2))
        assert posting.wallet.balance == 0 and posting.wallet.lifetime_expired == 5
        await assert_sound(sessions)

    async def test_suspended_wallet_refuses_but_takes_credits(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 5)
        async with transaction(sessions) as s:
            await ledger.set_status(s, wallet, "suspended")
        with pytest.raises(WalletSuspended):
            await consume(sessions, wallet, 1)
        with pytest.raises(WalletSuspended):
            async with transaction(sessions) as s:
                await ledger.reserve(s, wallet, amount=1, key="r", ttl_seconds=60, actor="t")
        assert (await credit(sessions, wallet, 2)).wallet.balance == 7

    async def test_replay_returns_first_entry_and_conflict_on_other_arguments(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        first = await consume(sessions, wallet, 2, key="k")
        again = await consume(sessions, wallet, 2, key="k")
        assert again.replayed and again.entry and first.entry and again.entry.id == first.entry.id
        assert again.wallet.balance == 8
        with pytest.raises(IdempotencyConflict):
            await consume(sessions, wallet, 3, key="k")
        with pytest.raises(IdempotencyConflict):  # another kind with the same key
            async with transaction(sessions) as s:
                await ledger.reserve(s, wallet, amount=2, key="k", ttl_seconds=60, actor="t")

    async def test_concurrent_duplicates_of_one_key_make_one_entry(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 100)
        results = await asyncio.gather(*(consume(sessions, wallet, 7, key="same") for _ in range(12)))
        assert len({r.entry.id for r in results if r.entry}) == 1
        assert sum(not r.replayed for r in results) == 1
        async with sessions() as s:
            assert await s.scalar(text("SELECT balance FROM wallets WHERE id = :w"), {"w": wallet}) == 93
        await assert_sound(sessions)

    async def test_concurrent_consumers_never_overspend(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 20, GrantSource.TRIAL, expires_at=T0 + timedelta(days=1))
        await credit(sessions, wallet, 30)

        async def attempt(i: int) -> bool:
            try:
                await consume(sessions, wallet, 3 if i % 2 else 2)
            except InsufficientTokens:
                return False
            return True

        outcomes = await asyncio.gather(*(attempt(i) for i in range(40)))
        async with sessions() as s:
            balance = await s.scalar(text("SELECT balance FROM wallets WHERE id = :w"), {"w": wallet})
        spent = sum((3 if i % 2 else 2) for i, ok in enumerate(outcomes) if ok)
        assert balance == 50 - spent and 0 <= balance < 2
        await assert_sound(sessions)


class TestReservations:
    async def reserve(
        self, sessions: Sessions, wallet: uuid.UUID, amount: int, ttl: int = 60, now: datetime = T0
    ) -> ledger.Posting:
        async with transaction(sessions) as s:
            return await ledger.reserve(
                s, wallet, amount=amount, key=str(uuid.uuid4()), ttl_seconds=ttl, actor="t", now=now
            )

    async def test_reserve_then_capture_part(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        held = await self.reserve(sessions, wallet, 6)
        assert (held.wallet.balance, held.wallet.reserved) == (4, 6)
        assert held.reservation_id is not None
        async with transaction(sessions) as s:
            captured = await ledger.capture(s, held.reservation_id, amount=4, actor="t", now=T0)
        assert (captured.wallet.balance, captured.wallet.reserved) == (6, 0)
        assert captured.wallet.lifetime_consumed == 4 and captured.reservation_status == "captured"
        # Capturing again with the same amount replays; with another amount it is closed.
        async with transaction(sessions) as s:
            again = await ledger.capture(s, held.reservation_id, amount=4, actor="t", now=T0)
        assert again.replayed and again.entry and captured.entry and again.entry.id == captured.entry.id
        with pytest.raises(ReservationNotOpen):
            async with transaction(sessions) as s:
                await ledger.capture(s, held.reservation_id, amount=5, actor="t", now=T0)
        with pytest.raises(ReservationNotOpen):
            async with transaction(sessions) as s:
                await ledger.release(s, held.reservation_id, actor="t", now=T0)
        await assert_sound(sessions)

    async def test_capture_more_than_held_is_invalid(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        held = await self.reserve(sessions, wallet, 3)
        assert held.reservation_id
        with pytest.raises(InvalidInput):
            async with transaction(sessions) as s:
                await ledger.capture(s, held.reservation_id, amount=4, actor="t", now=T0)

    async def test_release_returns_everything_and_replays(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        held = await self.reserve(sessions, wallet, 10)
        assert held.reservation_id
        async with transaction(sessions) as s:
            released = await ledger.release(s, held.reservation_id, actor="t", now=T0)
        assert (released.wallet.balance, released.wallet.reserved) == (10, 0)
        async with transaction(sessions) as s:
            again = await ledger.release(s, held.reservation_id, actor="t", now=T0)
        assert again.replayed and again.wallet.balance == 10
        assert await lots(sessions, wallet) == [("purchase", 10, 10)]
        await assert_sound(sessions)

    async def test_unreleased_hold_expires_on_next_touch(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        held = await self.reserve(sessions, wallet, 7, ttl=30)
        assert held.reservation_id
        async with transaction(sessions) as s:
            state = await ledger.settle(s, wallet, now=T0 + timedelta(seconds=31))
        assert (state.balance, state.reserved) == (10, 0)
        with pytest.raises(ReservationNotOpen) as raised:
            async with transaction(sessions) as s:
                await ledger.capture(s, held.reservation_id, actor="t", now=T0 + timedelta(seconds=32))
        assert raised.value.status == "expired"
        await assert_sound(sessions)

    async def test_released_tokens_of_an_expired_lot_are_swept(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 5, GrantSource.TRIAL, expires_at=T0 + timedelta(minutes=5))
        held = await self.reserve(sessions, wallet, 5, ttl=3600)
        assert held.reservation_id
        async with transaction(sessions) as s:
            released = await ledger.release(s, held.reservation_id, actor="t", now=T0 + timedelta(minutes=10))
        # A hold does not extend the life of the tokens it held.
        assert (released.wallet.balance, released.wallet.lifetime_expired) == (0, 5)
        await assert_sound(sessions)


class TestRefund:
    async def test_refund_never_exceeds_what_was_consumed(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        spent = await consume(sessions, wallet, 6)
        assert spent.entry
        async with transaction(sessions) as s:
            part = await ledger.refund(s, spent.entry.id, amount=4, actor="t", now=T0)
        assert part.wallet.balance == 8 and part.wallet.lifetime_consumed == 2
        with pytest.raises(InvalidInput):
            async with transaction(sessions) as s:
                await ledger.refund(s, spent.entry.id, amount=3, actor="t", now=T0)
        async with transaction(sessions) as s:
            rest = await ledger.refund(s, spent.entry.id, actor="t", now=T0)
        assert rest.entry and rest.entry.amount == 2 and rest.wallet.balance == 10
        with pytest.raises(NotRefundable):
            async with transaction(sessions) as s:
                await ledger.refund(s, spent.entry.id, actor="t", now=T0)
        assert await lots(sessions, wallet) == [("purchase", 10, 10)]
        await assert_sound(sessions)

    async def test_refund_to_expired_lot_makes_a_new_lot(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 4, GrantSource.TRIAL, expires_at=T0 + timedelta(days=1))
        spent = await consume(sessions, wallet, 3)
        assert spent.entry
        async with transaction(sessions) as s:
            refunded = await ledger.refund(s, spent.entry.id, actor="t", now=T0 + timedelta(days=2))
        # The trial lot's last token expired; the refunded 3 live on in a new lot.
        assert refunded.wallet.balance == 3 and refunded.wallet.lifetime_expired == 1
        assert sorted(await lots(sessions, wallet)) == [("refund", 3, 3), ("trial", 4, 0)]
        await assert_sound(sessions)

    async def test_a_hold_on_a_refund_lot_goes_back_to_that_lot(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        """Found by the model test: a hold drawn from a refund lot (standing in for an expired
        lot) once went back to the expired lot on release, and was swept."""
        await credit(sessions, wallet, 1, expires_at=T0 + timedelta(seconds=60))
        spent = await consume(sessions, wallet, 1)
        later = T0 + timedelta(seconds=60)
        assert spent.entry
        async with transaction(sessions) as s:
            await ledger.refund(s, spent.entry.id, actor="t", now=later)
        async with transaction(sessions) as s:
            held = await ledger.reserve(s, wallet, amount=1, key="r", ttl_seconds=1, actor="t", now=later)
        async with transaction(sessions) as s:
            state = await ledger.settle(s, wallet, now=later + timedelta(hours=1))
        assert (state.balance, state.reserved, state.lifetime_expired) == (1, 0, 0)
        assert held.reservation_id
        assert sorted(await lots(sessions, wallet)) == [("purchase", 1, 0), ("refund", 1, 1)]
        await assert_sound(sessions)

    async def test_refund_of_a_capture(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        async with transaction(sessions) as s:
            held = await ledger.reserve(s, wallet, amount=8, key="r", ttl_seconds=60, actor="t", now=T0)
            assert held.reservation_id
            captured = await ledger.capture(s, held.reservation_id, amount=5, actor="t", now=T0)
        assert captured.entry
        async with transaction(sessions) as s:
            refunded = await ledger.refund(s, captured.entry.id, actor="t", now=T0)
        assert refunded.entry and refunded.entry.amount == 5 and refunded.wallet.balance == 10
        await assert_sound(sessions)

    async def test_only_consumptions_are_refundable(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        bought = await credit(sessions, wallet, 10)
        assert bought.entry
        with pytest.raises(NotRefundable):
            async with transaction(sessions) as s:
                await ledger.refund(s, bought.entry.id, actor="t", now=T0)


class TestExpiry:
    async def test_sweep_writes_expiration_entries(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 3, GrantSource.TRIAL, expires_at=T0 + timedelta(days=30))
        await credit(sessions, wallet, 5)
        async with sessions() as s:
            assert await ledger.due_wallets(s, now=T0 + timedelta(days=29)) == []
            assert await ledger.due_wallets(s, now=T0 + timedelta(days=30)) == [wallet]
        async with transaction(sessions) as s:
            state = await ledger.settle(s, wallet, now=T0 + timedelta(days=30))
        assert (state.balance, state.lifetime_expired) == (5, 3)
        async with sessions() as s:
            kinds = (await s.execute(text("SELECT kind, amount FROM ledger_entries ORDER BY seq"))).all()
        assert [tuple(k) for k in kinds][-1] == ("expiration", -3)
        await assert_sound(sessions)


class TestClawback:
    async def test_clawback_takes_what_is_left_and_reports_shortfall(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        bought = await credit(sessions, wallet, 10)
        await consume(sessions, wallet, 4)
        async with sessions() as s:
            lot_id = await s.scalar(text("SELECT id FROM credit_lots WHERE wallet_id = :w"), {"w": wallet})
        async with transaction(sessions) as s:
            taken = await ledger.clawback(s, lot_id, amount=10, key="claw", actor="stripe", now=T0)
        assert taken.entry and taken.entry.amount == -6 and taken.shortfall == 4
        assert taken.wallet.balance == 0
        async with transaction(sessions) as s:
            again = await ledger.clawback(s, lot_id, amount=10, key="claw", actor="stripe", now=T0)
        assert again.replayed and again.wallet.balance == 0
        assert bought.entry
        await assert_sound(sessions)


class TestDatabaseRules:
    """The database refuses what Python might get wrong."""

    async def test_entries_and_allocations_are_append_only(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        await consume(sessions, wallet, 1)
        for statement in (
            "UPDATE ledger_entries SET amount = amount + 1",
            "DELETE FROM ledger_entries",
            "UPDATE ledger_allocations SET amount = amount + 1",
            "DELETE FROM ledger_allocations",
            "TRUNCATE ledger_entries CASCADE",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                async with transaction(sessions) as s:
                    await s.execute(text(statement))

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE wallets SET balance = -1",
            "UPDATE wallets SET reserved = -1",
            "UPDATE credit_lots SET remaining = amount + 1",
            "UPDATE credit_lots SET remaining = -1",
        ],
    )
    async def test_checks_refuse_impossible_balances(
        self, sessions: Sessions, wallet: uuid.UUID, statement: str
    ) -> None:
        await credit(sessions, wallet, 10)
        with pytest.raises(IntegrityError):
            async with transaction(sessions) as s:
                await s.execute(text(statement))

    async def test_direction_of_amounts_is_checked(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        with pytest.raises(IntegrityError):
            async with transaction(sessions) as s:
                await s.execute(
                    text(
                        "INSERT INTO ledger_entries (wallet_id, seq, kind, amount, balance_after,"
                        " reserved_after) VALUES (:w, 1, 'consumption', 5, 5, 0)"
                    ),
                    {"w": wallet},
                )

    async def test_one_key_per_wallet(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        with pytest.raises(IntegrityError):
            async with transaction(sessions) as s:
                for seq in (1, 2):
                    await s.execute(
                        text(
                            "INSERT INTO ledger_entries (wallet_id, seq, kind, amount, balance_after,"
                            " reserved_after, idempotency_key) VALUES (:w, :seq, 'admin_grant', 1, 1, 0, 'k')"
                        ),
                        {"w": wallet, "seq": seq},
                    )

    async def test_violations_name_a_broken_wallet(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        async with transaction(sessions) as s:
            await s.execute(text("UPDATE wallets SET balance = 11 WHERE id = :w"), {"w": wallet})
        async with sessions() as s:
            found = await ledger.violations(s)
        assert list(found) == [wallet]
        assert any("sum of entry amounts" in p for p in found[wallet])
