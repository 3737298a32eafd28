"""The job platform with real worker processes (``orgwallet worker``) on one database: jobs
enqueued in the transaction that causes them, one in flight per key, periodic duties once per
period whatever the number of workers, a missed period caught up once, a killed worker's job
run by another."""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pgqueuer import Queries
from pgqueuer.db import AsyncpgDriver
from pgqueuer.qm import QueueManager

from orgwallet import jobs, ledger
from orgwallet.clock import FileClock
from orgwallet.db.engine import transaction, transaction_connection
from orgwallet.jobs import duties
from orgwallet.runtime import Runtime
from tests.helpers import GraphQLClient
from tests.jobs.conftest import SmtpServer, Workers, clock_of, drain, eventually, rows
from tests.jobs.test_alerts import Shop


async def job_count(runtime: Runtime, entrypoint: str) -> int:
    return int((await rows(runtime, "SELECT count(*) FROM pgqueuer WHERE entrypoint = $1", entrypoint))[0][0])


class TestEnqueue:
    async def test_pgqueuer_finds_its_tables_in_our_migrations(self, runtime: Runtime) -> None:
        connection = await asyncpg.connect(runtime.driver.dsn)
        try:
            await QueueManager(Queries(AsyncpgDriver(connection))).verify_structure()
        finally:
            await connection.close()

    async def test_a_job_is_rolled_back_with_its_transaction(self, runtime: Runtime) -> None:
        with pytest.raises(RuntimeError):
            async with transaction(runtime.sessions) as session:
                connection = await transaction_connection(session)
                assert await jobs.enqueue(connection, "duties.tick", {}) is not None
                raise RuntimeError("the cause failed")
        assert await job_count(runtime, "duties.tick") == 0
        async with transaction(runtime.sessions) as session:
            await jobs.enqueue(await transaction_connection(session), "duties.tick", {})
        assert await job_count(runtime, "duties.tick") == 1

    async def test_one_job_in_flight_per_key(self, runtime: Runtime) -> None:
        async with runtime.driver.acquire() as connection:
            first = await jobs.enqueue(connection, "duties.tick", {}, dedupe_key="tick")
            again = await jobs.enqueue(connection, "duties.tick", {}, dedupe_key="tick")
        assert first is not None and again is None
        await drain(runtime)
        async with runtime.driver.acquire() as connection:  # done: the key is free again
            assert await jobs.enqueue(connection, "duties.tick", {}, dedupe_key="tick") is not None


class TestDutiesInProcess:
    async def test_ticks_of_one_period_start_each_duty_once(self, runtime: Runtime) -> None:
        started = await asyncio.gather(*(duties.tick(runtime) for _ in range(10)))
        assert sorted(name for names in started for name in names) == sorted(duties.DUTIES)
        await drain(runtime)
        done = await rows(runtime, "SELECT duty, finished_at IS NOT NULL FROM duty_runs ORDER BY duty")
        assert done == [(name, True) for name in sorted(duties.DUTIES)]

    async def test_missed_periods_are_caught_up_by_one_run(self, runtime: Runtime) -> None:
        await duties.tick(runtime)
        clock_of(runtime).advance(timedelta(days=3))  # 864 sweep periods pass without a worker
        for _ in range(5):
            await duties.tick(runtime)
        counts = dict(await rows(runtime, "SELECT duty, count(*) FROM duty_runs GROUP BY duty"))
        assert counts == {name: 2 for name in duties.DUTIES}


async def _lot_expiring(runtime: Runtime, expires_at: datetime) -> uuid.UUID:
    async with transaction(runtime.sessions) as session:
        wallet_id = await session.scalar(ledger_text("SELECT id FROM wallets LIMIT 1"))
        assert wallet_id is not None
        await ledger.credit(
            session,
            wallet_id,
            amount=7,
            source=ledger.GrantSource.ADMIN,
            actor="test",
            expires_at=expires_at,
            reason="expires soon",
        )
        return uuid.UUID(str(wallet_id))


def ledger_text(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


async def _finished(runtime: Runtime, duty: str, period: datetime) -> bool:
    found = await rows(
        runtime,
        "SELECT 1 FROM duty_runs WHERE duty = $1 AND period_start = $2 AND finished_at IS NOT NULL",
        duty,
        period,
    )
    return bool(found)


async def test_three_workers_run_each_duty_once_per_period_and_catch_up_once(
    client: GraphQLClient, runtime: Runtime, workers: Workers
) -> None:
    await Shop.open(client, runtime)
    sweep = duties.DUTIES["ledger.sweep"]
    t0 = duties.period_start(datetime.now(UTC), sweep.period)
    clock = FileClock(workers.clock_file)
    clock.set(t0 + timedelta(seconds=30))
    wallet_id = await _lot_expiring(runtime, t0 + timedelta(minutes=2))

    workers.start(3)
    for name, duty in duties.DUTIES.items():
        start = duties.period_start(t0 + timedelta(seconds=30), duty.period)
        await eventually(lambda n=name, s=start: _finished(runtime, n, s), what=f"{name} at t0")

    t1 = t0 + sweep.period
    clock.set(t1 + timedelta(seconds=30))  # the lot expired in between
    await eventually(lambda: _finished(runtime, "ledger.sweep", t1), what="the sweep at t1")
    expirations = await rows(
        runtime, "SELECT amount FROM ledger_entries WHERE wallet_id = $1 AND kind = 'expiration'", wallet_id
    )
    assert expirations == [(-7,)]

    workers.stop_all()
    t2 = t1 + timedelta(hours=2)  # 24 sweep periods with no worker running
    clock.set(t2 + timedelta(seconds=30))
    workers.start(3)
    await eventually(lambda: _finished(runtime, "ledger.sweep", t2), what="the catch-up sweep")
    sweeps = await rows(runtime, "SELECT period_start FROM duty_runs WHERE duty = 'ledger.sweep' ORDER BY 1")
    assert [row[0] for row in sweeps] == [t0, t1, t2]

    async def all_finished() -> bool:
        return not await rows(runtime, "SELECT 1 FROM duty_runs WHERE finished_at IS NULL")

    await eventually(all_finished, what="every claimed period to run")
    runs = await rows(runtime, "SELECT duty, period_start, runs FROM duty_runs WHERE runs <> 1")
    assert runs == []  # every claimed period ran once, none twice
    assert not await ledger_violations(runtime)


async def ledger_violations(runtime: Runtime) -> dict[Any, Any]:
    async with runtime.sessions() as session:
        return await ledger.violations(session)


class StallingMailbox:
    """A mail server that, while stalled, holds every message without answering."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.held = 0
        self.stall = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.stall.is_set():
            self.held += 1
            while self.stall.is_set():  # noqa: ASYNC110 (a threading.Event the test's thread clears)
                await asyncio.sleep(0.05)
            return "451 4.3.0 try again later"
        self.accepted.extend(envelope.rcpt_tos)
        return "250 OK"


async def test_a_killed_workers_job_is_run_by_another(
    mail_app: FastAPI, smtp: SmtpServer, workers: Workers
) -> None:
    mailbox = StallingMailbox()
    smtp.stop()
    smtp.mailbox = mailbox  # type: ignore[assignment]
    smtp.start()
    mailbox.stall.set()
    runtime: Runtime = mail_app.state.runtime
    transport = httpx.ASGITransport(app=mail_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        shop = await Shop.open(GraphQLClient(http, runtime.settings), runtime)
        await shop.alert(10)  # a wallet.signal job: the worker notifies, then mails
    environment = {"ORGWALLET_SMTP_URL": smtp.url}
    [doomed] = workers.start(1, **environment)
    await eventually(lambda: _async(mailbox.held == 1), what="the first worker to be sending")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    mailbox.stall.clear()
    workers.start(1, **environment)
    await eventually(lambda: _email_sent(runtime), what="the mail sent by the other worker")
    assert mailbox.accepted == ["owner@example.com"]


async def _async(value: bool) -> bool:
    return value


async def _email_sent(runtime: Runtime) -> bool:
    return await rows(runtime, "SELECT status FROM emails") == [("sent",)]


class ServedApp:
    """The app on a real port (so worker processes reach its offline Stripe over HTTP), without
    its embedded worker: the worker processes do the jobs."""

    def __init__(self, settings: Any) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        from orgwallet.app import create_app

        self.settings = settings.model_copy(update={"public_url": self.base_url, "worker": "off"})
        self.app = create_app(self.settings)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ServedApp:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        async with asyncio.timeout(10):
            while not self.server.started:  # noqa: ASYNC110 (uvicorn offers only a flag)
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        async with asyncio.timeout(10):
            await self.task
        self.sock.close()
        await self.app.state.runtime.close()


async def test_three_workers_one_top_up_per_crossing_and_per_schedule_slot(
    settings: Any, workers: Workers
) -> None:
    from tests.jobs.test_auto_top_up import SET
    from tests.payments.test_purchases import save_card
    from tests.purchasing import FAST_RETRIES, new_shop

    clock = FileClock(workers.clock_file)
    clock.set(datetime.now(UTC))
    async with ServedApp(settings) as served:
        runtime: Runtime = served.app.state.runtime
        runtime.clock = clock
        assert runtime.simulator is not None
        runtime.simulator.webhooks.retry_delays = FAST_RETRIES
        transport = httpx.ASGITransport(app=served.app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
            httpx.AsyncClient(transport=transport) as browser,
        ):
            client = GraphQLClient(http, served.settings)
            shop = await new_shop(served.app, client, browser)
            await save_card(shop)
            grant = """mutation($org: ID!) {
              grantTokens(input: {organizationId: $org, amount: 117, reason: "t"}) { __typename } }"""
            await client.data(grant, {"org": shop.org}, as_="root-admin")
            policy = {
                "organizationId": shop.org,
                "enabled": True,
                "threshold": 50,
                "method": "FIXED",
                "tokens": 100,
            }
            await client.data(SET, {"input": policy}, as_=shop.owner)
            workers.start(
                3, ORGWALLET_PUBLIC_URL=served.base_url, STRIPE_WEBHOOK_SECRET=served.settings.webhook_secret
            )

            consume = """mutation($org: ID!, $key: String!) {
              consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key}) {
                __typename } }"""
            await asyncio.gather(
                *(client.data(consume, {"org": shop.org, "key": f"c{i}"}, as_=shop.owner) for i in range(100))
            )

            async def top_ups() -> list[Any]:
                return await rows(
                    runtime,
                    "SELECT status, idempotency_key FROM purchases WHERE method = 'auto_top_up' ORDER BY id",
                )

            async def all_paid(count: int) -> bool:
                found = await top_ups()
                return len(found) == count and all(status == "paid" for status, _ in found)

            await eventually(lambda: all_paid(1), within=60, what="the top-up paid")
            assert await shop.balance() == 120

            # A weekly schedule: one top-up per slot, a missed stretch caught up once.
            now = clock.now()
            schedule = {"interval": "WEEKLY", "dayOfWeek": now.isoweekday(), "hourUtc": 0}
            policy = {
                "organizationId": shop.org,
                "enabled": True,
                "method": "FIXED",
                "tokens": 10,
                "schedule": schedule,
            }
            saved = await client.data(SET, {"input": policy}, as_=shop.owner)
            next_run = datetime.fromisoformat(saved["setAutoTopUp"]["policy"]["schedule"]["nextRunAt"])
            clock.set(next_run + timedelta(minutes=1))
            await eventually(lambda: all_paid(2), within=60, what="the scheduled top-up")
            for minutes in (2, 3, 4):  # later periods of the duty: the slot is done
                clock.set(next_run + timedelta(minutes=minutes))
                await eventually(
                    lambda m=minutes: _finished(
                        runtime,
                        "auto_top_up.due",
                        duties.period_start(next_run + timedelta(minutes=m), timedelta(minutes=1)),
                    ),
                    what="the duty's next period",
                )
            clock.set(
                next_run + timedelta(weeks=3, minutes=1)
            )  # three slots with no worker... caught up once
            await eventually(lambda: all_paid(3), within=60, what="the catch-up top-up")
            clock.set(next_run + timedelta(weeks=3, minutes=2))
            await eventually(
                lambda: _finished(
                    runtime,
                    "auto_top_up.due",
                    duties.period_start(next_run + timedelta(weeks=3, minutes=2), timedelta(minutes=1)),
                ),
                what="one more period",
            )
            keys = [key for _, key in await top_ups()]
            assert len(keys) == 3 and keys[0].startswith("auto-top-up:threshold:")
            assert all(k.startswith("auto-top-up:schedule:") for k in keys[1:])
            assert not await ledger_violations(runtime)
