"""Many clients, one wallet, over real HTTP: the exact outcome, and the ledger sound after."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.db.engine import create_engine, session_factory
from tests.helpers import GraphQLClient, create_org

CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename
    ... on TokensConsumed { entry { id amount } wallet { balance reserved } }
    ... on UserError { code }
  }
}"""
RESERVE = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  reserveTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, ttlSeconds: 600}) {
    __typename
    ... on TokensReserved { reservation { id amount } }
    ... on UserError { code }
  }
}"""
CAPTURE = """
mutation($id: ID!, $amount: BigInt) {
  captureReservation(input: {reservationId: $id, amount: $amount}) {
    __typename
    ... on ReservationCaptured { entry { id heldChange } }
    ... on UserError { code }
  }
}"""
RELEASE = """
mutation($id: ID!) {
  releaseReservation(input: {reservationId: $id}) {
    __typename ... on UserError { code }
  }
}"""
REFUND = """
mutation($id: ID!, $amount: BigInt) {
  refundConsumption(input: {entryId: $id, amount: $amount}) {
    __typename
    ... on ConsumptionRefunded { entry { amount } }
    ... on UserError { code }
  }
}"""
GRANT = """
mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "top up"}) {
    __typename ... on TokensGranted { entry { amount } } ... on UserError { code }
  }
}"""
BALANCE = "query($id: ID!) { organization(id: $id) { wallet { balance reserved lifetimeConsumed } } }"


async def api_key(client: GraphQLClient, org_id: str, owner: str, scopes: list[str]) -> str:
    data = await client.data(
        """mutation($org: ID!, $scopes: [String!]!) {
             createApiKey(input: {organizationId: $org, name: "backend", scopes: $scopes}) {
               ... on ApiKeyCreated { secret } } }""",
        {"org": org_id, "scopes": scopes},
        as_=owner,
    )
    return str(data["createApiKey"]["secret"])


async def funded_org(client: GraphQLClient, owner: str, tokens: int) -> str:
    org_id = await create_org(client, owner, name=f"Org {owner}")
    data = await client.data(GRANT, {"org": org_id, "amount": tokens}, as_="root-admin")
    assert data["grantTokens"]["__typename"] == "TokensGranted"
    return org_id


async def violations(database_url: str) -> dict[uuid.UUID, list[str]]:
    engine = create_engine(database_url, pool_size=1)
    try:
        sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        async with sessions() as s:
            return await ledger.violations(s)
    finally:
        await engine.dispose()


class TestConcurrentConsumption:
    async def test_hundred_clients_fifty_tokens(self, live: GraphQLClient, database_url: str) -> None:
        org_id = await funded_org(live, "alice", 47)  # + 3 trial tokens = 50
        key = await api_key(live, org_id, "alice", ["tokens.consume", "tokens.view"])

        async def one(i: int) -> str:
            body = await live.raw(CONSUME, {"org": org_id, "amount": 1, "key": f"c-{i}"}, bearer=key)
            assert not body.get("errors"), body
            return str(body["data"]["consumeTokens"]["__typename"])

        outcomes = await asyncio.gather(*(one(i) for i in range(100)))
        assert outcomes.count("TokensConsumed") == 50
        assert outcomes.count("InsufficientTokens") == 50
        wallet = (await live.data(BALANCE, {"id": org_id}, bearer=key))["organization"]["wallet"]
        assert wallet == {"balance": 0, "reserved": 0, "lifetimeConsumed": 50}
        assert await violations(database_url) == {}

    async def test_two_hundred_mixed_operations_over_three_wallets(
        self, live: GraphQLClient, database_url: str
    ) -> None:
        rng = random.Random(7)
        orgs = [await funded_org(live, f"owner{i}", 60) for i in range(3)]
        keys = [
            await api_key(live, org, f"owner{i}", ["tokens.consume", "tokens.view"])
            for i, org in enumerate(orgs)
        ]
        # What each wallet should hold, from the responses alone.
        expected = {org: {"balance": 63, "reserved": 0} for org in orgs}
        reservations: dict[str, list[tuple[str, int]]] = {org: [] for org in orgs}
        consumptions: dict[str, list[tuple[str, int]]] = {org: [] for org in orgs}

        async def call(query: str, variables: dict[str, Any], i: int) -> dict[str, Any]:
            body = await live.raw(query, variables, bearer=keys[i])
            assert not body.get("errors"), body
            return dict(next(iter(body["data"].values())))

        async def operation(n: int) -> None:
            i = rng.randrange(3)
            org = orgs[i]
            state = expected[org]
            choice = rng.choice(["consume", "consume", "reserve", "capture", "release", "refund", "grant"])
            if choice == "consume":
                amount = rng.randint(1, 4)
                result = await call(CONSUME, {"org": org, "amount": amount, "key": f"m-{n}"}, i)
                if result["__typename"] == "TokensConsumed":
                    state["balance"] -= amount
                    consumptions[org].append((result["entry"]["id"], amount))
                else:
                    assert result["code"] == "INSUFFICIENT_TOKENS"
            elif choice == "reserve":
                amount = rng.randint(1, 5)
                result = await call(RESERVE, {"org": org, "amount": amount, "key": f"r-{n}"}, i)
                if result["__typename"] == "TokensReserved":
                    state["balance"] -= amount
                    state["reserved"] += amount
                    reservations[org].append((result["reservation"]["id"], amount))
            elif choice == "capture" and reservations[org]:
                reservation_id, amount = reservations[org].pop()
                take = rng.randint(1, amount)
                result = await call(CAPTURE, {"id": reservation_id, "amount": take}, i)
                assert result["__typename"] == "ReservationCaptured", result
                state["reserved"] -= amount
                state["balance"] += amount - take
                consumptions[org].append((result["entry"]["id"], take))
            elif choice == "release" and reservations[org]:
                reservation_id, amount = reservations[org].pop()
                result = await call(RELEASE, {"id": reservation_id}, i)
                assert result["__typename"] == "ReservationReleased", result
                state["reserved"] -= amount
                state["balance"] += amount
            elif choice == "refund" and consumptions[org]:
                entry_id, amount = consumptions[org].pop()
                result = await call(REFUND, {"id": entry_id, "amount": amount}, i)
                assert result["__typename"] == "ConsumptionRefunded", result
                state["balance"] += amount
            elif choice == "grant":
                body = await live.raw(GRANT, {"org": org, "amount": 5}, as_="root-admin")
                assert body["data"]["grantTokens"]["__typename"] == "TokensGranted"
                state["balance"] += 5

        # Operations on one object are sequenced by the bookkeeping above; across objects
        # and wallets they run concurrently, 20 at a time.
        for batch in range(10):
            await asyncio.gather(*(operation(batch * 20 + j) for j in range(20)))

        for i, org in enumerate(orgs):
            wallet = (await live.data(BALANCE, {"id": org}, bearer=keys[i]))["organization"]["wallet"]
            assert {"balance": wallet["balance"], "reserved": wallet["reserved"]} == expected[org]
        assert await violations(database_url) == {}
        engine = create_engine(database_url, pool_size=1)
        try:
            async with session_factory(engine)() as s:
                entries = await s.scalar(text("SELECT count(*) FROM ledger_entries"))
        finally:
            await engine.dispose()
        assert entries and entries > 100
