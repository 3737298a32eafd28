"""Mutations of insights: CSV exports. ``createExport``'s payload is a plain type (the
contract's), so a refused call is a GraphQL error with ``extensions.code`` (``BAD_USER_INPUT``
with the ``field``, ``NOT_FOUND``, ``FORBIDDEN``), and nothing is written."""

from __future__ import annotations

import strawberry

from orgwallet.schema.audit import CreateExportInput, ExportReady
from orgwallet.schema.context import Info
from orgwallet.schema.permissions import IsAuthenticated
from orgwallet.services import exports as export_service
from orgwallet.services.validation import global_id


@strawberry.type
class InsightsMutations:
    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description=(
            "A link to a CSV file of the ledger or the purchases (tokens.view) or the audit log "
            "(owners, admins, platform staff), valid for a few minutes; a browser opens it as it is."
        ),
    )
    async def create_export(self, info: Info, input: CreateExportInput) -> ExportReady | None:
        organization_id = global_id(input.organization_id, "Organization", "organizationId")
        async with info.context.unit_of_work() as session:
            link = await export_service.create_export(
                session,
                info.context.principal,
                info.context.settings,
                organization_id,
                input.request(),
                now=info.context.runtime.clock.now(),
            )
        return ExportReady(url=link.url, expires_at=link.expires_at)
