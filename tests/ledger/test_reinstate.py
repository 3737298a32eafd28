"""``ledger.reinstate``: what one clawback took from a lot goes back to that lot (a dispute won),
once and never more than it took, under the lot's own expiry."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from orgwallet import ledger
from orgwallet.db.engine import transaction
from orgwallet.errors import NotFound
from orgwallet.ledger import EntryKind
from tests.ledger.test_ledger import T0, Sessions, assert_sound, consume, credit


async def purchase_lot(
    sessions: Sessions, wallet: uuid.UUID, amount: int, expires_at: datetime | None = None
) -> uuid.UUID:
    posting = await credit(sessions, wallet, amount, expires_at=expires_at)
    assert posting.entry is not None
    async with sessions() as s:
        lot_id = await s.scalar(
            text("SELECT id FROM credit_lots WHERE entry_id = :e"), {"e": posting.entry.id}
        )
    assert isinstance(lot_id, uuid.UUID)
    return lot_id


async def claw(sessions: Sessions, lot_id: uuid.UUID, amount: int, key: str = "dispute") -> ledger.Posting:
    async with transaction(sessions) as s:
        return await ledger.clawback(s, lot_id, amount=amount, key=key, actor="stripe", now=T0)


async def reinstate(
    sessions: Sessions,
    lot_id: uuid.UUID,
    key: str = "dispute:won",
    *,
    clawback_key: str = "dispute",
    now: datetime = T0,
) -> ledger.Posting:
    async with transaction(sessions) as s:
        return await ledger.reinstate(
            s, lot_id, clawback_key=clawback_key, key=key, actor="stripe", reason="won", now=now
        )


async def remaining(sessions: Sessions, lot_id: uuid.UUID) -> int:
    async with sessions() as s:
        return int(
            await s.scalar(text("SELECT remaining FROM credit_lots WHERE id = :l"), {"l": lot_id}) or 0
        )


async def test_gives_back_to_the_lot_what_the_clawback_took(sessions: Sessions, wallet: uuid.UUID) -> None:
    lot_id = await purchase_lot(sessions, wallet, 10)
    await consume(sessions, wallet, 4)
    taken = await claw(sessions, lot_id, 10)
    assert taken.entry is not None and taken.entry.amount == -6 and taken.shortfall == 4
    given = await reinstate(sessions, lot_id)
    assert given.entry is not None
    assert (given.entry.kind, given.entry.amount, given.wallet.balance) == (EntryKind.ADJUSTMENT, 6, 6)
    assert given.wallet.lifetime_consumed == 4 and given.wallet.lifetime_purchased == 10
    assert await remaining(sessions, lot_id) == 6
    # The same key replays; another key finds nothing left to give back.
    again = await reinstate(sessions, lot_id)
    assert again.replayed and again.wallet.balance == 6
    other = await reinstate(sessions, lot_id, "another-key")
    assert other.entry is None and other.wallet.balance == 6
    await assert_sound(sessions)


async def test_only_that_clawback(sessions: Sessions, wallet: uuid.UUID) -> None:
    lot_id = await purchase_lot(sessions, wallet, 10)
    await claw(sessions, lot_id, 3, key="refund")
    await claw(sessions, lot_id, 7, key="dispute")
    given = await reinstate(sessions, lot_id)
    assert given.entry is not None and given.entry.amount == 7 and given.wallet.balance == 7
    nothing = await reinstate(sessions, lot_id, "x", clawback_key="never-used")
    assert nothing.entry is None and nothing.wallet.balance == 7
    await assert_sound(sessions)


async def test_a_lot_expired_meanwhile_keeps_its_expiry(sessions: Sessions, wallet: uuid.UUID) -> None:
    lot_id = await purchase_lot(sessions, wallet, 10, expires_at=T0 + timedelta(hours=1))
    await claw(sessions, lot_id, 6)
    later = T0 + timedelta(hours=2)
    given = await reinstate(sessions, lot_id, now=later)
    assert given.entry is not None and given.entry.amount == 6
    assert (given.wallet.balance, given.wallet.lifetime_expired) == (0, 10)
    async with sessions() as s:
        kinds = list(
            await s.scalars(
                text("SELECT kind FROM ledger_entries WHERE wallet_id = :w ORDER BY seq"), {"w": wallet}
            )
        )
    assert kinds == ["purchase", "clawback", "expiration", "adjustment", "expiration"]
    await assert_sound(sessions)


async def test_unknown_lot(sessions: Sessions, wallet: uuid.UUID) -> None:
    with pytest.raises(NotFound, match="credit lot not found"):
        await reinstate(sessions, uuid.uuid4())
