"""Wallet mutations through GraphQL: bad input is a typed error that writes nothing."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from tests.helpers import GraphQLClient, create_org

CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!, $metadata: JSON) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, metadata: $metadata}) {
    __typename
    ... on TokensConsumed { entry { id } replayed wallet { balance } }
    ... on UserError { code message }
    ... on InvalidInput { field }
    ... on InsufficientTokens { requested available }
  }
}"""
RESERVE = """
mutation($org: ID!, $amount: BigInt!, $key: String!, $ttl: Int) {
  reserveTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, ttlSeconds: $ttl}) {
    __typename ... on UserError { code } ... on InvalidInput { field }
  }
}"""


async def row_counts(app: FastAPI) -> tuple[int, ...]:
    async with app.state.runtime.sessions() as s:
        row = (
            await s.execute(
                text(
                    "SELECT (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM ledger_allocations),"
                    " (SELECT count(*) FROM reservations), (SELECT sum(balance) FROM wallets),"
                    " (SELECT count(*) FROM audit_log)"
                )
            )
        ).one()
        return tuple(row)


@pytest.fixture
async def org(client: GraphQLClient) -> str:
    return await create_org(client, "alice")


class TestConsumeInput:
    @pytest.mark.parametrize(
        ("amount", "key", "metadata", "field"),
        [
            (0, "k", None, "amount"),
            (-1, "k", None, "amount"),
            (1.5, "k", None, "amount"),
            ("1", "k", None, "amount"),
            (True, "k", None, "amount"),
            (2**53, "k", None, "amount"),
            (1, "", None, "idempotencyKey"),
            (1, "x" * 256, None, "idempotencyKey"),
            (1, "tab\there", None, "idempotencyKey"),
            (1, "k", [1, 2], "metadata"),
        ],
    )
    async def test_bad_input_is_typed_and_writes_nothing(
        self,
        client: GraphQLClient,
        app: FastAPI,
        org: str,
        amount: object,
        key: str,
        metadata: object,
        field: str,
    ) -> None:
        before = await row_counts(app)
        data = await client.data(
            CONSUME, {"org": org, "amount": amount, "key": key, "metadata": metadata}, as_="alice"
        )
        assert data["consumeTokens"]["__typename"] == "InvalidInput"
        assert data["consumeTokens"]["field"] == field
        assert await row_counts(app) == before

    async def test_largest_amount_is_accepted_and_reported_short(
        self, client: GraphQLClient, org: str
    ) -> None:
        data = await client.data(CONSUME, {"org": org, "amount": 2**53 - 1, "key": "big"}, as_="alice")
        assert data["consumeTokens"] == {
            "__typename": "InsufficientTokens",
            "code": "INSUFFICIENT_TOKENS",
            "message": f"requested {2**53 - 1} tokens, 3 available",
            "requested": 2**53 - 1,
            "available": 3,
        }

    async def test_amount_as_literal_string_is_typed_too(self, client: GraphQLClient, org: str) -> None:
        query = (
            f'mutation {{ consumeTokens(input: {{organizationId: "{org}", amount: "2", idempotencyKey: "k"}})'
        )
        query += " { __typename ... on InvalidInput { field } } }"
        data = await client.data(query, as_="alice")
        assert data["consumeTokens"] == {"__typename": "InvalidInput", "field": "amount"}

    async def test_replay_and_conflict(self, client: GraphQLClient, app: FastAPI, org: str) -> None:
        first = (await client.data(CONSUME, {"org": org, "amount": 1, "key": "once"}, as_="alice"))[
            "consumeTokens"
        ]
        again = (await client.data(CONSUME, {"org": org, "amount": 1, "key": "once"}, as_="alice"))[
            "consumeTokens"
        ]
        assert again["entry"]["id"] == first["entry"]["id"] and again["replayed"] is True
        assert again["wallet"]["balance"] == 2
        before = await row_counts(app)
        other = (await client.data(CONSUME, {"org": org, "amount": 2, "key": "once"}, as_="alice"))[
            "consumeTokens"
        ]
        assert other["code"] == "IDEMPOTENCY_CONFLICT"
        assert await row_counts(app) == before

    async def test_malformed_and_foreign_ids(self, client: GraphQLClient, app: FastAPI, org: str) -> None:
        other_org = await create_org(client, "mallory", name="Other")
        before = await row_counts(app)
        foreign = await client.data(CONSUME, {"org": other_org, "amount": 1, "key": "k"}, as_="alice")
        assert foreign["consumeTokens"]["code"] == "NOT_FOUND"
        garbage = await client.data(CONSUME, {"org": "not-an-id", "amount": 1, "key": "k"}, as_="alice")
        assert garbage["consumeTokens"]["__typename"] == "InvalidInput"
        assert await row_counts(app) == before


class TestReserveInput:
    @pytest.mark.parametrize("ttl", [0, -5, 7 * 24 * 3600 + 1])
    async def test_ttl_bounds(self, client: GraphQLClient, app: FastAPI, org: str, ttl: int) -> None:
        before = await row_counts(app)
        data = await client.data(RESERVE, {"org": org, "amount": 1, "key": "r", "ttl": ttl}, as_="alice")
        assert data["reserveTokens"] == {
            "__typename": "InvalidInput",
            "code": "INVALID_INPUT",
            "field": "ttlSeconds",
        }
        assert await row_counts(app) == before


class TestWalletStatus:
    async def test_suspended_wallet_refuses_consumption_until_reactivated(
        self, client: GraphQLClient, org: str
    ) -> None:
        mutation = """mutation($org: ID!) { %s(input: {organizationId: $org, reason: "chargeback"}) {
                        __typename ... on WalletStatusChanged { wallet { status } } } }"""
        suspended = await client.data(mutation % "suspendWallet", {"org": org}, as_="root-admin")
        assert suspended["suspendWallet"]["wallet"]["status"] == "SUSPENDED"
        refused = await client.data(CONSUME, {"org": org, "amount": 1, "key": "s"}, as_="alice")
        assert refused["consumeTokens"]["code"] == "WALLET_SUSPENDED"
        await client.data(mutation % "reactivateWallet", {"org": org}, as_="root-admin")
        allowed = await client.data(CONSUME, {"org": org, "amount": 1, "key": "s"}, as_="alice")
        assert allowed["consumeTokens"]["__typename"] == "TokensConsumed"


class TestLedgerConnection:
    async def test_pages_stay_stable_while_entries_arrive(self, client: GraphQLClient, org: str) -> None:
        grant = """mutation($org: ID!) {
                     grantTokens(input: {organizationId: $org, amount: 20, reason: "x"}) { __typename } }"""
        await client.data(grant, {"org": org}, as_="root-admin")
        for i in range(5):
            await client.data(CONSUME, {"org": org, "amount": 1, "key": f"p{i}"}, as_="alice")
        page = """query($id: ID!, $after: String) { organization(id: $id) { wallet {
                    ledger(first: 3, after: $after) { edges { cursor node { amount balanceAfter } }
                    pageInfo { hasNextPage endCursor } } } } }"""
        first = (await client.data(page, {"id": org}, as_="alice"))["organization"]["wallet"]["ledger"]
        assert [e["node"]["balanceAfter"] for e in first["edges"]] == [18, 19, 20]
        assert first["pageInfo"]["hasNextPage"] is True
        await client.data(CONSUME, {"org": org, "amount": 1, "key": "late"}, as_="alice")
        second = await client.data(page, {"id": org, "after": first["pageInfo"]["endCursor"]}, as_="alice")
        edges = second["organization"]["wallet"]["ledger"]["edges"]
        assert [e["node"]["balanceAfter"] for e in edges] == [21, 22, 23]
        kinds = """query($id: ID!) { organization(id: $id) { wallet {
                     ledger(kinds: [TRIAL_GRANT, ADMIN_GRANT]) { edges { node { kind } } } } } }"""
        filtered = (await client.data(kinds, {"id": org}, as_="alice"))["organization"]["wallet"]["ledger"]
        assert [e["node"]["kind"] for e in filtered["edges"]] == ["ADMIN_GRANT", "TRIAL_GRANT"]
        bad = await client.raw(page, {"id": org, "after": "garbage"}, as_="alice")
        assert bad["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
