"""The per-request GraphQL context: principal, database access, settings, loaders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from strawberry.fastapi import BaseContext
from strawberry.types import Info as StrawberryInfo

from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction

if TYPE_CHECKING:
    from orgwallet.app import Services


@dataclass
class Context(BaseContext):
    settings: Settings
    services: Services
    principal: Principal
    request_id: str
    auth_error: str | None = None
    _read_session: AsyncSession | None = None
    _read_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return self.services.sessions

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """The request's read session. Sibling fields resolve concurrently, and one
        session cannot run two statements at once, so use is serialized."""
        async with self._read_lock:
            if self._read_session is None:
                session = self.sessions()
                # No transaction around reads: at READ COMMITTED each statement takes its own
                # snapshot anyway, so BEGIN and ROLLBACK would be two round trips for nothing.
                await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                self._read_session = session
            yield self._read_session

    def unit_of_work(self) -> Any:
        """A transaction for one mutation: committed when it ends normally."""
        return transaction(self.sessions)

    async def close(self) -> None:
        if self._read_session is not None:
            await self._read_session.close()
            self._read_session = None


Info = StrawberryInfo[Context, None]
