"""Organization API keys over GraphQL: shown once, stored as a hash, usable, revocable."""

from __future__ import annotations

import uuid

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from strawberry.relay import GlobalID

from tests.helpers import (
    CREATE_API_KEY,
    REVOKE_API_KEY,
    GraphQLClient,
    create_api_key,
    create_org,
    error_code,
    row_counts,
    snapshot,
)

API_KEYS = (
    "query($id: ID!) { organization(id: $id) { apiKeys { id name prefix scopes createdBy revokedAt } } }"
)
VIEWER = "{ viewer { subject } }"


def node_uuid(global_id: str) -> uuid.UUID:
    return uuid.UUID(GlobalID.from_id(global_id).node_id)


class TestCreateApiKey:
    async def test_the_secret_is_shown_once_and_only_its_hash_is_kept(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, "olivia")
        key_id, secret = await create_api_key(
            client, org, scopes=["tokens.consume", "tokens.view"], as_="olivia", name="checkout"
        )
        assert secret.startswith("owk_") and len(secret) > 40

        [listed] = (await client.data(API_KEYS, {"id": org}, as_="olivia"))["organization"]["apiKeys"]
        assert listed == {
            "id": key_id,
            "name": "checkout",
            "prefix": secret.split("_")[1],
            "scopes": ["tokens.view", "tokens.consume"],
            "createdBy": "olivia",
            "revokedAt": None,
        }
        assert secret not in str(listed)
        asked = await client.raw(
            "query($id: ID!) { organization(id: $id) { apiKeys { secret } } }", {"id": org}, as_="olivia"
        )
        assert asked["data"] is None and "secret" in asked["errors"][0]["message"]
        async with app.state.runtime.engine.connect() as connection:
            stored = (await connection.execute(text("SELECT * FROM api_keys"))).mappings().one()
            audit = (await connection.execute(text("SELECT before, after FROM audit_log"))).all()
        assert stored["id"] == node_uuid(key_id)
        assert secret not in str(dict(stored))
        assert stored["secret_hash"] != secret
        assert secret not in str(audit)

    async def test_the_key_works_as_a_bearer(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        key_id, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia")
        data = await client.data(VIEWER, bearer=secret)
        assert data["viewer"]["subject"] == f"apikey:{node_uuid(key_id)}"

    async def test_each_key_is_different(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        first = await create_api_key(client, org, scopes=[], as_="olivia")
        second = await create_api_key(client, org, scopes=[], as_="olivia")
        assert first[0] != second[0]
        assert first[1] != second[1]
        assert first[1].split("_")[1] != second[1].split("_")[1]

    async def test_repeated_scopes_are_kept_once(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        await create_api_key(client, org, scopes=["tokens.view", "tokens.view"], as_="olivia")
        [listed] = (await client.data(API_KEYS, {"id": org}, as_="olivia"))["organization"]["apiKeys"]
        assert listed["scopes"] == ["tokens.view"]

    @pytest.mark.parametrize(
        ("name", "scopes", "field"),
        [
            ("back end", ["tokens.steal"], "scopes"),
            ("back end", ["members.manage"], "scopes"),
            ("back end", ["tokens.view", "TOKENS.VIEW"], "scopes"),
            ("back end", [""], "scopes"),
            ("", ["tokens.view"], "name"),
            ("   ", ["tokens.view"], "name"),
            ("k" * 201, ["tokens.view"], "name"),
        ],
    )
    async def test_bad_input_is_a_typed_error_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, name: str, scopes: list[str], field: str
    ) -> None:
        org = await create_org(client, "olivia")
        counts, before = await row_counts(app), await snapshot(app)
        body = await client.raw(CREATE_API_KEY, {"org": org, "name": name, "scopes": scopes}, as_="olivia")
        result = body["data"]["createApiKey"]
        assert (result["__typename"], result["code"], result["field"]) == (
            "InvalidInput",
            "INVALID_INPUT",
            field,
        )
        assert await row_counts(app) == counts
        assert await snapshot(app) == before


class TestRevokeApiKey:
    async def test_a_revoked_key_no_longer_authenticates(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        key_id, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia")
        _, other_secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia")
        assert error_code(await client.raw(VIEWER, bearer=secret), "viewer") is None

        result = (await client.data(REVOKE_API_KEY, {"key": key_id}, as_="olivia"))["revokeApiKey"]

        assert result == {"__typename": "ApiKeyRevoked", "apiKeyId": key_id}
        assert error_code(await client.raw(VIEWER, bearer=secret), "viewer") == "UNAUTHENTICATED"
        assert error_code(await client.raw(VIEWER, bearer=other_secret), "viewer") is None
        listed = (await client.data(API_KEYS, {"id": org}, as_="olivia"))["organization"]["apiKeys"]
        assert [k["revokedAt"] is not None for k in listed] == [True, False]

    async def test_revoking_twice_changes_nothing_more(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        key_id, _ = await create_api_key(client, org, scopes=[], as_="olivia")
        await client.data(REVOKE_API_KEY, {"key": key_id}, as_="olivia")
        before = await snapshot(app)
        result = (await client.data(REVOKE_API_KEY, {"key": key_id}, as_="olivia"))["revokeApiKey"]
        assert result["__typename"] == "ApiKeyRevoked"
        assert await snapshot(app) == before

    async def test_an_unknown_or_foreign_key_is_not_found(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        other = await create_org(client, "otto", name="Other")
        foreign_id, foreign_secret = await create_api_key(client, other, scopes=[], as_="otto")
        await create_api_key(client, org, scopes=[], as_="olivia")
        before = await snapshot(app)
        for key_id in (foreign_id, str(GlobalID("ApiKey", str(uuid.uuid4()))), org):
            result = (await client.data(REVOKE_API_KEY, {"key": key_id}, as_="olivia"))["revokeApiKey"]
            assert (result["__typename"], result["code"]) == ("NotFound", "NOT_FOUND"), key_id
        assert await snapshot(app) == before
        assert error_code(await client.raw(VIEWER, bearer=foreign_secret), "viewer") is None

    async def test_a_malformed_id_is_invalid_input(self, client: GraphQLClient, app: FastAPI) -> None:
        await create_org(client, "olivia")
        before = await snapshot(app)
        result = (await client.data(REVOKE_API_KEY, {"key": "nonsense"}, as_="olivia"))["revokeApiKey"]
        assert (result["__typename"], result["field"]) == ("InvalidInput", "apiKeyId")
        assert await snapshot(app) == before
