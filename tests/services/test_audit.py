"""The audit log: one row per successful mutation, in its transaction; append-only at the
database."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from strawberry.relay import GlobalID

from tests.helpers import (
    ADD_MEMBER,
    CREATE_API_KEY,
    CREATE_ORG,
    REMOVE_MEMBER,
    REVOKE_API_KEY,
    SET_MEMBER_ROLE,
    GraphQLClient,
    add_member,
    create_api_key,
    create_org,
)


def node_uuid(global_id: str) -> uuid.UUID:
    return uuid.UUID(GlobalID.from_id(global_id).node_id)


async def audit_rows(app: FastAPI) -> list[dict[str, Any]]:
    async with app.state.runtime.engine.connect() as connection:
        rows = await connection.execute(text("SELECT * FROM audit_log ORDER BY at, id"))
        return [dict(row) for row in rows.mappings()]


@dataclass
class Prepared:
    org: str
    key_id: str


async def prepare(client: GraphQLClient) -> Prepared:
    org = await create_org(client, "olivia", name="Acme", slug="acme")
    await add_member(client, org, subject="mia", role="MEMBER", as_="olivia")
    key_id, _ = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia", name="old key")
    return Prepared(org, key_id)


@dataclass(frozen=True)
class Case:
    document: str
    variables: Callable[[Prepared], dict[str, Any]]
    field: str
    #: the audit row expected, from the prepared objects and the mutation's result
    expected: Callable[[Prepared, dict[str, Any]], dict[str, Any]]


CASES = {
    "createOrganization": Case(
        CREATE_ORG,
        lambda p: {"name": "Beta", "slug": "beta"},
        "createOrganization",
        lambda p, r: {
            "action": "organization.create",
            "organization_id": node_uuid(r["organization"]["id"]),
            "target_type": "organization",
            "target_id": str(node_uuid(r["organization"]["id"])),
            "before": None,
            "after": {"name": "Beta", "slug": "beta", "owner": "olivia"},
        },
    ),
    "addMember": Case(
        ADD_MEMBER,
        lambda p: {"org": p.org, "subject": "bill", "email": "bill@example.com", "role": "BILLING"},
        "addMember",
        lambda p, r: {
            "action": "member.add",
            "organization_id": node_uuid(p.org),
            "target_type": "member",
            "target_id": "bill",
            "before": None,
            "after": {"subject": "bill", "email": "bill@example.com", "role": "billing"},
        },
    ),
    "setMemberRole": Case(
        SET_MEMBER_ROLE,
        lambda p: {"org": p.org, "subject": "mia", "role": "ADMIN"},
        "setMemberRole",
        lambda p, r: {
            "action": "member.set_role",
            "organization_id": node_uuid(p.org),
            "target_type": "member",
            "target_id": "mia",
            "before": {"role": "member"},
            "after": {"role": "admin"},
        },
    ),
    "removeMember": Case(
        REMOVE_MEMBER,
        lambda p: {"org": p.org, "subject": "mia"},
        "removeMember",
        lambda p, r: {
            "action": "member.remove",
            "organization_id": node_uuid(p.org),
            "target_type": "member",
            "target_id": "mia",
            "before": {"role": "member"},
            "after": None,
        },
    ),
    "createApiKey": Case(
        CREATE_API_KEY,
        lambda p: {"org": p.org, "name": "new key", "scopes": ["tokens.consume"]},
        "createApiKey",
        lambda p, r: {
            "action": "api_key.create",
            "organization_id": node_uuid(p.org),
            "target_type": "api_key",
            "target_id": str(node_uuid(r["apiKeyId"])),
            "before": None,
            "after": {"name": "new key", "prefix": r["secret"].split("_")[1], "scopes": ["tokens.consume"]},
        },
    ),
    "revokeApiKey": Case(
        REVOKE_API_KEY,
        lambda p: {"key": p.key_id},
        "revokeApiKey",
        lambda p, r: {
            "action": "api_key.revoke",
            "organization_id": node_uuid(p.org),
            "target_type": "api_key",
            "target_id": str(node_uuid(p.key_id)),
            "before": {"revoked": False},
            "after": {"revoked": True},
        },
    ),
}


class TestEveryMutationIsAudited:
    @pytest.mark.parametrize("name", list(CASES))
    @pytest.mark.parametrize("caller", ["olivia", "root-admin"])
    async def test_exactly_one_row_with_actor_target_change_and_request_id(
        self, client: GraphQLClient, app: FastAPI, name: str, caller: str
    ) -> None:
        case = CASES[name]
        prepared = await prepare(client)
        before = await audit_rows(app)
        request_id = f"req-{name}-{caller}"

        body = await client.raw(
            case.document, case.variables(prepared), as_=caller, headers={"X-Request-ID": request_id}
        )

        assert not body.get("errors"), body
        result = body["data"][case.field]
        assert "code" not in result, result
        after = await audit_rows(app)
        assert after[: len(before)] == before
        [row] = after[len(before) :]
        expected = case.expected(prepared, result)
        if name == "createOrganization":
            expected["after"]["owner"] = caller
        assert {k: row[k] for k in expected} == expected
        assert row["actor"] == caller
        assert row["request_id"] == request_id
        assert row["at"] is not None

    async def test_without_a_request_id_one_is_made_and_returned(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        response = await client.http.post(
            "/graphql",
            json={"query": CREATE_ORG, "variables": {"name": "Acme"}},
            headers={"Authorization": f"Bearer {client.token('olivia')}"},
        )
        assert response.status_code == 200
        given = response.headers["x-request-id"]
        assert given
        [row] = await audit_rows(app)
        assert row["request_id"] == given


class TestAppendOnly:
    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE audit_log SET actor = 'mallory'",
            "UPDATE audit_log SET after = NULL WHERE action = 'organization.create'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ],
    )
    async def test_the_database_rejects_changes(
        self, client: GraphQLClient, app: FastAPI, statement: str
    ) -> None:
        await prepare(client)
        before = await audit_rows(app)
        assert before

        with pytest.raises(DBAPIError, match="append-only"):
            async with app.state.runtime.engine.begin() as connection:
                await connection.execute(text(statement))

        assert await audit_rows(app) == before

    async def test_a_failed_mutation_leaves_no_row(self, client: GraphQLClient, app: FastAPI) -> None:
        await create_org(client, "olivia", slug="acme")
        before = await audit_rows(app)
        calls: list[Callable[[], Awaitable[dict[str, Any]]]] = [
            lambda: client.raw(CREATE_ORG, {"name": "Again", "slug": "acme"}, as_="otto"),
            lambda: client.raw(CREATE_ORG, {"name": " ", "slug": None}, as_="otto"),
        ]
        for call in calls:
            body = await call()
            assert "code" in body["data"]["createOrganization"]
        assert await audit_rows(app) == before
