"""API key principals are remembered per process, and forgotten when the key set changes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet.auth import api_keys as key_secrets
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal
from orgwallet.services import api_keys as key_service
from tests.helpers import REVOKE_API_KEY, GraphQLClient, create_api_key, create_org, error_code, eventually

ORG = "query($id: ID!) { organization(id: $id) { id } }"


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every database lookup of a key (what the cache saves)."""
    seen: list[str] = []
    original = key_service.authenticate

    async def counting(connection: Any, secret: str) -> ApiKeyPrincipal:
        seen.append(secret)
        return await original(connection, secret)

    monkeypatch.setattr(key_service, "authenticate", counting)
    return seen


async def revoke_in_sql(app: FastAPI, key_id: str) -> None:
    """As another process would: straight in the table."""
    async with app.state.runtime.engine.begin() as connection:
        await connection.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE id = :id"),
            {"id": uuid.UUID(GlobalID.from_id(key_id).node_id)},
        )


async def test_a_known_key_costs_no_lookup_and_revoking_it_here_counts_at_once(
    client: GraphQLClient, lookups: list[str]
) -> None:
    org = await create_org(client, "olga")
    key_id, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olga")
    for _ in range(3):
        assert error_code(await client.raw(ORG, {"id": org}, bearer=secret), "organization") is None
    assert 1 <= lookups.count(secret) <= 2  # the first, and once more if the first check came after it
    settled = lookups.count(secret)
    assert error_code(await client.raw(ORG, {"id": org}, bearer=secret), "organization") is None
    assert lookups.count(secret) == settled

    revoked = await client.data(REVOKE_API_KEY, {"key": key_id}, as_="olga")
    assert revoked["revokeApiKey"]["__typename"] == "ApiKeyRevoked"
    body = await client.raw(ORG, {"id": org}, bearer=secret)
    assert error_code(body, "organization") == "UNAUTHENTICATED"


async def test_a_revocation_by_another_process_counts_within_the_check_interval(
    client: GraphQLClient, app: FastAPI
) -> None:
    cache: key_service.PrincipalCache = app.state.runtime.principals
    now = [1000.0]
    cache._monotonic = lambda: now[0]
    org = await create_org(client, "olga")
    key_id, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olga")
    for _ in range(2):
        assert error_code(await client.raw(ORG, {"id": org}, bearer=secret), "organization") is None
    await revoke_in_sql(app, key_id)
    now[0] += key_service.REVOCATION_CHECK_SECONDS / 2
    body = await client.raw(ORG, {"id": org}, bearer=secret)  # within the interval: remembered
    assert error_code(body, "organization") is None
    now[0] += key_service.REVOCATION_CHECK_SECONDS / 2
    body = await client.raw(ORG, {"id": org}, bearer=secret)
    assert error_code(body, "organization") == "UNAUTHENTICATED"


SPEND = """
mutation($org: ID!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key}) { __typename }
}
"""


async def _waiting_on_a_lock(app: FastAPI) -> bool:
    async with app.state.runtime.engine.connect() as connection:
        waiting = await connection.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        )
    return bool(waiting)


async def test_a_key_revoked_here_is_refused_as_soon_as_the_mutation_answers(
    client: GraphQLClient, app: FastAPI
) -> None:
    """The revocation is held open (its audit row waits on a table lock) while the key is used:
    that use reads the key unrevoked and is remembered. Once the mutation has answered, the
    process refuses the key all the same, however recently it was checked."""
    org = await create_org(client, "olga")
    key_id, secret = await create_api_key(client, org, scopes=["tokens.view", "tokens.consume"], as_="olga")
    assert (
        error_code(await client.raw(SPEND, {"org": org, "key": "a"}, bearer=secret), "consumeTokens") is None
    )

    async with app.state.runtime.engine.connect() as holder:
        await holder.execute(text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"))
        revoking = asyncio.create_task(client.data(REVOKE_API_KEY, {"key": key_id}, as_="olga"))
        await eventually(lambda: _waiting_on_a_lock(app), what="the revocation to wait on the lock")
        assert not revoking.done()
        for attempt in "bc":  # not revoked yet: accepted, and remembered
            body = await client.raw(SPEND, {"org": org, "key": attempt}, bearer=secret)
            assert error_code(body, "consumeTokens") is None
        await holder.rollback()  # the revocation proceeds and commits
        revoked = await revoking
    assert revoked["revokeApiKey"]["__typename"] == "ApiKeyRevoked"

    body = await client.raw(SPEND, {"org": org, "key": "d"}, bearer=secret)
    assert error_code(body, "consumeTokens") == "UNAUTHENTICATED"
    async with app.state.runtime.engine.connect() as connection:
        spent = await connection.scalar(
            text("SELECT count(*) FROM ledger_entries WHERE kind = 'consumption'")
        )
    assert spent == 3


async def test_a_lookup_that_raced_a_revocation_is_not_kept(client: GraphQLClient, app: FastAPI) -> None:
    org = await create_org(client, "olga")
    key_id, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="olga")
    cache: key_service.PrincipalCache = app.state.runtime.principals
    principal = ApiKeyPrincipal(uuid.uuid4(), uuid.UUID(GlobalID.from_id(org).node_id), frozenset(Permission))
    await cache._recheck()  # the key set as it is now
    before = cache.version  # a lookup starts here, and reads the key before the revocation
    assert before is not None
    await revoke_in_sql(app, key_id)
    cache.remember("some hash", principal, before)
    cache._checked_at = float("-inf")  # the next use checks the key set
    await cache._recheck()
    cache.remember(key_secrets.hash_secret(secret), principal, before)  # the slow lookup ends
    assert await cache.get(key_secrets.hash_secret(secret)) is None
    assert await cache.get("some hash") is None
