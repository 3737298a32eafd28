"""A Hypothesis state machine drives the ledger against a plain Python model of it.

Random sequences of credits (with and without expiry and priority), consumptions,
reservations, captures, releases, refunds, clock moves and expiry sweeps; after every step
every balance and counter, every lot's remaining, and the database's own invariant check
must agree with the model."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from orgwallet import ledger
from orgwallet.db.engine import create_engine, session_factory, transaction
from orgwallet.errors import InsufficientTokens, InvalidInput, NotRefundable, ReservationNotOpen
from orgwallet.ledger import GrantSource
from tests.ledger.conftest import new_wallet

T = TypeVar("T")
START = datetime(2030, 1, 1, tzinfo=UTC)
SOURCES = [GrantSource.PURCHASE, GrantSource.SUBSCRIPTION, GrantSource.TRIAL, GrantSource.ADMIN]


@dataclass
class Lot:
    order: int  # creation order
    source: str
    amount: int
    remaining: int
    priority: int
    expires_at: datetime | None
    origin: int | None = None  # the expired lot a refund lot stands in for

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class Draw:
    """What one origin entry drew, net of what was given back, by lot order."""

    net: dict[int, int] = field(default_factory=dict)


@dataclass
class Hold:
    amount: int
    expires_at: datetime
    draw: Draw
    status: str = "open"
    captured: int = 0
    capture_entry: uuid.UUID | None = None


@dataclass
class Spend:
    consumed: int
    draw: Draw
    refunded: int = 0


class Model:
    def __init__(self) -> None:
        self.now = START
        self.lots: list[Lot] = []
        self.balance = self.reserved = 0
        self.purchased = self.granted = self.consumed = self.expired = 0

    def new_lot(
        self, source: str, amount: int, priority: int, expires_at: datetime | None, origin: int | None = None
    ) -> Lot:
        lot = Lot(len(self.lots), source, amount, amount, priority, expires_at, origin)
        self.lots.append(lot)
        return lot

    def draw(self, amount: int) -> Draw:
        drawn = Draw()
        need = amount
        usable = [lot for lot in self.lots if lot.remaining > 0 and not lot.expired(self.now)]
        usable.sort(
            key=lambda lot: (lot.priority, lot.expires_at is None, lot.expires_at or START, lot.order)
        )
        for lot in usable:
            take = min(lot.remaining, need)
            lot.remaining -= take
            drawn.net[lot.order] = drawn.net.get(lot.order, 0) + take
            need -= take
            if need == 0:
                break
        assert need == 0
        return drawn

    def give_back(self, drawn: Draw, amount: int, *, new_lot_if_expired: bool) -> None:
        need = amount
        candidates = [self.lots[order] for order, n in drawn.net.items() if n > 0]
        candidates.sort(
            key=lambda lot: (
                -lot.priority,
                lot.expires_at is not None,
                -(lot.expires_at.timestamp() if lot.expires_at else 0),
                -lot.order,
            )
        )
        for lot in candidates:
            give = min(drawn.net[lot.order], need)
            if new_lot_if_expired and lot.expired(self.now):
                self.new_lot("refund", give, lot.priority, None, origin=lot.order)
            else:
                lot.remaining += give
            drawn.net[lot.order] -= give
            need -= give
            if need == 0:
                break
        assert need == 0

    def sweep_lots(self) -> None:
        for lot in self.lots:
            if lot.remaining > 0 and lot.expired(self.now):
                self.balance -= lot.remaining
                self.expired += lot.remaining
                lot.remaining = 0

    def unhold(self, hold: Hold, amount: int) -> None:
        self.balance += amount
        self.reserved -= amount
        self.give_back(hold.draw, amount, new_lot_if_expired=False)

    def settle(self, holds: dict[uuid.UUID, Hold]) -> None:
        for hold in sorted(holds.values(), key=lambda h: h.expires_at):
            if hold.status == "open" and hold.expires_at <= self.now:
                self.unhold(hold, hold.amount)
                hold.status = "expired"
        self.sweep_lots()


def run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coroutine)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ledger_matches_model(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    engine = create_engine(database_url, pool_size=2)
    sessions = session_factory(engine)

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.wallet = run(loop, new_wallet(sessions))
            self.model = Model()
            self.holds: dict[uuid.UUID, Hold] = {}
            self.spends: dict[uuid.UUID, Spend] = {}
            self.capture_of: dict[uuid.UUID, uuid.UUID] = {}
            self.last_key: tuple[str, int, uuid.UUID] | None = None

        async def _in_tx(self, operation: Any) -> Any:
            async with transaction(sessions) as s:
                return await operation(s)

        def call(self, operation: Any) -> Any:
            return run(loop, self._in_tx(operation))

        @rule(
            amount=st.integers(1, 50),
            source=st.sampled_from(SOURCES),
            priority=st.none() | st.integers(0, 40),
            expires_in=st.none() | st.integers(60, 5 * 24 * 3600),
        )
        def credit(
            self, amount: int, source: GrantSource, priority: int | None, expires_in: int | None
        ) -> None:
            m = self.model
            expires_at = m.now + timedelta(seconds=expires_in) if expires_in else None
            self.call(
                lambda s: ledger.credit(
                    s,
                    self.wallet,
                    amount=amount,
                    source=source,
                    actor="t",
                    priority=priority,
                    expires_at=expires_at,
                    now=m.now,
                )
            )
            m.settle(self.holds)
            m.new_lot(
                source.value,
                amount,
                ledger.DEFAULT_PRIORITY[source] if priority is None else priority,
                expires_at,
            )
            m.balance += amount
            if source == GrantSource.PURCHASE:
                m.purchased += amount
            else:
                m.granted += amount

        @rule(amount=st.integers(1, 40))
        def consume(self, amount: int) -> None:
            m = self.model
            key = str(uuid.uuid4())
            try:
                posting = self.call(
                    lambda s: ledger.consume(s, self.wallet, amount=amount, key=key, actor="t", now=m.now)
                )
            except InsufficientTokens as error:
                # Nothing written, the settlement included (it rolled back with the call).
                assert error.available == self._settled().balance < amount
                return
            m.settle(self.holds)
            assert m.balance >= amount
            m.balance -= amount
            m.consumed += amount
            self.spends[posting.entry.id] = Spend(amount, m.draw(amount))
            self.last_key = (key, amount, posting.entry.id)

        def _settled(self) -> Model:
            """The model as it would be once settled, without settling it: a failed call
            rolls its settlement back, so the model must not settle either."""
            model, holds = copy.deepcopy((self.model, self.holds))
            model.settle(holds)
            model.holds = holds  # type: ignore[attr-defined]
            return model

        @precondition(lambda self: self.last_key is not None)
        @rule()
        def replay_last_consumption(self) -> None:
            assert self.last_key is not None
            key, amount, entry_id = self.last_key
            posting = self.call(
                lambda s: ledger.consume(
                    s, self.wallet, amount=amount, key=key, actor="t", now=self.model.now
                )
            )
            self.model.settle(self.holds)
            assert posting.replayed and posting.entry.id == entry_id

        @rule(amount=st.integers(1, 30), ttl=st.integers(1, 3 * 24 * 3600))
        def reserve(self, amount: int, ttl: int) -> None:
            m = self.model
            try:
                posting = self.call(
                    lambda s: ledger.reserve(
                        s,
                        self.wallet,
                        amount=amount,
                        key=str(uuid.uuid4()),
                        ttl_seconds=ttl,
                        actor="t",
                        now=m.now,
                    )
                )
            except InsufficientTokens:
                assert self._settled().balance < amount
                return
            m.settle(self.holds)
            m.balance -= amount
            m.reserved += amount
            self.holds[posting.reservation_id] = Hold(amount, m.now + timedelta(seconds=ttl), m.draw(amount))

        @precondition(lambda self: bool(self.holds))
        @rule(data=st.data())
        def capture(self, data: st.DataObject) -> None:
            m = self.model
            reservation_id = data.draw(st.sampled_from(sorted(self.holds)))
            hold = self.holds[reservation_id]
            amount = data.draw(st.none() | st.integers(1, hold.amount + 2))
            try:
                posting = self.call(
                    lambda s: ledger.capture(s, reservation_id, amount=amount, actor="t", now=m.now)
                )
            except ReservationNotOpen:
                status = self._settled().holds[reservation_id].status  # type: ignore[attr-defined]
                assert status != "open" and not (status == "captured" and amount in (None, hold.captured))
                return
            except InvalidInput:
                assert self._settled().holds[reservation_id].status == "open"  # type: ignore[attr-defined]
                assert amount is not None and amount > hold.amount
                return
            m.settle(self.holds)
            if hold.status == "captured":
                assert posting.replayed and amount in (None, hold.captured)
                return
            assert hold.status == "open" and not posting.replayed
            take = hold.amount if amount is None else amount
            m.reserved -= take
            m.consumed += take
            if take < hold.amount:
                m.unhold(hold, hold.amount - take)
                m.sweep_lots()
            hold.status = "captured"
            hold.captured = take
            hold.capture_entry = posting.entry.id
            self.spends[posting.entry.id] = Spend(take, hold.draw)

        @precondition(lambda self: bool(self.holds))
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            m = self.model
            reservation_id = data.draw(st.sampled_from(sorted(self.holds)))
            hold = self.holds[reservation_id]
            try:
                posting = self.call(lambda s: ledger.release(s, reservation_id, actor="t", now=m.now))
            except ReservationNotOpen:
                assert self._settled().holds[reservation_id].status == "captured"  # type: ignore[attr-defined]
                return
            m.settle(self.holds)
            if hold.status in ("released", "expired"):
                assert posting.replayed
                return
            m.unhold(hold, hold.amount)
            hold.status = "released"
            m.sweep_lots()

        @precondition(lambda self: bool(self.spends))
        @rule(data=st.data())
        def refund(self, data: st.DataObject) -> None:
            m = self.model
            entry_id = data.draw(st.sampled_from(sorted(self.spends)))
            spend = self.spends[entry_id]
            amount = data.draw(st.none() | st.integers(1, spend.consumed + 1))
            try:
                self.call(lambda s: ledger.refund(s, entry_id, amount=amount, actor="t", now=m.now))
            except (InvalidInput, NotRefundable):
                left = spend.consumed - spend.refunded
                assert left == 0 or (amount is not None and amount > left)
                return
            m.settle(self.holds)
            give = spend.consumed - spend.refunded if amount is None else amount
            spend.refunded += give
            m.balance += give
            m.consumed -= give
            m.give_back(spend.draw, give, new_lot_if_expired=True)

        @rule(seconds=st.integers(0, 3 * 24 * 3600))
        def move_clock(self, seconds: int) -> None:
            self.model.now += timedelta(seconds=seconds)

        @rule()
        def sweep(self) -> None:
            self.call(lambda s: ledger.settle(s, self.wallet, now=self.model.now))
            self.model.settle(self.holds)

        @invariant()
        def database_agrees(self) -> None:
            m = self.model
            row, lots, problems = run(loop, self._read())
            assert (row.balance, row.reserved) == (m.balance, m.reserved)
            assert (row.lifetime_purchased, row.lifetime_granted) == (m.purchased, m.granted)
            assert (row.lifetime_consumed, row.lifetime_expired) == (m.consumed, m.expired)
            assert [(r.source, r.amount, r.remaining, r.priority, r.expires_at) for r in lots] == [
                (lot.source, lot.amount, lot.remaining, lot.priority, lot.expires_at) for lot in m.lots
            ]
            assert problems == {}

        async def _read(self) -> Any:
            async with sessions() as s:
                row = (await s.execute(text("SELECT * FROM wallets WHERE id = :w"), {"w": self.wallet})).one()
                lots = (
                    await s.execute(
                        text("SELECT * FROM credit_lots WHERE wallet_id = :w ORDER BY seq"),
                        {"w": self.wallet},
                    )
                ).all()
                return row, lots, await ledger.violations(s, self.wallet)

    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=40,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        run(loop, engine.dispose())
        loop.close()
