"""Fixtures for background work: the app's runtime on a clock the test moves, PgQueuer run in
this process until the queue is empty, a real SMTP server on loopback, and worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from fastapi import FastAPI
from pgqueuer.types import QueueExecutionMode

from orgwallet.clock import ManualClock
from orgwallet.config import Settings
from orgwallet.jobs import worker
from orgwallet.runtime import Runtime
from tests.helpers import eventually as eventually  # for the tests of this package

START = datetime(2027, 3, 1, 9, 30, tzinfo=UTC)
_SHORT = timedelta(seconds=0.2)


@pytest.fixture
def runtime(app: FastAPI) -> Runtime:
    """The app's runtime, its clock a ``ManualClock`` at START."""
    runtime: Runtime = app.state.runtime
    runtime.clock = ManualClock(START)
    return runtime


def clock_of(runtime: Runtime) -> ManualClock:
    assert isinstance(runtime.clock, ManualClock)
    return runtime.clock


async def drain(runtime: Runtime) -> None:
    """Runs every queued job (and those they enqueue) with PgQueuer in this process, until the
    queue is empty: the engine's own dequeue, retries and completion."""
    connection = await asyncpg.connect(runtime.driver.dsn)
    try:
        pgq = worker.build(runtime, connection)
        await asyncio.wait_for(
            pgq.qm.run(mode=QueueExecutionMode.drain, dequeue_timeout=_SHORT, batch_size=10),
            timeout=60,
        )
    finally:
        await connection.close()


async def rows(runtime: Runtime, query: str, *args: Any) -> list[Any]:
    async with runtime.driver.acquire() as connection:
        return list(await connection.fetch(query, *args))


# ---------------------------------------------------------------- a real SMTP server


@dataclass
class Mailbox:
    """What a real SMTP server on loopback received."""

    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SmtpServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.mailbox = Mailbox()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def smtp_settings(settings: Settings, smtp: SmtpServer) -> Settings:
    return settings.model_copy(update={"smtp_url": smtp.url})


@pytest.fixture
async def mail_app(smtp_settings: Settings) -> AsyncIterator[FastAPI]:
    from orgwallet.app import create_app

    application = create_app(smtp_settings)
    yield application
    await application.state.runtime.close()


# ---------------------------------------------------------------- worker processes


class Workers:
    """``orgwallet worker`` processes against the test's database, on a clock file."""

    def __init__(self, settings: Settings, clock_file: Path, extra: dict[str, str]) -> None:
        self.settings = settings
        self.clock_file = clock_file
        self.extra = extra
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int = 1, **env: str) -> list[subprocess.Popen[bytes]]:
        assert self.settings.database_url
        environment = {
            **os.environ,
            "ORGWALLET_DATABASE_URL": self.settings.database_url,
            "ORGWALLET_HOME": str(self.settings.home),
            "ORGWALLET_JWT_SECRET": "test-secret-" + "x" * 40,
            "ORGWALLET_CLOCK_FILE": str(self.clock_file),
            "ORGWALLET_DUTY_TICK_CRON": "* * * * * *",
            "ORGWALLET_WORKER_HEARTBEAT_SECONDS": "1",
            "ORGWALLET_DATABASE_POOL_SIZE": "4",
            **self.extra,
            **env,
        }
        started = [
            subprocess.Popen(
                [sys.executable, "-m", "orgwallet", "worker"],
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(count)
        ]
        self.processes += started
        return started

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(settings, tmp_path / "clock", {})
    yield group
    group.stop_all()


from tests.purchasing import shop  # noqa: E402, F401 (the fixture, for the top-up tests)
