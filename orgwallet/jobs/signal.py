"""The listeners of the wallet-change signal (the ``wallet.signal`` job): balance alerts and
automatic top-ups.

The ledger's trigger enqueues the job when a change leaves the wallet's watch band (and clears
the band, so a burst of changes makes one job). Here, with the wallet locked, every listener
acts on the balance and says which balances it wants to hear about next; the joined band is
set before the lock is let go, so no change can fall between the read and the new band.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from orgwallet import ledger
from orgwallet.db.engine import transaction
from orgwallet.services import alerts, autotopup

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime


async def on_wallet_signal(runtime: Runtime, payload: dict[str, Any]) -> str:
    wallet_id = uuid.UUID(payload["wallet_id"])
    async with transaction(runtime.sessions) as session:
        locked = await ledger.lock_wallet(session, wallet_id)
        if locked is None:
            return "no_wallet"
        wallet, seq = locked
        now = runtime.clock.now()
        band = await alerts.evaluate(
            session, wallet, seq, low_water=payload.get("balance"), signal_seq=payload.get("seq"), now=now
        )
        band = band.join(await autotopup.evaluate(session, wallet, seq, now))
        await ledger.watch(session, wallet_id, below=band.below, at_or_above=band.at_or_above)
    return "evaluated"
