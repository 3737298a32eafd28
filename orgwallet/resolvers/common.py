"""What every mutation resolver does: one transaction, typed errors as results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.schema.errors import user_error

T = TypeVar("T")


async def mutate(info: Info, operation: Callable[[AsyncSession], Awaitable[T]]) -> Any:
    """Runs ``operation`` in its own transaction. A domain error rolls everything back and
    becomes its result-union member (or a coded GraphQL error for auth failures)."""
    try:
        async with info.context.unit_of_work() as session:
            return await operation(session)
    except OrgWalletError as error:
        return user_error(error)
