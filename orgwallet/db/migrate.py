"""Runs the Alembic migrations programmatically (``orgwallet migrate`` and the embedded start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def execute_script(sql: str) -> None:
    """Runs a multi-statement SQL script inside the migration's transaction.

    asyncpg prepares each statement, and a prepared statement holds one command, so the
    script goes through the driver's simple-query ``execute`` instead."""
    from alembic import op
    from sqlalchemy.util import await_only

    raw = op.get_bind().connection.dbapi_connection
    assert raw is not None
    await_only(raw.driver_connection.execute(sql))
