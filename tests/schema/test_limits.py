"""Limits against abuse on /graphql, and typed errors for bad input: what a client may store in
metadata, what a query may cost, how big a request may be, what the document cache keeps,
what an anonymous caller may introspect; and the bad requests that used to answer
"Unexpected error." or a 500."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from graphql import get_introspection_query
from starlette.types import Message

from orgwallet.app import GraphQLEndpoint
from orgwallet.schema.limits import MAX_CACHED_CHARACTERS, DocumentCache
from tests.helpers import GraphQLClient, create_api_key, create_org, snapshot

MAX_SAFE = 2**53 - 1

CONSUME = """
mutation($org: ID!, $key: String!, $metadata: JSON) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key, metadata: $metadata}) {
    __typename
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}"""

GRANT = """
mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "limits"}) {
    __typename
    ... on TokensGranted { wallet { balance } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}"""


@pytest.fixture
async def org(client: GraphQLClient) -> str:
    return await create_org(client, "alice")


async def post(
    client: GraphQLClient, body: str | bytes, *, as_: str | None = None, bearer: str | None = None
) -> httpx.Response:
    """POSTs ``body`` as it is (JSON that httpx would refuse to write, or no JSON at all)."""
    headers = {"content-type": "application/json"}
    if as_ is not None or bearer is not None:
        headers["authorization"] = f"Bearer {bearer or client.token(as_ or '')}"
    return await client.http.post("/graphql", content=body, headers=headers)


def code_of(body: dict[str, Any]) -> str:
    return str(body["errors"][0]["extensions"]["code"])


def documents(app: FastAPI) -> DocumentCache:
    """The cache of parsed and validated documents of the app's /graphql."""
    endpoint = next(
        getattr(r, "endpoint", None) for r in app.router.routes if getattr(r, "path", "") == "/graphql"
    )
    assert isinstance(endpoint, GraphQLEndpoint)
    return endpoint.documents


# ---------------------------------------------------------------- metadata


def nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep, as text (json.dumps would hit the recursion limit)."""
    return '{"a":' * (depth - 1) + '{"a":1' + "}" * depth


class TestMetadata:
    @pytest.mark.parametrize(
        ("metadata", "says"),
        [
            ({"blob": "x" * 8200}, "8192 bytes"),
            (json.loads(nested(6)), "5 levels"),
            ({"key\u0000": 1}, "NUL"),
            ({"list": ["fine", "bad\u0000"]}, "NUL"),
        ],
    )
    async def test_what_passes_a_limit_is_typed_and_names_it_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, org: str, metadata: dict[str, Any], says: str
    ) -> None:
        before = await snapshot(app)
        data = await client.data(CONSUME, {"org": org, "key": "k", "metadata": metadata}, as_="alice")
        assert data["consumeTokens"]["__typename"] == "InvalidInput", data
        assert data["consumeTokens"]["field"] == "metadata"
        assert says in data["consumeTokens"]["message"]
        assert await snapshot(app) == before

    async def test_metadata_at_the_limits_is_stored(
        self, client: GraphQLClient, app: FastAPI, org: str
    ) -> None:
        biggest = {"blob": "x" * (8192 - len('{"blob":""}'))}
        for key, metadata in (("size", biggest), ("depth", json.loads(nested(5)))):
            data = await client.data(CONSUME, {"org": org, "key": key, "metadata": metadata}, as_="alice")
            assert data["consumeTokens"]["__typename"] == "TokensConsumed", data
        one_more = {"blob": biggest["blob"] + "x"}
        data = await client.data(CONSUME, {"org": org, "key": "over", "metadata": one_more}, as_="alice")
        assert data["consumeTokens"]["field"] == "metadata"

    async def test_metadata_nested_a_thousand_deep_is_a_typed_error(
        self, client: GraphQLClient, app: FastAPI, org: str
    ) -> None:
        before = await snapshot(app)
        variables = f'{{"org": "{org}", "key": "deep", "metadata": {nested(1000)}}}'
        body = f'{{"query": {json.dumps(CONSUME)}, "variables": {variables}}}'
        response = await post(client, body, as_="alice")
        assert response.status_code == 200
        result = response.json()["data"]["consumeTokens"]
        assert (result["__typename"], result["field"]) == ("InvalidInput", "metadata")
        assert await snapshot(app) == before

    @pytest.mark.parametrize(
        ("literal", "says"),
        [("{a: " * 150 + "1" + "}" * 150, "5 levels"), ("{a: 1e999}", "finite")],
    )
    async def test_metadata_written_in_the_document_gets_the_same_checks(
        self, client: GraphQLClient, app: FastAPI, org: str, literal: str, says: str
    ) -> None:
        before = await snapshot(app)
        mutation = CONSUME.replace("$metadata: JSON", "").replace(
            "metadata: $metadata", f"metadata: {literal}"
        )
        result = (await client.data(mutation, {"org": org, "key": "lit"}, as_="alice"))["consumeTokens"]
        assert (result["__typename"], result["field"]) == ("InvalidInput", "metadata")
        assert says in result["message"]
        assert await snapshot(app) == before


# ---------------------------------------------------------------- the cost of a query

DASHBOARD = """
query($org: ID!) {
  organization(id: $org) {
    name
    wallet {
      balance reserved expiringSoon(days: 7)
      ledger(first: 100) {
        edges { cursor node { id kind amount heldChange balanceAfter reason metadata actor createdAt } }
        pageInfo { hasNextPage endCursor }
      }
    }
    purchases { edges { node { reference status receiptUrl tokens amountMinor createdAt } } }
    notifications(first: 20) { unreadCount edges { node { id title body createdAt } } }
  }
}"""

LEDGER_PAGE = "ledger(first: {first}) {{ edges {{ node {{ metadata }} }} }}"


def in_org(selection: str, variables: str = "") -> str:
    """A query of ``selection`` on the organization ``$org`` (and more ``variables``)."""
    return "query($org: ID!" + variables + ") { organization(id: $org) { " + selection + " } }"


def aliased(count: int, selection: str) -> str:
    return " ".join(f"a{i}: {selection}" for i in range(count))


class TestQueryCost:
    async def test_twenty_big_ledger_pages_are_refused_before_execution_and_a_dashboard_is_not(
        self, client: GraphQLClient, org: str
    ) -> None:
        assert await client.data(DASHBOARD, {"org": org}, as_="alice")
        query = in_org("wallet { " + aliased(20, LEDGER_PAGE.format(first=500)) + " }")
        body = await client.raw(query, {"org": org}, as_="alice")
        assert body["data"] is None
        [error] = body["errors"]
        assert error["extensions"]["code"] == "QUERY_TOO_COSTLY"
        assert error["extensions"]["limit"] == 10_000 and error["extensions"]["cost"] > 20 * 500
        assert "10000" in error["message"] and str(error["extensions"]["cost"]) in error["message"]

    async def test_page_sizes_given_as_variables_count(self, client: GraphQLClient, org: str) -> None:
        pages = aliased(20, "ledger(first: $n) { edges { node { metadata } } }")
        query = in_org("wallet { " + pages + " }", variables=", $n: Int")
        small = await client.raw(query, {"org": org, "n": 5}, as_="alice")
        assert not small.get("errors"), small
        big = await client.raw(query, {"org": org, "n": 500}, as_="alice")
        assert code_of(big) == "QUERY_TOO_COSTLY"
        # The same document again, with the small page: the verdict depended on the variable.
        assert not (await client.raw(query, {"org": org, "n": 5}, as_="alice")).get("errors")
        with_default = query.replace("$n: Int", "$n: Int = 500")
        assert code_of(await client.raw(with_default, {"org": org}, as_="alice")) == "QUERY_TOO_COSTLY"

    async def test_fragments_count(self, client: GraphQLClient, org: str) -> None:
        fragment = "fragment Page on Wallet { " + LEDGER_PAGE.format(first=500) + " }"
        query = in_org(aliased(20, "wallet { ...Page }")) + fragment
        assert code_of(await client.raw(query, {"org": org}, as_="alice")) == "QUERY_TOO_COSTLY"


# ---------------------------------------------------------------- the request body

ONE_MB = 1_000_000


async def call_asgi(
    app: FastAPI, headers: list[tuple[bytes, bytes]], receive: Callable[[], Awaitable[Message]]
) -> tuple[int, dict[str, Any]]:
    """One POST /graphql straight through the ASGI interface, with the body ``receive`` gives."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


class Body:
    """A request body arriving in 64 KiB chunks (2 MB in all), counting what was taken."""

    def __init__(self, total: int = 2 * ONE_MB, chunk: int = 65536) -> None:
        self.left, self.chunk, self.taken = total, chunk, 0

    async def __call__(self) -> Message:
        size = min(self.chunk, self.left)
        self.left -= size
        self.taken += size
        return {"type": "http.request", "body": b" " * size, "more_body": self.left > 0}


class TestRequestBody:
    async def test_a_declared_length_over_the_limit_is_refused_unread(self, app: FastAPI) -> None:
        body = Body()
        status, answer = await call_asgi(app, [(b"content-length", str(2 * ONE_MB).encode())], body)
        assert status == 413 and code_of(answer) == "REQUEST_TOO_LARGE"
        assert body.taken == 0

    async def test_a_chunked_body_is_refused_once_it_passes_the_limit(self, app: FastAPI) -> None:
        body = Body()
        status, answer = await call_asgi(app, [(b"transfer-encoding", b"chunked")], body)
        assert status == 413 and code_of(answer) == "REQUEST_TOO_LARGE"
        assert "1000000 bytes" in answer["errors"][0]["message"]
        assert body.taken <= ONE_MB + body.chunk


# ---------------------------------------------------------------- the document cache


class TestDocumentCache:
    async def test_the_cache_is_bounded_in_characters_and_keeps_a_hot_document(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        cache = documents(app)
        hot = "query Hot { __typename }"
        padding = "#" + "x" * 2000
        for n in range(300):  # 600,000 characters of distinct documents
            assert await client.data(f"query Q{n} {{ __typename }} {padding}", as_="alice")
            assert await client.data(hot, as_="alice")
        assert 0 < cache.characters <= MAX_CACHED_CHARACTERS
        assert cache.characters == sum(len(q) for q in cache._entries)
        entry = cache.peek(hot)
        assert entry is not None and entry.errors == []

    async def test_anonymous_and_huge_documents_stay_out(self, client: GraphQLClient, app: FastAPI) -> None:
        cache = documents(app)
        for n in range(25):  # distinct anonymous documents
            await client.raw(f"query Q{n} {{ __typename }} #" + "x" * 40_000)
        huge = "query Huge { __typename } #" + "x" * 200_000
        assert await client.data(huge, as_="alice")
        assert len(cache) == 0 and cache.characters == 0


# ---------------------------------------------------------------- introspection

SCHEMA_ALIASES = "{ " + aliased(100, "__schema { types { name fields { name } } }") + " }"


class TestIntrospection:
    async def test_an_anonymous_caller_may_not_introspect_a_hundred_times_in_one_request(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        async def anonymous() -> dict[str, Any]:
            return await client.raw(SCHEMA_ALIASES)

        *refused, health = await asyncio.gather(
            *(anonymous() for _ in range(10)), client.http.get("/healthz")
        )
        assert health.status_code == 200
        for body in refused:  # no data: the executor never ran them
            assert body["data"] is None and code_of(body) == "UNAUTHENTICATED"
            assert "sign in to introspect" in body["errors"][0]["message"]
        # GraphiQL's own schema query, anonymous, still works (its page loads the schema so).
        plain = await client.raw(get_introspection_query())
        assert not plain.get("errors") and plain["data"]["__schema"]["queryType"]["name"] == "Query"

    async def test_signed_in_callers_introspect_within_the_cost_limit(
        self, client: GraphQLClient, org: str
    ) -> None:
        _, secret = await create_api_key(client, org, scopes=["tokens.view"], as_="alice")
        for credential in ({"as_": "alice"}, {"bearer": secret}, {"as_": "root-admin"}):
            assert (await client.data(get_introspection_query(), **credential))["__schema"]
            assert code_of(await client.raw(SCHEMA_ALIASES, **credential)) == "QUERY_TOO_COSTLY"


# ---------------------------------------------------------------- typed errors


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


class TestTypedErrors:
    async def test_a_cursor_that_names_nothing_is_invalid_input_on_every_connection(
        self, client: GraphQLClient, org: str
    ) -> None:
        connections = {
            "ledger": "wallet { ledger(after: $after) { edges { cursor } } }",
            "purchases": "purchases(after: $after) { edges { cursor } }",
            "notifications": "notifications(after: $after) { edges { cursor } }",
        }
        garbage = [
            cursor(f"seq:{2**64}"),
            cursor(f"seq:{2**63}"),
            cursor("seq:-1"),
            "garbage",
            "é",
            cursor("purchase:not-a-uuid"),
        ]
        for name, selection in connections.items():
            query = in_org(selection, variables=", $after: String")
            for after in garbage:
                body = await client.raw(query, {"org": org, "after": after}, as_="alice")
                [error] = body["errors"]
                assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "after"}, (
                    name,
                    after,
                    body,
                )

    async def test_a_grant_past_the_exact_range_is_refused_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, org: str
    ) -> None:
        balance = (await client.data(GRANT, {"org": org, "amount": MAX_SAFE - 3}, as_="root-admin"))[
            "grantTokens"
        ]
        assert balance["wallet"]["balance"] == MAX_SAFE  # the trial's 3 tokens and this grant
        before = await snapshot(app)
        for amount in (1, MAX_SAFE):
            result = (await client.data(GRANT, {"org": org, "amount": amount}, as_="root-admin"))[
                "grantTokens"
            ]
            assert (result["__typename"], result["field"]) == ("InvalidInput", "amount")
            assert str(MAX_SAFE) in result["message"]
        assert await snapshot(app) == before

    @pytest.mark.parametrize("body", [b"null", b"5", b'"x"', b"[]", b"[1]", b"\xff\xfe{}", b'{"query": 5}'])
    async def test_a_body_that_is_no_graphql_request_is_a_400_with_a_json_error(
        self, client: GraphQLClient, body: bytes
    ) -> None:
        response = await post(client, body)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        [error] = response.json()["errors"]
        assert error["extensions"] == {"code": "BAD_REQUEST"} and "Traceback" not in error["message"]

    async def test_two_operations_without_an_operation_name_run_neither(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        both = """
        mutation One { createOrganization(input: {name: "One"}) { __typename } }
        mutation Two { createOrganization(input: {name: "Two"}) { __typename } }"""
        before = await snapshot(app)
        body = await client.raw(both, as_="alice")
        assert body["data"] is None and code_of(body) == "BAD_REQUEST"
        assert (
            body["errors"][0]["message"]
            == "Must provide operation name if query contains multiple operations."
        )
        assert await snapshot(app) == before
        chosen = await client.http.post(
            "/graphql",
            json={"query": both, "operationName": "Two"},
            headers={"authorization": f"Bearer {client.token('alice')}"},
        )
        assert chosen.json()["data"] == {"createOrganization": {"__typename": "OrganizationCreated"}}

        queries = "query A { viewer { subject } } query B { __typename }"
        got = await client.http.get(
            "/graphql",
            params={"query": queries},
            headers={"accept": "application/json", "authorization": f"Bearer {client.token('alice')}"},
        )
        assert got.json()["data"] is None and code_of(got.json()) == "BAD_REQUEST"
        named = await client.http.get(
            "/graphql",
            params={"query": queries, "operationName": "B"},
            headers={"accept": "application/json", "authorization": f"Bearer {client.token('alice')}"},
        )
        assert named.json() == {"data": {"__typename": "Query"}}
