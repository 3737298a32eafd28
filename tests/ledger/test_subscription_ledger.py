"""The ledger's part of subscriptions (migration 0014): period grants with their rollover
policy, and an unlimited plan's coverage on every consumption path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal
from orgwallet.db.engine import DriverPool, transaction
from orgwallet.errors import (
    IdempotencyConflict,
    InsufficientTokens,
    InvalidInput,
    NotFound,
    NotRefundable,
    WalletSuspended,
)
from orgwallet.ledger import DEFAULT_PRIORITY, GrantSource
from orgwallet.ledger.batching import ConsumptionBatcher
from orgwallet.services import access
from orgwallet.services import wallets as wallet_service

Sessions = async_sessionmaker[AsyncSession]
T0 = datetime(2030, 1, 1, tzinfo=UTC)
PERIOD = timedelta(days=30)


def period(i: int) -> tuple[datetime, datetime]:
    return T0 + i * PERIOD, T0 + (i + 1) * PERIOD


async def grant(
    sessions: Sessions,
    wallet: uuid.UUID,
    tokens: int,
    i: int,
    rollover: Literal["expire", "rollover"],
    cap: int | None = None,
    *,
    key: str | None = None,
    start: datetime | None = None,
    now: datetime | None = None,
) -> ledger.PeriodGrant:
    """Period ``i``'s grant, paid at its start (or at ``now``)."""
    period_start, period_end = period(i)
    async with transaction(sessions) as s:
        return await ledger.grant_subscription_period(
            s,
            wallet,
            tokens=tokens,
            period_start=start or period_start,
            period_end=period_end,
            rollover=rollover,
            cap=cap,
            key=key or f"subscription-invoice:in_{i}",
            actor="stripe",
            reason="subscription period",
            now=now or start or period_start,
        )


async def consume(
    sessions: Sessions, wallet: uuid.UUID, amount: int, now: datetime, key: str | None = None
) -> int:
    async with transaction(sessions) as s:
        posting = await ledger.consume(
            s, wallet, amount=amount, key=key or str(uuid.uuid4()), actor="t", now=now
        )
    return posting.wallet.balance


async def credit(
    sessions: Sessions,
    wallet: uuid.UUID,
    amount: int,
    source: GrantSource,
    expires_at: datetime | None = None,
) -> None:
    async with transaction(sessions) as s:
        await ledger.credit(
            s,
            wallet,
            amount=amount,
            source=source,
            actor="t",
            key=f"credit-{uuid.uuid4()}",
            expires_at=expires_at,
            now=T0,
        )


async def cover(
    sessions: Sessions, wallet: uuid.UUID, until: datetime | None, now: datetime | None = None
) -> None:
    async with transaction(sessions) as s:
        await ledger.set_coverage(s, wallet, until, now=now)


async def rows(sessions: Sessions, sql: str, wallet: uuid.UUID) -> list[tuple[Any, ...]]:
    async with sessions() as s:
        return [tuple(r) for r in await s.execute(text(sql), {"w": wallet})]


async def lots(sessions: Sessions, wallet: uuid.UUID) -> list[tuple[Any, ...]]:
    """(source, amount, remaining) of each lot, oldest first."""
    return await rows(
        sessions,
        "SELECT source, amount, remaining FROM credit_lots WHERE wallet_id = :w ORDER BY seq",
        wallet,
    )


async def wallet_row(sessions: Sessions, wallet: uuid.UUID) -> dict[str, Any]:
    async with sessions() as s:
        row = (await s.execute(text("SELECT * FROM wallets WHERE id = :w"), {"w": wallet})).mappings().one()
        return dict(row)


async def sound(sessions: Sessions, wallet: uuid.UUID) -> None:
    async with sessions() as s:
        assert await ledger.violations(s, wallet) == {}


class TestPeriodGrants:
    async def test_an_expire_lot_goes_at_period_end(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        start, end = period(0)
        done = await grant(sessions, wallet, 100, 0, "expire")
        assert (done.posting.entry and done.posting.entry.kind) == ledger.EntryKind.SUBSCRIPTION_GRANT
        assert await consume(sessions, wallet, 30, start + timedelta(days=1)) == 70
        async with sessions() as s:
            assert await ledger.due_wallets(s, now=end - timedelta(seconds=1)) == []
            assert await ledger.due_wallets(s, now=end) == [wallet]
        assert await wallet_service.sweep_expired(sessions, now=end) == 1
        assert await lots(sessions, wallet) == [("subscription", 100, 0)]
        assert await rows(
            sessions,
            "SELECT kind, amount, created_at FROM ledger_entries WHERE wallet_id = :w ORDER BY seq",
            wallet,
        ) == [
            ("subscription_grant", 100, start),
            ("consumption", -30, start + timedelta(days=1)),
            ("expiration", -70, end),
        ]
        assert (await wallet_row(sessions, wallet))["balance"] == 0
        await sound(sessions, wallet)

    async def test_three_expire_periods_each_gives_its_own_allowance_only(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        for i in range(3):
            start, _ = period(i)
            done = await grant(sessions, wallet, 100, i, "expire")
            assert (done.posting.wallet.balance, done.cut) == (100, 0)
            assert done.posting.wallet.lifetime_expired == 60 * i
            assert await consume(sessions, wallet, 40, start + timedelta(days=29)) == 60
            await sound(sessions, wallet)
        with pytest.raises(InsufficientTokens):
            await consume(sessions, wallet, 1, period(3)[0])
        assert await wallet_service.sweep_expired(sessions, now=period(3)[0]) == 1
        assert await lots(sessions, wallet) == [("subscription", 100, 0)] * 3
        await sound(sessions, wallet)

    async def test_rollover_carries_at_most_the_cap(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        first = await grant(sessions, wallet, 200, 0, "rollover", 100)
        assert first.cut == 0
        assert await consume(sessions, wallet, 120, period(0)[0] + timedelta(days=3)) == 80
        await sound(sessions, wallet)

        second = await grant(sessions, wallet, 200, 1, "rollover", 100)  # 80 left: all of it rolls
        assert (second.cut, second.posting.wallet.balance) == (0, 280)
        assert await lots(sessions, wallet) == [("subscription", 200, 80), ("subscription", 200, 200)]
        assert (
            await consume(sessions, wallet, 130, period(1)[0] + timedelta(days=3)) == 150
        )  # the oldest first
        await sound(sessions, wallet)

        third = await grant(sessions, wallet, 200, 2, "rollover", 100)  # 150 left: 100 rolls
        assert (third.cut, third.posting.wallet.balance, third.posting.wallet.lifetime_expired) == (
            50,
            300,
            50,
        )
        assert await lots(sessions, wallet) == [
            ("subscription", 200, 0),
            ("subscription", 200, 100),
            ("subscription", 200, 200),
        ]
        cut = await rows(
            sessions,
            "SELECT e.amount, e.reason, e.created_at, l.period_start FROM ledger_entries e "
            "JOIN credit_lots l ON l.id = e.reference_id WHERE e.wallet_id = :w AND e.kind = 'expiration'",
            wallet,
        )
        assert cut == [(-50, "subscription allowance rolled over beyond the cap", period(2)[0], period(1)[0])]
        await sound(sessions, wallet)

    async def test_the_cut_takes_the_oldest_lots_first_and_no_cap_keeps_all(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await grant(sessions, wallet, 100, 0, "rollover", None)
        await grant(sessions, wallet, 100, 1, "rollover", None)  # no cap: 100 rolls
        await consume(sessions, wallet, 30, period(1)[0] + timedelta(days=1))  # from period 0's lot
        done = await grant(sessions, wallet, 100, 2, "rollover", 50)  # 170 carried, 120 cut
        assert done.cut == 120
        assert await lots(sessions, wallet) == [
            ("subscription", 100, 0),
            ("subscription", 100, 50),
            ("subscription", 100, 100),
        ]
        # A plan that expires its allowance carries nothing over from an earlier rollover plan.
        done = await grant(sessions, wallet, 100, 3, "expire")
        assert (done.cut, done.posting.wallet.balance) == (150, 100)
        await sound(sessions, wallet)

    async def test_a_renewal_granted_after_the_next_one_is_capped_as_in_order(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        """Webhooks in any order: period 2's invoice.paid handled before period 1's. The lots end as
        in order (cap 150 at period 2's start: period 0's 100 and period 1's 100 carry 150), and
        period 1's own grant is counted in that cut, oldest period first."""
        await grant(sessions, wallet, 100, 0, "rollover", 150)
        late_first = await grant(sessions, wallet, 100, 2, "rollover", 150)  # carried: 100, no cut
        assert late_first.cut == 0
        late = await grant(sessions, wallet, 100, 1, "rollover", 150)
        assert (late.cut, late.posting.wallet.balance, late.posting.wallet.lifetime_expired) == (50, 250, 50)
        by_period = await rows(
            sessions,
            "SELECT period_start, amount, remaining FROM credit_lots WHERE wallet_id = :w"
            " ORDER BY period_start",
            wallet,
        )
        assert by_period == [(period(0)[0], 100, 50), (period(1)[0], 100, 100), (period(2)[0], 100, 100)]
        # Replayed, nothing more is cut.
        again = await grant(sessions, wallet, 100, 1, "rollover", 150)
        assert again.posting.replayed and again.posting.wallet.balance == 250
        await sound(sessions, wallet)

    async def test_an_upgrade_mid_period_grants_the_difference_once(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await grant(sessions, wallet, 200, 0, "rollover", 50)
        await grant(sessions, wallet, 200, 1, "rollover", 50)  # 200 carried, cut to 50
        await consume(sessions, wallet, 20, period(1)[0] + timedelta(days=2))
        upgrade_at = period(1)[0] + timedelta(days=10)
        upgrade = await grant(
            sessions,
            wallet,
            150,
            1,
            "rollover",
            50,
            key="subscription-invoice:in_proration",
            start=upgrade_at,
        )
        # This period's lot is not carried over: the upgrade cuts nothing and adds the difference.
        assert (upgrade.cut, upgrade.posting.wallet.balance) == (0, 30 + 200 + 150)
        again = await grant(
            sessions,
            wallet,
            150,
            1,
            "rollover",
            50,
            key="subscription-invoice:in_proration",
            start=upgrade_at,
        )
        assert again.posting.replayed and again.posting.entry == upgrade.posting.entry
        assert again.posting.wallet.balance == 380
        with pytest.raises(IdempotencyConflict):
            await grant(
                sessions,
                wallet,
                160,
                1,
                "rollover",
                50,
                key="subscription-invoice:in_proration",
                start=upgrade_at,
            )
        assert await lots(sessions, wallet) == [
            ("subscription", 200, 30),
            ("subscription", 200, 200),
            ("subscription", 150, 150),
        ]
        await sound(sessions, wallet)

    async def test_an_expire_upgrade_expires_with_its_period(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await grant(sessions, wallet, 100, 0, "expire")
        await grant(
            sessions, wallet, 50, 0, "expire", key="subscription-invoice:in_up", start=T0 + timedelta(days=5)
        )
        assert await consume(sessions, wallet, 10, T0 + timedelta(days=6)) == 140
        assert await consume(sessions, wallet, 1, period(0)[1] - timedelta(seconds=1)) == 139
        with pytest.raises(InsufficientTokens):
            await consume(sessions, wallet, 1, period(0)[1])
        await sound(sessions, wallet)

    async def test_one_invoice_one_lot_even_twenty_at_once(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        results = await asyncio.gather(*(grant(sessions, wallet, 100, 0, "expire") for _ in range(20)))
        assert sorted(r.posting.replayed for r in results) == [False] + [True] * 19
        assert {r.posting.entry.id for r in results if r.posting.entry} == {results[0].posting.entry.id}  # type: ignore[union-attr]
        assert await lots(sessions, wallet) == [("subscription", 100, 100)]
        assert (await wallet_row(sessions, wallet))["lifetime_granted"] == 100
        with pytest.raises(IdempotencyConflict):
            await grant(sessions, wallet, 100, 0, "rollover", 10)
        await sound(sessions, wallet)

    async def test_the_lot_records_its_period(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await grant(sessions, wallet, 100, 4, "rollover", 10)
        assert await rows(
            sessions,
            "SELECT period_start, period_end, expires_at, priority FROM credit_lots WHERE wallet_id = :w",
            wallet,
        ) == [(*period(4), None, DEFAULT_PRIORITY[GrantSource.SUBSCRIPTION])]

    @pytest.mark.parametrize(
        ("arguments", "field"),
        [
            ({"tokens": 0}, "tokens"),
            ({"tokens": True}, "tokens"),
            ({"tokens": 2**53}, "tokens"),
            ({"period_end": T0}, "periodEnd"),
            ({"period_start": datetime(2030, 1, 1)}, "periodEnd"),
            ({"rollover": "expire", "cap": 5}, "rolloverCap"),
            ({"cap": -1}, "rolloverCap"),
            ({"rollover": "keep"}, "rollover"),
        ],
    )
    async def test_bad_input_is_refused_and_writes_nothing(
        self, sessions: Sessions, wallet: uuid.UUID, arguments: dict[str, Any], field: str
    ) -> None:
        call: dict[str, Any] = {
            "tokens": 10,
            "period_start": T0,
            "period_end": T0 + PERIOD,
            "rollover": "rollover",
            "cap": 5,
            "key": "subscription-invoice:in_bad",
            "actor": "t",
            **arguments,
        }
        async with transaction(sessions) as s:
            with pytest.raises(InvalidInput) as error:
                await ledger.grant_subscription_period(s, wallet, **call)
        assert error.value.field == field
        assert await lots(sessions, wallet) == []

    async def test_an_unknown_wallet_is_not_found(self, sessions: Sessions) -> None:
        with pytest.raises(NotFound):
            await grant(sessions, uuid.uuid4(), 10, 0, "expire")
        with pytest.raises(NotFound):
            await cover(sessions, uuid.uuid4(), T0)


class TestDrawDownOrder:
    async def test_trial_then_subscription_then_purchased(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        assert (
            DEFAULT_PRIORITY[GrantSource.TRIAL]
            < DEFAULT_PRIORITY[GrantSource.SUBSCRIPTION]
            < DEFAULT_PRIORITY[GrantSource.PURCHASE]
        )
        await credit(
            sessions, wallet, 10, GrantSource.PURCHASE, expires_at=T0 + timedelta(days=1)
        )  # soonest, oldest
        await grant(sessions, wallet, 10, 0, "expire")
        await credit(
            sessions, wallet, 10, GrantSource.TRIAL, expires_at=T0 + timedelta(days=60)
        )  # latest, newest
        await consume(sessions, wallet, 15, T0)
        assert await lots(sessions, wallet) == [
            ("purchase", 10, 10),
            ("subscription", 10, 5),
            ("trial", 10, 0),
        ]
        await consume(sessions, wallet, 7, T0)
        assert await lots(sessions, wallet) == [
            ("purchase", 10, 8),
            ("subscription", 10, 0),
            ("trial", 10, 0),
        ]
        await sound(sessions, wallet)


def key_of(organization_id: uuid.UUID) -> ApiKeyPrincipal:
    return ApiKeyPrincipal(uuid.uuid4(), organization_id, frozenset({Permission.TOKENS_CONSUME}))


async def org_of(sessions: Sessions, wallet: uuid.UUID) -> uuid.UUID:
    return (await wallet_row(sessions, wallet))["organization_id"]  # type: ignore[no-any-return]


@pytest.fixture
async def batcher(engine: AsyncEngine) -> AsyncIterator[ConsumptionBatcher]:
    driver = DriverPool(engine.url.render_as_string(hide_password=False), 10)
    yield ConsumptionBatcher(driver)
    await driver.close()


async def consumption_entries(sessions: Sessions, wallet: uuid.UUID) -> list[tuple[Any, ...]]:
    return await rows(
        sessions,
        "SELECT amount, held_change, covered FROM ledger_entries"
        " WHERE wallet_id = :w AND kind = 'consumption' ORDER BY seq",
        wallet,
    )


class TestCoverage:
    """Real time here: the service paths and the group commit use the transaction's now()."""

    async def test_a_hundred_at_once_through_the_service_on_a_wallet_with_nothing(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        org = await org_of(sessions, wallet)
        await cover(sessions, wallet, datetime.now(UTC) + timedelta(days=1))

        async def one(i: int) -> ledger.Posting:
            async with transaction(sessions) as s:
                return await wallet_service.consume_tokens(
                    s, key_of(org), org, amount=7, key=f"use-{i}", metadata={"model": "m"}
                )

        results = await asyncio.gather(*(one(i) for i in range(100)))
        assert all(
            r.entry and (r.entry.amount, r.entry.covered) == (0, 7) and not r.replayed for r in results
        )
        assert sorted(r.entry.seq for r in results if r.entry) == list(range(1, 101))
        assert await consumption_entries(sessions, wallet) == [(0, 0, 7)] * 100
        after = await wallet_row(sessions, wallet)
        assert (after["balance"], after["reserved"], after["lifetime_consumed"], after["entry_seq"]) == (
            0,
            0,
            0,
            100,
        )
        assert await rows(sessions, "SELECT count(*) FROM ledger_allocations", wallet) == [(0,)]
        await sound(sessions, wallet)

        # Replayed as any consumption, covered or not by now.
        async with transaction(sessions) as s:
            again = await wallet_service.consume_tokens(
                s, key_of(org), org, amount=7, key="use-3", metadata={"model": "m"}
            )
        assert again.replayed and again.entry and again.entry.covered == 7
        with pytest.raises(IdempotencyConflict):
            async with transaction(sessions) as s:
                await wallet_service.consume_tokens(
                    s, key_of(org), org, amount=8, key="use-3", metadata={"model": "m"}
                )

        await cover(sessions, wallet, None)
        async with transaction(sessions) as s:
            replay = await wallet_service.consume_tokens(
                s, key_of(org), org, amount=7, key="use-4", metadata={"model": "m"}
            )
        assert replay.replayed
        with pytest.raises(InsufficientTokens):
            async with transaction(sessions) as s:
                await wallet_service.consume_tokens(s, key_of(org), org, amount=1, key="after")
        assert (await wallet_row(sessions, wallet))["entry_seq"] == 100

        # History shows them, covered.
        async with sessions() as s:
            driver = await s.connection()
            raw = (await driver.get_raw_connection()).driver_connection
            page = await wallet_service.ledger_page(
                raw, wallet, first=2, after_seq=None, kinds=None, since=None, until=None
            )
        assert [(e.seq, e.amount, e.covered, e.metadata) for e in page.entries] == [
            (100, 0, 7, {"model": "m"}),
            (99, 0, 7, {"model": "m"}),
        ]

    async def test_a_hundred_at_once_through_the_group_commit(
        self, sessions: Sessions, wallet: uuid.UUID, batcher: ConsumptionBatcher
    ) -> None:
        await credit(sessions, wallet, 10, GrantSource.PURCHASE)
        org = await org_of(sessions, wallet)
        await cover(sessions, wallet, datetime.now(UTC) + timedelta(days=1))
        granted = access.key_access(key_of(org), org)
        results = await asyncio.gather(
            *(
                wallet_service.consume_tokens_batched(
                    batcher, granted, actor="key", amount=50, key=f"b-{i % 100}"
                )
                for i in range(110)  # the last ten repeat a key: replays
            )
        )
        assert sum(r.replayed for r in results) == 10
        assert all(r.entry and r.entry.covered == 50 and r.wallet.balance == 10 for r in results)
        assert batcher.stats.largest > 1  # they did go together
        assert await consumption_entries(sessions, wallet) == [(0, 0, 50)] * 100
        assert await lots(sessions, wallet) == [("purchase", 10, 10)]
        await sound(sessions, wallet)

        await cover(sessions, wallet, datetime.now(UTC) - timedelta(seconds=1))  # ended
        posting = await wallet_service.consume_tokens_batched(
            batcher, granted, actor="key", amount=4, key="drawn"
        )
        assert posting.entry and (posting.entry.amount, posting.entry.covered, posting.wallet.balance) == (
            -4,
            None,
            6,
        )
        with pytest.raises(InsufficientTokens):
            await wallet_service.consume_tokens_batched(batcher, granted, actor="key", amount=7, key="short")
        await sound(sessions, wallet)

    async def test_coverage_follows_the_clock(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10, GrantSource.PURCHASE)
        async with transaction(sessions) as s:
            change = await ledger.set_coverage(s, wallet, T0 + PERIOD, now=T0)
        assert (change.before, change.until) == (None, T0 + PERIOD)
        assert await consume(sessions, wallet, 1000, T0 + timedelta(days=1)) == 10
        assert await consume(sessions, wallet, 3, T0 + PERIOD) == 7  # until is exclusive
        async with transaction(sessions) as s:
            change = await ledger.set_coverage(s, wallet, None, now=T0)
        assert change.before == T0 + PERIOD
        with pytest.raises(InvalidInput):
            await cover(sessions, wallet, datetime(2030, 1, 1))
        await sound(sessions, wallet)

    async def test_a_covered_use_gives_nothing_to_refund(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await cover(sessions, wallet, T0 + PERIOD, now=T0)
        async with transaction(sessions) as s:
            posting = await ledger.consume(s, wallet, amount=5, key="k", actor="t", now=T0)
        assert posting.entry
        with pytest.raises(NotRefundable):
            async with transaction(sessions) as s:
                await ledger.refund(s, posting.entry.id, actor="t", now=T0)

    async def test_a_covered_use_sends_no_balance_signal(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        """A new wallet watches for depletion (balance below 1): a covered use, which leaves the
        balance alone, is not a depletion."""
        await cover(sessions, wallet, T0 + PERIOD, now=T0)
        await consume(sessions, wallet, 5, T0)
        assert await rows(
            sessions, "SELECT count(*) FROM pgqueuer WHERE entrypoint = 'wallet.signal'", wallet
        ) == [(0,)]

    async def test_a_suspended_covered_wallet_refuses(
        self, sessions: Sessions, wallet: uuid.UUID, batcher: ConsumptionBatcher
    ) -> None:
        org = await org_of(sessions, wallet)
        await cover(sessions, wallet, datetime.now(UTC) + timedelta(days=1))
        async with transaction(sessions) as s:
            await ledger.set_status(s, wallet, "suspended")
        with pytest.raises(WalletSuspended):
            async with transaction(sessions) as s:
                await wallet_service.consume_tokens(s, key_of(org), org, amount=1, key="a")
        with pytest.raises(WalletSuspended):
            await wallet_service.consume_tokens_batched(
                batcher, access.key_access(key_of(org), org), actor="key", amount=1, key="b"
            )
        with pytest.raises(WalletSuspended):
            async with transaction(sessions) as s:
                await wallet_service.reserve_tokens(s, key_of(org), org, amount=1, key="c", ttl_seconds=60)
        assert (await wallet_row(sessions, wallet))["entry_seq"] == 0


class TestCoveredReservations:
    async def reserve(
        self, sessions: Sessions, wallet: uuid.UUID, amount: int, key: str, now: datetime, ttl: int = 60
    ) -> ledger.Posting:
        async with transaction(sessions) as s:
            return await ledger.reserve(
                s, wallet, amount=amount, key=key, ttl_seconds=ttl, actor="t", now=now
            )

    async def entries(self, sessions: Sessions, wallet: uuid.UUID) -> list[tuple[Any, ...]]:
        return await rows(
            sessions,
            "SELECT kind, amount, held_change, covered FROM ledger_entries WHERE wallet_id = :w ORDER BY seq",
            wallet,
        )

    async def test_a_hold_while_covered_holds_nothing_and_its_capture_is_covered(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await cover(sessions, wallet, T0 + timedelta(minutes=30), now=T0)
        held = await self.reserve(sessions, wallet, 40, "r", T0, ttl=3600)
        assert held.reservation_id and (held.wallet.balance, held.wallet.reserved) == (0, 0)
        assert (await self.reserve(sessions, wallet, 40, "r", T0, ttl=3600)).replayed
        # Captured after the coverage ended: still covered, it was a covered hold.
        async with transaction(sessions) as s:
            captured = await ledger.capture(
                s, held.reservation_id, amount=25, key="c", actor="t", now=T0 + timedelta(minutes=45)
            )
        assert captured.entry and (captured.entry.covered, captured.reservation_status) == (25, "captured")
        async with transaction(sessions) as s:
            again = await ledger.capture(
                s, held.reservation_id, amount=25, key="c", actor="t", now=T0 + timedelta(hours=2)
            )
        assert again.replayed
        assert await self.entries(sessions, wallet) == [
            ("reservation", 0, 0, 40),
            ("capture", 0, 0, 25),
            ("release", 0, 0, 15),  # the part not captured
        ]
        assert await rows(
            sessions, "SELECT amount, captured, covered FROM reservations WHERE wallet_id = :w", wallet
        ) == [(40, 25, True)]
        await sound(sessions, wallet)

    async def test_a_covered_hold_released_or_expired(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await cover(sessions, wallet, T0 + PERIOD, now=T0)
        released = await self.reserve(sessions, wallet, 5, "r1", T0)
        await self.reserve(sessions, wallet, 6, "r2", T0)
        assert released.reservation_id
        async with transaction(sessions) as s:
            await ledger.release(s, released.reservation_id, actor="t", now=T0)
        assert await wallet_service.sweep_expired(sessions, now=T0 + timedelta(minutes=2)) == 1
        assert await self.entries(sessions, wallet) == [
            ("reservation", 0, 0, 5),
            ("reservation", 0, 0, 6),
            ("release", 0, 0, 5),
            ("release", 0, 0, 6),
        ]
        assert await rows(
            sessions, "SELECT status FROM reservations WHERE wallet_id = :w ORDER BY amount", wallet
        ) == [
            ("released",),
            ("expired",),
        ]
        await sound(sessions, wallet)

    async def test_a_hold_from_before_the_coverage_is_captured_as_usual(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10, GrantSource.PURCHASE)
        held = await self.reserve(sessions, wallet, 8, "r", T0)
        assert held.reservation_id
        await cover(sessions, wallet, T0 + PERIOD, now=T0)
        async with transaction(sessions) as s:
            await ledger.capture(s, held.reservation_id, amount=6, actor="t", now=T0)
        assert await lots(sessions, wallet) == [("purchase", 10, 4)]
        assert (await wallet_row(sessions, wallet))["lifetime_consumed"] == 6
        await sound(sessions, wallet)
