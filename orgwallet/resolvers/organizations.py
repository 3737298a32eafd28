"""Queries and mutations of organizations, members and API keys."""

from __future__ import annotations

import inspect

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry import relay

from orgwallet.auth.principals import ApiKeyPrincipal, UserPrincipal
from orgwallet.db import models
from orgwallet.errors import NotFound, OrgWalletError
from orgwallet.resolvers.common import mutate
from orgwallet.schema.context import Info
from orgwallet.schema.organizations import (
    AddMemberInput,
    ApiKeyCreated,
    ApiKeyRevoked,
    CreateApiKeyInput,
    CreateApiKeyResult,
    CreateOrganizationInput,
    CreateOrganizationResult,
    MembershipChanged,
    MembershipResult,
    OrganizationCreated,
    RemoveMemberInput,
    RevokeApiKeyInput,
    RevokeApiKeyResult,
    SetMemberRoleInput,
)
from orgwallet.schema.permissions import IsAuthenticated, IsUser
from orgwallet.schema.types import ApiKey, Organization, Viewer
from orgwallet.services import api_keys as key_service
from orgwallet.services import organizations as org_service
from orgwallet.services.validation import global_id


async def _membership_changed(
    session: AsyncSession, info: Info, organization_id: object
) -> MembershipChanged:
    row = await session.get(models.Organization, organization_id)
    if row is None:
        raise NotFound("organization not found")
    return MembershipChanged(organization=Organization.of(row))


@strawberry.type
class OrganizationQueries:
    @strawberry.field(permission_classes=[IsAuthenticated])
    def viewer(self, info: Info) -> Viewer:
        principal = info.context.principal
        if isinstance(principal, UserPrincipal):
            return Viewer(
                subject=principal.subject,
                email=principal.email,
                is_platform_admin=principal.is_platform_admin,
            )
        assert isinstance(principal, ApiKeyPrincipal)
        return Viewer(subject=principal.subject, email=None, is_platform_admin=False)

    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="Null when it does not exist or the caller is not a member.",
    )
    async def organization(self, info: Info, id: strawberry.ID) -> Organization | None:
        try:
            organization_id = global_id(id, "Organization", "id")
        except OrgWalletError:
            return None
        principal = info.context.principal
        if isinstance(principal, ApiKeyPrincipal):  # a back end's call: the hot path, in SQL
            async with info.context.connection() as connection:
                record = await org_service.get_organization_of_key(connection, principal, organization_id)
            return Organization.of_record(record) if record else None
        async with info.context.reading() as session:
            row = await org_service.get_organization(session, principal, organization_id)
        return Organization.of(row) if row else None

    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="The object with this global id; null when it does not exist or is not visible.",
    )
    async def node(self, info: Info, id: strawberry.ID) -> relay.Node | None:
        # Written out rather than `relay.node()`: that field is bound to the first schema
        # built from it, and the app (and every test) builds its own schema.
        try:
            global_id = relay.GlobalID.from_id(id)
            node_type = global_id.resolve_type(info)
        except ValueError:  # not a global id, or one of a type this schema does not have
            return None
        node = node_type.resolve_node(global_id.node_id, info=info, required=False)
        return await node if inspect.isawaitable(node) else node


@strawberry.type
class OrganizationMutations:
    @strawberry.mutation(permission_classes=[IsUser])
    async def create_organization(
        self, info: Info, input: CreateOrganizationInput
    ) -> CreateOrganizationResult:
        async def run(session: AsyncSession) -> OrganizationCreated:
            row = await org_service.create_organization(
                session,
                info.context.principal,
                info.context.settings,
                name=input.name,
                slug=input.slug,
            )
            return OrganizationCreated(organization=Organization.of(row))

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsUser])
    async def add_member(self, info: Info, input: AddMemberInput) -> MembershipResult:
        async def run(session: AsyncSession) -> MembershipChanged:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            await org_service.add_member(
                session,
                info.context.principal,
                organization_id,
                subject=input.subject,
                email=input.email,
                role=input.role.model(),
            )
            return await _membership_changed(session, info, organization_id)

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsUser])
    async def set_member_role(self, info: Info, input: SetMemberRoleInput) -> MembershipResult:
        async def run(session: AsyncSession) -> MembershipChanged:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            await org_service.set_member_role(
                session,
                info.context.principal,
                organization_id,
                subject=input.subject,
                role=input.role.model(),
            )
            return await _membership_changed(session, info, organization_id)

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsUser])
    async def remove_member(self, info: Info, input: RemoveMemberInput) -> MembershipResult:
        async def run(session: AsyncSession) -> MembershipChanged:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            await org_service.remove_member(
                session, info.context.principal, organization_id, subject=input.subject
            )
            return await _membership_changed(session, info, organization_id)

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsUser])
    async def create_api_key(self, info: Info, input: CreateApiKeyInput) -> CreateApiKeyResult:
        async def run(session: AsyncSession) -> ApiKeyCreated:
            organization_id = global_id(input.organization_id, "Organization", "organizationId")
            key, secret = await key_service.create_api_key(
                session,
                info.context.principal,
                organization_id,
                name=input.name,
                scopes=input.scopes,
            )
            return ApiKeyCreated(api_key_id=relay.GlobalID("ApiKey", str(key.id)), secret=secret)

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsUser])
    async def revoke_api_key(self, info: Info, input: RevokeApiKeyInput) -> RevokeApiKeyResult:
        async def run(session: AsyncSession) -> ApiKeyRevoked:
            api_key_id = global_id(input.api_key_id, "ApiKey", "apiKeyId")
            key = await key_service.revoke_api_key(session, info.context.principal, api_key_id)
            return ApiKeyRevoked(api_key_id=relay.GlobalID("ApiKey", str(key.id)))

        result = await mutate(info, run)
        if isinstance(result, ApiKeyRevoked):  # committed: from now on, this process refuses the key
            info.context.runtime.principals.revoked()
        return result


__all__ = ["ApiKey", "OrganizationMutations", "OrganizationQueries"]
