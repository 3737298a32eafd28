"""Small helpers to call the API as the SPA, a back end or staff would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

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
