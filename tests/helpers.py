"""Small helpers to call the API as the SPA, a back end or staff would."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text

from orgwallet.auth.tokens import mint_token
from orgwallet.config import Settings


@dataclass
class GraphQLClient:
    http: httpx.AsyncClient
    settings: Settings

    def token(self, subject: str, *, email: str | None = None, admin: bool = False) -> str:
        return mint_token(self.settings, subject=subject, email=email, admin=admin)

    async def raw(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        as_: str | None = None,
        bearer: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """POSTs a query; ``as_`` is a subject to mint a token for, ``bearer`` a raw credential."""
        sent = dict(headers or {})
        if as_ is not None:
            bearer = self.token(as_)
        if bearer is not None:
            sent["Authorization"] = f"Bearer {bearer}"
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=sent
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, variables: dict[str, Any] | None = None, **kw: Any) -> Any:
        """The data of a call that must succeed without GraphQL errors."""
        body = await self.raw(query, variables, **kw)
        assert not body.get("errors"), body
        return body["data"]


def error_code(body: dict[str, Any], field: str) -> str | None:
    """The outcome of one root field: None when it succeeded, else the error code, whether a
    GraphQL error (``extensions.code``) or a typed result (``code`` of a UserError)."""
    if body.get("errors"):
        return str(body["errors"][0].get("extensions", {}).get("code", "UNEXPECTED"))
    value = (body.get("data") or {}).get(field)
    if isinstance(value, dict) and "code" in value:
        return str(value["code"])
    return None


CREATE_ORG = """
mutation($name: String!, $slug: String) {
  createOrganization(input: {name: $name, slug: $slug}) {
    __typename
    ... on OrganizationCreated { organization { id name slug } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""


async def create_org(client: GraphQLClient, owner: str, name: str = "Acme", slug: str | None = None) -> str:
    data = await client.data(CREATE_ORG, {"name": name, "slug": slug}, as_=owner)
    result = data["createOrganization"]
    assert result["__typename"] == "OrganizationCreated", result
    return str(result["organization"]["id"])


ADD_MEMBER = """
mutation($org: ID!, $subject: String!, $email: String, $role: Role!) {
  addMember(input: {organizationId: $org, subject: $subject, email: $email, role: $role}) {
    __typename
    ... on MembershipChanged { organization { id members { subject email role } } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""

SET_MEMBER_ROLE = """
mutation($org: ID!, $subject: String!, $role: Role!) {
  setMemberRole(input: {organizationId: $org, subject: $subject, role: $role}) {
    __typename
    ... on MembershipChanged { organization { id members { subject role } } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""

REMOVE_MEMBER = """
mutation($org: ID!, $subject: String!) {
  removeMember(input: {organizationId: $org, subject: $subject}) {
    __typename
    ... on MembershipChanged { organization { id members { subject role } } }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""

CREATE_API_KEY = """
mutation($org: ID!, $name: String!, $scopes: [String!]!) {
  createApiKey(input: {organizationId: $org, name: $name, scopes: $scopes}) {
    __typename
    ... on ApiKeyCreated { apiKeyId secret }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""

REVOKE_API_KEY = """
mutation($key: ID!) {
  revokeApiKey(input: {apiKeyId: $key}) {
    __typename
    ... on ApiKeyRevoked { apiKeyId }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""


async def add_member(
    client: GraphQLClient,
    organization_id: str,
    *,
    subject: str,
    role: str,
    as_: str,
    email: str | None = None,
) -> None:
    variables = {"org": organization_id, "subject": subject, "email": email, "role": role}
    result = (await client.data(ADD_MEMBER, variables, as_=as_))["addMember"]
    assert result["__typename"] == "MembershipChanged", result


async def create_api_key(
    client: GraphQLClient, organization_id: str, *, scopes: list[str], as_: str, name: str = "back end"
) -> tuple[str, str]:
    """Creates a key; returns its global id and its secret."""
    variables = {"org": organization_id, "name": name, "scopes": scopes}
    result = (await client.data(CREATE_API_KEY, variables, as_=as_))["createApiKey"]
    assert result["__typename"] == "ApiKeyCreated", result
    return str(result["apiKeyId"]), str(result["secret"])


TABLES = ("organizations", "users", "memberships", "api_keys", "audit_log")


async def row_counts(app: Any) -> dict[str, int]:
    """Rows per table of this issue, read through the app's own engine."""
    async with app.state.runtime.engine.connect() as connection:
        return {
            table: int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608
            for table in TABLES
        }


async def snapshot(app: Any) -> dict[str, Any]:
    """Everything a mutation of this issue could change, except API keys' last-used stamps
    (authenticating with a key stamps it; that is not the mutation writing)."""
    queries = {
        "organizations": "SELECT id, name, slug FROM organizations ORDER BY id",
        "users": "SELECT id, subject, email, name FROM users ORDER BY id",
        "memberships": "SELECT organization_id, user_id, role FROM memberships ORDER BY 1, 2",
        "api_keys": "SELECT id, name, prefix, scopes, revoked_at FROM api_keys ORDER BY id",
        "audit_log": "SELECT id FROM audit_log ORDER BY id",
        "wallets": "SELECT id, status, balance, reserved, entry_seq FROM wallets ORDER BY id",
        "credit_lots": "SELECT id, remaining FROM credit_lots ORDER BY id",
        "reservations": "SELECT id, status FROM reservations ORDER BY id",
    }
    async with app.state.runtime.engine.connect() as connection:
        return {
            table: [tuple(row) for row in (await connection.execute(text(sql))).all()]
            for table, sql in queries.items()
        }


async def eventually(check: Any, *, within: float = 30.0, what: str = "the condition") -> Any:
    """Polls ``check`` (async, truthy when done) until it holds: for work other processes
    (or other tasks) do."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
