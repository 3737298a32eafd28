"""Engine, sessions, and the embedded PostgreSQL of the default set-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits when the block ends normally, rolls back otherwise."""
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def driver_connection(source: AsyncSession | AsyncConnection) -> Any:
    """The asyncpg connection under SQLAlchemy's, for hot statements sent as they are (no ORM,
    no statement compilation). A statement sent on it joins the transaction if SQLAlchemy has
    begun one (it begins lazily, at its first statement); otherwise it runs on its own, in
    autocommit, which is what single-statement reads and ledger calls want."""
    connection = await source.connection() if isinstance(source, AsyncSession) else source
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    return driver


def asyncpg_url(pgserver_uri: str, database: str) -> str:
    """Turns pgserver's ``postgresql://postgres:@/db?host=/sock`` into an asyncpg URL."""
    parts = urlsplit(pgserver_uri)
    return f"postgresql+asyncpg://{parts.username or 'postgres'}@/{database}?{parts.query}"


def start_embedded_postgres(home: Path, *, cleanup_mode: str | None = "stop") -> Any:
    """Starts (or joins) the PostgreSQL kept in ``home/pg`` and makes sure our database exists."""
    import pgserver

    pgdata = (home / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)  # type: ignore[attr-defined]
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")  # noqa: S608 (a constant)
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        log.info("created database %s in %s", EMBEDDED_DATABASE, pgdata)
    return server


def embedded_database_url(server: Any, database: str = EMBEDDED_DATABASE) -> str:
    return asyncpg_url(server.get_uri(), database)
