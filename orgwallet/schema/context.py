"""The per-request GraphQL context: principal, database access, settings, loaders."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from strawberry.types import Info as StrawberryInfo

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal, Principal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction
from orgwallet.services import access

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime


@dataclass
class Context:
    settings: Settings
    runtime: Runtime
    principal: Principal
    request_id: str
    auth_error: str | None = None
    # The Authorization value the principal came from: a subscription authenticates it again
    # while it lasts (a revoked key, an expired token end it).
    credential: str | None = None
    # graphql-transport-ws's connection_init payload (Strawberry sets it).
    connection_params: dict[str, Any] | None = None
    # A context that lasts as long as a connection (a WebSocket, a streamed subscription) keeps
    # no database connection between uses: each use takes one from the pool and gives it back.
    per_use: bool = False
    _read_session: AsyncSession | None = None
    _connection: Any = None  # the asyncpg connection of `connection()`
    _read_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _held: AsyncExitStack = field(default_factory=AsyncExitStack)  # what close() gives back

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return self.runtime.sessions

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """The request's read session. Sibling fields resolve concurrently, and one
        session cannot run two statements at once, so use is serialized. It reads in
        autocommit (no BEGIN and ROLLBACK round trips: at READ COMMITTED each statement takes
        its own snapshot anyway) and takes a connection only at its first statement."""
        if self.per_use:
            async with self.runtime.read_sessions() as session:
                yield session
            return
        async with self._read_lock:
            if self._read_session is None:
                self._read_session = await self._held.enter_async_context(self.runtime.read_sessions())
            yield self._read_session

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """The request's asyncpg connection (``DriverPool``), for the hot reads written in SQL:
        no transaction, each statement on its own snapshot. Serialized like ``reading``."""
        if self.per_use:
            async with self.runtime.driver.acquire() as connection:
                yield connection
            return
        async with self._read_lock:
            if self._connection is None:
                self._connection = await self._held.enter_async_context(self.runtime.driver.acquire())
            yield self._connection

    async def authorize(self, organization_id: uuid.UUID, permission: Permission) -> access.Access:
        """``access.authorize`` for the caller: an API key's scopes are checked in memory (no
        session is opened), a user's role is read in the read session."""
        if isinstance(self.principal, ApiKeyPrincipal):
            return access.check(access.key_access(self.principal, organization_id), permission)
        async with self.reading() as session:
            return await access.authorize(session, self.principal, organization_id, permission)

    def unit_of_work(self) -> Any:
        """A transaction for one mutation: committed when it ends normally."""
        return transaction(self.sessions)

    async def close(self) -> None:
        """Closes the read session and gives the connection back, whichever were used."""
        self._read_session = self._connection = None
        await self._held.aclose()


Info = StrawberryInfo[Context, None]
