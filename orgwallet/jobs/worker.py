"""The job worker: PgQueuer's queue manager and scheduler over this runtime.

``orgwallet worker`` runs one per process (any number of processes against one database);
``orgwallet serve`` runs one inside the server unless ``ORGWALLET_WORKER=off``. The worker
listens on a connection of its own (PgQueuer's LISTEN/NOTIFY wake-up); handlers use the
runtime's pools. A job that raises is retried with exponential back-off, up to
``MAX_ATTEMPTS``; a job whose worker died is picked again once its heartbeat is older than
``ORGWALLET_WORKER_HEARTBEAT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.executors import DatabaseRetryEntrypointExecutor, EntrypointExecutorParameters
from pgqueuer.models import Job, Schedule

from orgwallet import metrics
from orgwallet.jobs import duties, signal
from orgwallet.services import autotopup, mail
from orgwallet.services.audit import request_id_var

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8

JobHandler = Callable[["Runtime", dict[str, Any]], Awaitable[object]]


async def _send_email(runtime: Runtime, payload: dict[str, Any]) -> str:
    return await mail.send_email(
        runtime.driver,
        runtime.mail,
        runtime.settings.mail_from,
        uuid.UUID(payload["email_id"]),
        runtime.clock.now(),
    )


async def _run_duty(runtime: Runtime, payload: dict[str, Any]) -> str:
    return await duties.run_duty(runtime, payload["duty"], datetime.fromisoformat(payload["period_start"]))


async def _tick(runtime: Runtime, payload: dict[str, Any]) -> list[str]:
    return await duties.tick(runtime)


async def _start_top_up(runtime: Runtime, payload: dict[str, Any]) -> str:
    return await autotopup.start_top_up(
        runtime, uuid.UUID(payload["organization_id"]), payload["trigger"], payload["key"]
    )


#: Every job this worker runs, by entrypoint.
HANDLERS: dict[str, JobHandler] = {
    "wallet.signal": signal.on_wallet_signal,
    "mail.send": _send_email,
    "duty.run": _run_duty,
    "duties.tick": _tick,
    "top_up.start": _start_top_up,
}


def _retrying(parameters: EntrypointExecutorParameters) -> DatabaseRetryEntrypointExecutor:
    return DatabaseRetryEntrypointExecutor(
        parameters,
        max_attempts=MAX_ATTEMPTS,
        initial_delay=timedelta(seconds=2),
        max_delay=timedelta(minutes=10),
    )


def build(runtime: Runtime, connection: asyncpg.Connection) -> PgQueuer:
    pgq = PgQueuer(AsyncpgDriver(connection))
    for name, handler in HANDLERS.items():

        async def run(job: Job, handler: JobHandler = handler, name: str = name) -> None:
            payload = orjson.loads(job.payload) if job.payload else {}
            request_id = request_id_var.set(f"job:{job.id}")  # of the audit rows it writes, its logs
            try:
                outcome = await handler(runtime, payload)
            except Exception:
                metrics.job_run(name, "failed")
                raise
            finally:
                request_id_var.reset(request_id)
            metrics.job_run(name, "ok")
            log.debug("job %s %s: %s", name, job.id, outcome)

        pgq.entrypoint(name, executor_factory=_retrying)(run)

    @pgq.schedule("duties.tick", runtime.settings.duty_tick_cron)
    async def scheduled_tick(schedule: Schedule) -> None:
        await duties.tick(runtime)

    return pgq


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Runs jobs until ``stop`` is set; catches up the periodic duties first."""
    connection = await asyncpg.connect(
        runtime.driver.dsn, server_settings={"application_name": "orgwallet-worker"}
    )
    try:
        pgq = build(runtime, connection)
        await duties.tick(runtime)
        heartbeat = runtime.settings.worker_heartbeat_seconds
        worker = asyncio.create_task(
            pgq.run(
                # Besides PgQueuer's wake-up on every enqueue, look for work (a killed
                # worker's job whose heartbeat went stale) at least this often.
                dequeue_timeout=timedelta(seconds=min(10.0, heartbeat)),
                batch_size=runtime.settings.worker_concurrency,
                max_concurrent_tasks=2 * runtime.settings.worker_concurrency,
                heartbeat_timeout=timedelta(seconds=heartbeat),
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        pgq.shutdown.set()
        stopping.cancel()
        await worker
    finally:
        await connection.close()
