"""The hot paths (API keys, balance and history reads, group-committed consumptions) run on
asyncpg's own pool: what they answer must be what the ORM paths answer, and every request must
give its connection back, whatever its outcome."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from tests.helpers import GraphQLClient, create_api_key, create_org

CONSUME = """
mutation($org: ID!, $key: String!, $metadata: JSON) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key, metadata: $metadata}) {
    __typename ... on TokensConsumed { entry { metadata idempotencyKey } }
  }
}"""
HISTORY = """query($org: ID!, $after: String) { organization(id: $org) { wallet { balance
  ledger(first: 10, after: $after) { edges { node { kind metadata idempotencyKey } } } } } }"""
ORG = "query($org: ID!) { organization(id: $org) { id name slug createdAt wallet { balance } } }"


@pytest.fixture
async def org(client: GraphQLClient) -> str:
    return await create_org(client, "alice", name="Hot Paths", slug="hot-paths")


@pytest.fixture
async def key(client: GraphQLClient, org: str) -> str:
    _, secret = await create_api_key(client, org, scopes=["tokens.view", "tokens.consume"], as_="alice")
    return secret


async def test_metadata_reads_back_as_json_on_every_path(client: GraphQLClient, org: str, key: str) -> None:
    by_key = {"job": "render", "pages": 3, "tags": ["a", "b"], "nested": {"ok": True}}
    by_user = {"job": "export"}
    answered = await client.data(CONSUME, {"org": org, "key": "k1", "metadata": by_key}, bearer=key)
    assert answered["consumeTokens"]["entry"] == {"metadata": by_key, "idempotencyKey": "k1"}
    answered = await client.data(CONSUME, {"org": org, "key": "u1", "metadata": by_user}, as_="alice")
    assert answered["consumeTokens"]["entry"] == {"metadata": by_user, "idempotencyKey": "u1"}
    replayed = await client.data(CONSUME, {"org": org, "key": "k1", "metadata": by_key}, bearer=key)
    assert replayed["consumeTokens"]["entry"]["metadata"] == by_key
    for caller in ({"bearer": key}, {"as_": "alice"}):
        wallet = (await client.data(HISTORY, {"org": org}, **caller))["organization"]["wallet"]
        nodes = [e["node"] for e in wallet["ledger"]["edges"]]
        assert nodes[:2] == [
            {"kind": "CONSUMPTION", "metadata": by_user, "idempotencyKey": "u1"},
            {"kind": "CONSUMPTION", "metadata": by_key, "idempotencyKey": "k1"},
        ]


async def test_an_api_key_reads_its_organization_as_a_member_does(
    client: GraphQLClient, org: str, key: str
) -> None:
    by_key = await client.data(ORG, {"org": org}, bearer=key)
    by_owner = await client.data(ORG, {"org": org}, as_="alice")
    assert by_key == by_owner
    assert by_key["organization"]["name"] == "Hot Paths"
    other = await create_org(client, "bob", name="Other")
    assert (await client.data(ORG, {"org": other}, bearer=key)) == {"organization": None}


async def test_every_request_gives_its_connection_back(
    client: GraphQLClient, app: FastAPI, org: str, key: str
) -> None:
    size = app.state.runtime.settings.database_pool_size
    other = await create_org(client, "bob", name="Other")
    grant = """mutation($org: ID!) {
                 grantTokens(input: {organizationId: $org, amount: 1000, reason: "load"}) { __typename } }"""
    await client.data(grant, {"org": org}, as_="root-admin")
    calls = []
    for i in range(size * 3):  # more than the pool holds: a connection kept would stall a call
        calls += [
            client.raw(CONSUME, {"org": org, "key": f"c{i}"}, bearer=key),
            client.raw(HISTORY, {"org": org}, bearer=key),
            client.raw(HISTORY, {"org": org, "after": "not a cursor"}, bearer=key),  # an error
            client.raw(ORG, {"org": other}, bearer=key),  # not visible
            client.raw(CONSUME, {"org": other, "key": f"x{i}"}, bearer=key),  # not found
        ]
    bodies = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
    assert sum(b["data"]["consumeTokens"]["__typename"] == "TokensConsumed" for b in bodies[::5]) == size * 3
    assert all(b["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" for b in bodies[2::5])
    assert all(b["data"]["consumeTokens"]["__typename"] == "NotFound" for b in bodies[4::5])
    pool = await app.state.runtime.driver._get()
    assert pool.get_size() <= size
    assert pool.get_idle_size() == pool.get_size()
    wallet = (await client.data(HISTORY, {"org": org}, bearer=key))["organization"]["wallet"]
    assert wallet["balance"] == app.state.runtime.settings.trial_tokens + 1000 - size * 3


async def test_a_key_reading_its_balance_sees_expired_tokens_gone(
    client: GraphQLClient, app: FastAPI, org: str, key: str
) -> None:
    """The organization and its wallet are read in one statement for a key; a lot past due is
    still settled before the balance is shown."""
    before = await client.data(ORG, {"org": org}, bearer=key)
    assert before["organization"]["wallet"]["balance"] == app.state.runtime.settings.trial_tokens
    async with app.state.runtime.engine.begin() as connection:
        await connection.execute(
            text("UPDATE credit_lots SET expires_at = now() - interval '1 second' WHERE remaining > 0")
        )
    after = await client.data(ORG, {"org": org}, bearer=key)
    assert after["organization"]["wallet"]["balance"] == 0
    expired = """query($org: ID!) { organization(id: $org) { wallet { ledger(first: 1) { edges { node {
                   kind amount } } } } } }"""
    page = await client.data(expired, {"org": org}, bearer=key)
    newest = page["organization"]["wallet"]["ledger"]["edges"][0]["node"]
    assert newest == {"kind": "EXPIRATION", "amount": -app.state.runtime.settings.trial_tokens}
