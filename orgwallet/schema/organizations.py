"""Inputs, payloads and result unions of organizations, members and API keys."""

from __future__ import annotations

from typing import Annotated

import strawberry
from strawberry import relay

from orgwallet.schema.errors import Conflict, InvalidInput, NotFound
from orgwallet.schema.types import Organization, Role


@strawberry.input
class CreateOrganizationInput:
    name: str
    slug: str | None = None


@strawberry.input
class AddMemberInput:
    organization_id: strawberry.ID
    subject: str
    email: str | None = None
    role: Role


@strawberry.input
class SetMemberRoleInput:
    organization_id: strawberry.ID
    subject: str
    role: Role


@strawberry.input
class RemoveMemberInput:
    organization_id: strawberry.ID
    subject: str


@strawberry.input
class CreateApiKeyInput:
    organization_id: strawberry.ID
    name: str
    scopes: list[str]


@strawberry.input
class RevokeApiKeyInput:
    api_key_id: strawberry.ID


@strawberry.type
class OrganizationCreated:
    organization: Organization


@strawberry.type
class MembershipChanged:
    organization: Organization


@strawberry.type
class ApiKeyCreated:
    api_key_id: relay.GlobalID
    secret: str = strawberry.field(description="Shown once; only its hash is kept.")


@strawberry.type
class ApiKeyRevoked:
    api_key_id: relay.GlobalID


CreateOrganizationResult = Annotated[
    OrganizationCreated | InvalidInput | Conflict, strawberry.union("CreateOrganizationResult")
]
MembershipResult = Annotated[
    MembershipChanged | InvalidInput | NotFound | Conflict, strawberry.union("MembershipResult")
]
CreateApiKeyResult = Annotated[
    ApiKeyCreated | InvalidInput | NotFound, strawberry.union("CreateApiKeyResult")
]
RevokeApiKeyResult = Annotated[
    ApiKeyRevoked | InvalidInput | NotFound, strawberry.union("RevokeApiKeyResult")
]
