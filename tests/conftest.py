"""Test fixtures: one real PostgreSQL per run (pgserver), a migrated template database,
and a fresh clone of it for every test."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from orgwallet.app import create_app
from orgwallet.config import Settings
from orgwallet.db.engine import asyncpg_url, pgserver_module
from orgwallet.db.migrate import upgrade
from tests.helpers import GraphQLClient

TEMPLATE = "orgwallet_template"
_counter = itertools.count()


class Postgres:
    def __init__(self, server: Any) -> None:
        self.server = server

    def sql(self, statement: str) -> str:
        return str(self.server.psql(statement))

    def url(self, database: str) -> str:
        return asyncpg_url(self.server.get_uri(), database)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pgserver = pgserver_module()
    root = Path(tempfile.mkdtemp(prefix="orgwallet-test-pg-"))
    server = pgserver.get_server(root, cleanup_mode="delete")
    pg = Postgres(server)
    # Durability is not under test here; speed is welcome.
    pg.sql("ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;")
    pg.sql("ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();")
    pg.sql(f"CREATE DATABASE {TEMPLATE};")
    upgrade(pg.url(TEMPLATE))
    yield pg
    # Stopped now, while its directory exists: pgserver's own exit hook, after the directory
    # is gone, could leave the server running.
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A fresh ORGWALLET_HOME for a command that starts the embedded PostgreSQL, outside pytest's
    tmp_path: run as root, pgserver runs PostgreSQL as another user, which must reach the data
    directory, and pytest makes its own temporary root private (0700) again whenever a session
    starts."""
    root = Path(tempfile.mkdtemp(prefix="orgwallet-test-home-"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(postgres: Postgres) -> Iterator[str]:
    name = f"test_{os.getpid()}_{next(_counter)}"
    postgres.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE};")
    yield postgres.url(name)
    postgres.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        home=tmp_path,
        jwt_secret="test-secret-" + "x" * 40,
        platform_admins=["root-admin"],
        database_pool_size=10,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    yield application
    await application.state.runtime.close()  # pending Stripe simulator deliveries, then the engine


@pytest.fixture
async def client(app: FastAPI, settings: Settings) -> AsyncIterator[GraphQLClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield GraphQLClient(http, settings)
