"""Migration 0015 goes down to 0014 and up again on a database that has none of its rows: the
tables, the sequence and the notification kinds go, 0014's ``ledger_grant_subscription`` is back,
and the way up restores them."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command

from orgwallet.db.migrate import alembic_config, upgrade


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _state(url: str) -> tuple[bool, bool, bool]:
    connection = await asyncpg.connect(_plain(url))
    try:
        tables = await connection.fetchval("SELECT to_regclass('subscriptions') IS NOT NULL")
        capper = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'ledger_cap_carried')"
        )
        grant = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'ledger_grant_subscription')"
        )
        return tables, capper, grant
    finally:
        await connection.close()


def test_down_to_0014_and_up_again(database_url: str) -> None:
    assert asyncio.run(_state(database_url)) == (True, True, True)
    command.downgrade(alembic_config(database_url), "0014")
    assert asyncio.run(_state(database_url)) == (False, False, True)
    upgrade(database_url)
    assert asyncio.run(_state(database_url)) == (True, True, True)
