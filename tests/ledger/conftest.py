"""Fixtures for driving the ledger module directly, in real transactions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.db.engine import create_engine, session_factory, transaction


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(database_url, pool_size=5)
    yield eng
    await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


async def new_wallet(sessions: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    """An organization with an empty wallet, straight in the database."""
    async with transaction(sessions) as session:
        org = (
            await session.execute(
                text("INSERT INTO organizations (name, slug) VALUES ('T', :slug) RETURNING id"),
                {"slug": f"t-{uuid.uuid4().hex[:12]}"},
            )
        ).scalar_one()
        return await ledger.open_wallet(session, org)


@pytest.fixture
async def wallet(sessions: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    return await new_wallet(sessions)
