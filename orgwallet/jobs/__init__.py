"""Background duties on PgQueuer: the job handlers, the periodic duties and the worker.

A job is enqueued with ``enqueue`` on the connection of the transaction that causes it (the
``job_enqueue`` SQL function, migration 0007: the same rows as PgQueuer's own enqueue), so it
commits or rolls back with its cause; the ledger's wallet-change trigger enqueues the same way.
A dedupe key keeps one job per key queued or running. Delivery is at least once: every handler
is idempotent by a database key (an e-mail row's status, an alert's firing count, a
notification's cause, a duty's period).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.db.engine import transaction_connection

ENQUEUE = "SELECT job_enqueue($1, $2, $3, $4)"


async def enqueue(
    connection: Any,
    entrypoint: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    delay: timedelta = timedelta(0),
) -> int | None:
    """Enqueues a job on ``connection`` (asyncpg; a session's is ``transaction_connection``), in
    its transaction if one is open: the job's id, or None when a job with ``dedupe_key`` is
    queued or running already."""
    job_id: int | None = await connection.fetchval(
        ENQUEUE, entrypoint, orjson.dumps(payload).decode(), dedupe_key, delay
    )
    return job_id


SIGNAL_WALLET = (
    "SELECT job_enqueue('wallet.signal', json_build_object('wallet_id', id)::text) "
    "FROM wallets WHERE organization_id = $1"
)


async def signal_wallet(session: AsyncSession, organization_id: uuid.UUID) -> None:
    """Asks, in the session's transaction, for the organization's wallet to be evaluated by the
    wallet-change signal's listeners now (a threshold set or removed, a top-up settled), as a
    change would."""
    await (await transaction_connection(session)).execute(SIGNAL_WALLET, organization_id)
