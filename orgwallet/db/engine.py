"""Engine, sessions, and the embedded PostgreSQL of the default set-up."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "orgwallet"


def create_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        connect_args={"server_settings": {"application_name": "orgwallet"}},
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


#: How many units of work (``transaction``) the running task is inside. A call to Stripe (or
#: any other remote party) checks it is zero: a remote call that hangs must not hold a pool
#: connection, a row lock or a wallet lock.
_units_of_work: ContextVar[int] = ContextVar("orgwallet_units_of_work", default=0)


class RemoteCallInTransaction(RuntimeError):
    """A remote call (Stripe, SMTP) was made inside a database transaction: a bug."""


def assert_no_transaction(what: str) -> None:
    """Raises ``RemoteCallInTransaction`` when called inside ``transaction``."""
    if _units_of_work.get():
        raise RemoteCallInTransaction(f"{what} called while a database transaction is open")


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits when the block ends normally, rolls back otherwise. A block
    that sent nothing and left nothing to flush (an API key's consumption goes through the
    group commit, on its own connection) has nothing to commit: no round trip, no greenlet.
    Inside it, ``assert_no_transaction`` raises."""
    depth = _units_of_work.set(_units_of_work.get() + 1)
    try:
        async with factory() as session:
            try:
                yield session
                if session.in_transaction() or session.new or session.dirty or session.deleted:
                    await session.commit()
            except BaseException:
                if session.in_transaction():
                    await session.rollback()
                raise
    finally:
        _units_of_work.reset(depth)


async def driver_connection(source: AsyncSession | AsyncConnection) -> Any:
    """The asyncpg connection under SQLAlchemy's, for hot statements sent as they are (no ORM,
    no statement compilation). A statement sent on it joins the transaction if SQLAlchemy has
    begun one (it begins lazily, at its first statement); otherwise it runs on its own, in
    autocommit, which is what single-statement reads and ledger calls want."""
    connection = await source.connection() if isinstance(source, AsyncSession) else source
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    return driver


async def transaction_connection(session: AsyncSession) -> Any:
    """The session's asyncpg connection, its transaction begun: what is sent on it commits or
    rolls back with the session (a job enqueued for a change, a notification of it), even when
    it is the session's first statement."""
    driver = await driver_connection(session)
    if not driver.is_in_transaction():
        await session.execute(text("SELECT 1"))  # SQLAlchemy begins at its first statement
    return driver


class DriverPool:
    """asyncpg's own pool (one per process, built by ``Runtime``), beside SQLAlchemy's, for the
    statements of the hot paths (API key lookups, the wallet and history reads, group-committed
    consumptions). A connection from SQLAlchemy's pool costs a session, a greenlet switch per
    call and pool bookkeeping: about 0.3 ms of CPU per request, more than the statement it
    sends. asyncpg prepares and caches each statement per connection, so the hot statements are
    parsed and planned once.

    Created on first use, in the running event loop; at most ``size`` connections, opened
    when needed. Nothing here sets session state (no SET, LISTEN or advisory locks), so a
    connection goes back without asyncpg's reset query (a round trip per use); a transaction
    left open is still rolled back."""

    def __init__(self, url: str, size: int) -> None:
        self.dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._lock: asyncio.Lock | None = None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """``async with pool.acquire() as connection``: an asyncpg connection."""
        async with (await self._get()).acquire() as connection:
            yield connection

    async def _get(self) -> asyncpg.Pool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=0,
                        max_size=self._size,
                        reset=_keep_session,
                        init=_codecs,
                        server_settings={"application_name": "orgwallet"},
                    )
        return self._pool

    def usage(self) -> tuple[int, int, int]:
        """(open, idle, maximum) connections, for /metrics: (0, 0, size) before the first use."""
        if self._pool is None:
            return 0, 0, self._size
        return self._pool.get_size(), self._pool.get_idle_size(), self._pool.get_max_size()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo (see DriverPool)."""


async def _codecs(connection: asyncpg.Connection) -> None:
    """JSON columns come back as Python values; JSON goes in as text or as a value."""
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def asyncpg_url(pgserver_uri: str, database: str) -> str:
    """Turns pgserver's ``postgresql://postgres:@/db?host=/sock`` into an asyncpg URL."""
    parts = urlsplit(pgserver_uri)
    return f"postgresql+asyncpg://{parts.username or 'postgres'}@/{database}?{parts.query}"


def pgserver_module() -> Any:
    """``pgserver``, imported without platformdirs' warning that XDG_RUNTIME_DIR is unset (as on
    most servers and containers): pgserver then keeps its lock file under /tmp, which is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
    return pgserver


@dataclass
class EmbeddedPostgres:
    """The PostgreSQL kept in ``home/pg``. ``started``: this process started it, and stops it
    with ``stop()``; otherwise it was running already (another ``serve``) and is left alone."""

    pgdata: Path
    server: Any
    started: bool
    pid: int | None

    def stop(self) -> None:
        if not self.started:
            return
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user)
        except subprocess.CalledProcessError:  # stopped already (Ctrl-C reaches it too)
            log.info("the embedded PostgreSQL in %s was stopped already", self.pgdata)


def _running_postmaster(pgdata: Path) -> int | None:
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    return info.pid if info is not None and info.is_running() else None


def start_embedded_postgres(home: Path, *, cleanup_mode: str | None = None) -> EmbeddedPostgres:
    """Starts (or joins) the PostgreSQL kept in ``home/pg`` and makes sure our database exists.
    Whoever started it stops it (``EmbeddedPostgres.stop``), not pgserver's exit hook, which
    a signal skips."""
    pgserver = pgserver_module()
    pgdata = (home / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    running = _running_postmaster(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")  # noqa: S608 (a constant)
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        log.info("created database %s in %s", EMBEDDED_DATABASE, pgdata)
    return EmbeddedPostgres(pgdata, server, started=running is None, pid=running or server.get_pid())


def embedded_database_url(server: Any, database: str = EMBEDDED_DATABASE) -> str:
    return asyncpg_url(server.get_uri(), database)
