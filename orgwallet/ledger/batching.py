"""Group commit of consumptions: concurrent consumptions of one wallet share one transaction.

One transaction per consumption is capped, on a hot wallet, by the time the wallet row stays
locked: the function's work plus the commit's WAL flush. Here, consumptions of the same
wallet that arrive while one of its transactions is in flight wait for it to end and then go
together, in one ``ledger_consume_batch`` call (migration 0004): one round trip, one lock, one
commit for the lot. A consumption arriving at an idle wallet goes at once, alone: batching
adds no wait, it only gathers what would have queued on the row lock anyway.

Each consumption is still answered, keyed and recorded on its own: the batch function runs
``ledger_consume`` for each, in arrival order, so outcomes are exactly those of the same calls
made one after the other (a key seen twice replays or conflicts, an insufficient balance is
that request's answer and the next ones go on). If the batch statement fails as a whole (an
error, not an outcome), its transaction has written nothing, and each of its consumptions is
retried alone, so one bad request cannot fail the others.

A batch commits on its own connection, outside any session: the caller must not need the
consumption to be part of a larger transaction. Which path a consumption takes is the
caller's choice, in plain sight (``services.wallets.consume_tokens_batched``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orgwallet import metrics
from orgwallet.db.engine import DriverPool
from orgwallet.ledger import Posting, _json, _posting

#: At most this many consumptions in one transaction (bounds the time the wallet is locked).
MAX_BATCH = 128

# The wallet is named by its id, or by its organization's, found in the same statement (no
# lookup round trip; an organization without a wallet gives ledger_consume NULL: not_found).
CONSUME_ONE = {
    "wallet": "SELECT * FROM ledger_consume($1, $2, $3, $4, $5, $6, now())",
    "organization": """
        SELECT * FROM ledger_consume((SELECT w.id FROM wallets w WHERE w.organization_id = $1),
                                     $2, $3, $4, $5, $6, now())""",
}
CONSUME_BATCH = {
    "wallet": """
        SELECT b.ord, (b.result).* FROM ledger_consume_batch($1, $2, $3, $4, $5, $6, now()) AS b
        ORDER BY b.ord""",
    "organization": """
        SELECT b.ord, (b.result).*
        FROM ledger_consume_batch((SELECT w.id FROM wallets w WHERE w.organization_id = $1),
                                  $2, $3, $4, $5, $6, now()) AS b
        ORDER BY b.ord""",
}

#: Where consumptions go: ("wallet", wallet id) or ("organization", organization id).
Target = tuple[str, uuid.UUID]


class _Row:
    """An asyncpg record read by attribute, as ``ledger._posting`` reads SQLAlchemy rows."""

    __slots__ = ("_record",)

    def __init__(self, record: Any) -> None:
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return self._record[name]


@dataclass(slots=True)
class _Consumption:
    amount: int
    key: str
    actor: str
    reason: str | None
    metadata: str | None  # JSON text
    future: asyncio.Future[Posting]


@dataclass
class BatchStats:
    """What the batcher did, for tests and the benchmark."""

    batches: int = 0
    consumptions: int = 0
    largest: int = 0
    fallbacks: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class ConsumptionBatcher:
    """One per process (``Runtime.batcher``), used from its event loop."""

    def __init__(self, driver: DriverPool, *, max_batch: int = MAX_BATCH) -> None:
        self._driver = driver
        self._max_batch = max_batch
        self._queued: dict[Target, list[_Consumption]] = {}
        self._busy: set[Target] = set()  # wallets with a transaction in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    async def consume(
        self,
        wallet_id: uuid.UUID,
        *,
        amount: int,
        key: str,
        actor: str,
        reason: str | None = None,
        metadata: Any = None,
    ) -> Posting:
        """``ledger.consume`` in a transaction of its own, shared with the consumptions of the
        same wallet that queue behind it. Same answers and errors as ``ledger.consume``."""
        consumption = _Consumption(amount, key, actor, reason, _json(metadata), _future())
        return await self._enqueue(("wallet", wallet_id), consumption)

    async def consume_for_organization(
        self,
        organization_id: uuid.UUID,
        *,
        amount: int,
        key: str,
        actor: str,
        reason: str | None = None,
        metadata: Any = None,
    ) -> Posting:
        """``consume`` from the organization's wallet, found in the same statement;
        ``NotFound`` when the organization has none."""
        consumption = _Consumption(amount, key, actor, reason, _json(metadata), _future())
        return await self._enqueue(("organization", organization_id), consumption)

    async def _enqueue(self, target: Target, consumption: _Consumption) -> Posting:
        self._queued.setdefault(target, []).append(consumption)
        if target not in self._busy:
            self._busy.add(target)
            # A task of its own: the batch must finish for the others even if this caller goes.
            task = asyncio.get_running_loop().create_task(self._drain(target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await consumption.future

    async def _drain(self, target: Target) -> None:
        """Runs the wallet's queue, one transaction per batch, until it is empty."""
        try:
            while queue := self._queued.pop(target, None):
                batch, rest = queue[: self._max_batch], queue[self._max_batch :]
                if rest:
                    self._queued[target] = rest
                await self._run(target, batch)
        finally:
            self._busy.discard(target)
            for item in self._queued.pop(target, []):  # only when cancelled (shutdown)
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the consumption was not run: shutting down"))

    async def _run(self, target: Target, batch: list[_Consumption]) -> None:
        """One transaction for ``batch``; every consumption in it is answered when it returns."""
        self.stats.batches += 1
        self.stats.consumptions += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
        metrics.BATCH_SIZES.observe(len(batch))
        try:
            try:
                rows = await self._execute(target, batch)
            except Exception as error:
                if len(batch) == 1:
                    metrics.consumption("batched", "error")
                    _settle(batch[0], error=error)
                    return
                # The batch's transaction rolled back whole: nothing of it was written. Alone,
                # each consumption gets its own answer, and a bad one fails only itself.
                self.stats.fallbacks += 1
                for item in batch:
                    await self._run(target, [item])
                return
            for item, row in zip(batch, rows, strict=True):
                metrics.consumption("batched", row["outcome"])
                try:
                    _settle(item, posting=_posting(_Row(row), requested=item.amount, key=item.key))
                except Exception as error:  # a domain outcome (insufficient...): this request's answer
                    _settle(item, error=error)
        except BaseException as error:  # cancelled (shutdown) or a bug: nobody is left waiting
            for item in batch:
                _settle(item, error=error if isinstance(error, Exception) else RuntimeError("cancelled"))
            raise

    async def _execute(self, target: Target, batch: list[_Consumption]) -> list[Any]:
        """One statement in autocommit: its own transaction, one round trip."""
        by, target_id = target
        async with self._driver.acquire() as driver:
            if len(batch) == 1:
                return [await driver.fetchrow(CONSUME_ONE[by], target_id, *_arguments(batch[0]))]
            return list(await driver.fetch(CONSUME_BATCH[by], target_id, *_columns(batch)))


def _future() -> asyncio.Future[Posting]:
    return asyncio.get_running_loop().create_future()


def _arguments(item: _Consumption) -> tuple[Any, ...]:
    return (item.amount, item.key, item.reason, item.metadata, item.actor)


def _columns(batch: Sequence[_Consumption]) -> tuple[list[Any], ...]:
    return (
        [c.amount for c in batch],
        [c.key for c in batch],
        [c.reason for c in batch],
        [c.metadata for c in batch],
        [c.actor for c in batch],
    )


def _settle(
    item: _Consumption, *, posting: Posting | None = None, error: BaseException | None = None
) -> None:
    if item.future.done():  # its caller has gone (cancelled); the consumption stands
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(posting)  # type: ignore[arg-type]
