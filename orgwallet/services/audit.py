"""The audit log: one append-only row per mutation, written in the mutation's transaction."""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.auth.principals import Principal
from orgwallet.db.models import AuditEntry

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


async def record(
    session: AsyncSession,
    principal: Principal,
    *,
    action: str,
    organization_id: uuid.UUID | None,
    target_type: str,
    target_id: object | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    await record_system(
        session,
        actor=principal.actor,
        action=action,
        organization_id=organization_id,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
    )


async def record_system(
    session: AsyncSession,
    *,
    actor: str,
    action: str,
    organization_id: uuid.UUID | None,
    target_type: str,
    target_id: object | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """A row for a change no principal asked for (a job, the system): ``actor`` names it."""
    session.add(
        AuditEntry(
            actor=actor,
            action=action,
            organization_id=organization_id,
            target_type=target_type,
            target_id=None if target_id is None else str(target_id),
            before=before,
            after=after,
            request_id=request_id_var.get(),
        )
    )
