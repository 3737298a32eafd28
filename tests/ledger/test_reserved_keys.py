"""The ledger keys the system writes (a purchase's credit, a subscription invoice's grant) cannot
be taken by a client first: a key starting so is refused, typed, and writes nothing."""

from __future__ import annotations

import pytest

from tests.helpers import GraphQLClient, create_org, row_counts

STAFF = "root-admin"

CONSUME = """
mutation($org: ID!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key}) {
    __typename ... on InvalidInput { field message }
  }
}
"""
RESERVE = """
mutation($org: ID!, $key: String!) {
  reserveTokens(input: {organizationId: $org, amount: 1, idempotencyKey: $key}) {
    __typename ... on InvalidInput { field message }
  }
}
"""
GRANT = """
mutation($org: ID!, $key: String!) {
  grantTokens(input: {organizationId: $org, amount: 5, reason: "goodwill", idempotencyKey: $key}) {
    __typename ... on InvalidInput { field message }
  }
}
"""


@pytest.mark.parametrize(
    "key", ["purchase:0190a0a0-0000-7000-8000-000000000000", "subscription-invoice:in_1"]
)
async def test_system_key_prefixes_are_refused_on_every_client_path(
    client: GraphQLClient, app: object, key: str
) -> None:
    org = await create_org(client, "key-owner")
    before = await row_counts(app)
    for query, field, subject in (
        (CONSUME, "consumeTokens", "key-owner"),
        (RESERVE, "reserveTokens", "key-owner"),
        (GRANT, "grantTokens", STAFF),
    ):
        result = (await client.data(query, {"org": org, "key": key}, as_=subject))[field]
        assert result["__typename"] == "InvalidInput", result
        assert result["field"] == "idempotencyKey" and "the system's" in result["message"]
    assert await row_counts(app) == before


async def test_a_key_that_only_contains_the_prefix_is_fine(client: GraphQLClient) -> None:
    org = await create_org(client, "key-owner-2")
    result = (await client.data(GRANT, {"org": org, "key": "my-purchase:1"}, as_=STAFF))["grantTokens"]
    assert result["__typename"] == "TokensGranted", result
