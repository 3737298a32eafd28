"""Who is calling: JWTs and API keys, and every way a credential can be wrong.

A wrong credential never falls back to anonymous access that could write: every field that
needs a caller answers UNAUTHENTICATED, and nothing is written."""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from jwt.warnings import InsecureKeyLengthWarning
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal
from orgwallet.config import Settings
from tests.helpers import (
    CREATE_ORG,
    REVOKE_API_KEY,
    GraphQLClient,
    create_api_key,
    create_org,
    error_code,
    row_counts,
    snapshot,
)

VIEWER = "{ viewer { subject email isPlatformAdmin } }"


def signed(settings: Settings, *, secret: str | None = None, algorithm: str = "HS256", **claims: Any) -> str:
    """A JWT with good claims for ``alice``, changed by ``claims`` (``None`` drops a claim)."""
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": "alice",
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "exp": now + 600,
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # HS512 with the HS256 secret
        return jwt.encode(body, secret or settings.signing_secret, algorithm=algorithm)


@dataclass
class Keys:
    org: str
    valid: str
    revoked: str
    revoked_id: str


async def make_keys(client: GraphQLClient) -> Keys:
    org = await create_org(client, "olivia")
    _, valid = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia")
    revoked_id, revoked = await create_api_key(client, org, scopes=["tokens.view"], as_="olivia")
    result = await client.data(REVOKE_API_KEY, {"key": revoked_id}, as_="olivia")
    assert result["revokeApiKey"]["__typename"] == "ApiKeyRevoked"
    return Keys(org, valid, revoked, revoked_id)


def _now() -> int:
    return int(time.time())


#: name -> the Authorization header to send (None: no header at all).
BAD_CREDENTIALS: dict[str, Callable[[Settings, Keys], str | None]] = {
    "missing": lambda s, k: None,
    "bearer without token": lambda s, k: "Bearer",
    "bearer with blanks": lambda s, k: "Bearer    ",
    "basic scheme": lambda s, k: "Basic YWxpY2U6c2VjcmV0",
    "other scheme, good token": lambda s, k: f"Token {signed(s)}",
    "garbage": lambda s, k: "garbage",
    "bearer garbage": lambda s, k: "Bearer garbage",
    "three garbage segments": lambda s, k: "Bearer a.b.c",
    "tampered token": lambda s, k: f"Bearer {signed(s)[:-2]}xx",
    "expired": lambda s, k: f"Bearer {signed(s, iat=_now() - 7200, exp=_now() - 3600)}",
    "expired beyond the leeway": lambda s, k: f"Bearer {signed(s, exp=_now() - s.jwt_leeway_seconds - 5)}",
    "not valid yet": lambda s, k: f"Bearer {signed(s, nbf=_now() + 3600)}",
    "wrong signature": lambda s, k: f"Bearer {signed(s, secret='another-secret-' + 'y' * 40)}",
    "wrong algorithm": lambda s, k: f"Bearer {signed(s, algorithm='HS512')}",
    "unsigned (alg none)": lambda s, k: (
        "Bearer "
        + jwt.encode(
            {"sub": "alice", "iss": s.jwt_issuer, "aud": s.jwt_audience, "exp": _now() + 600}, None, "none"
        )
    ),
    "wrong issuer": lambda s, k: f"Bearer {signed(s, iss='someone-else')}",
    "wrong audience": lambda s, k: f"Bearer {signed(s, aud='another-api')}",
    "missing sub": lambda s, k: f"Bearer {signed(s, sub=None)}",
    "empty sub": lambda s, k: f"Bearer {signed(s, sub='')}",
    "overlong sub": lambda s, k: f"Bearer {signed(s, sub='a' * 256)}",
    "sub with a control character": lambda s, k: "Bearer " + signed(s, sub="alice\x00"),
    "missing exp": lambda s, k: f"Bearer {signed(s, exp=None)}",
    "missing iss": lambda s, k: f"Bearer {signed(s, iss=None)}",
    "missing aud": lambda s, k: f"Bearer {signed(s, aud=None)}",
    "revoked API key": lambda s, k: f"Bearer {k.revoked}",
    "unknown API key": lambda s, k: f"Bearer owk_0123456789ab_{'z' * 43}",
    "API key with a known prefix, wrong secret": lambda s, k: f"Bearer {k.valid[:-3]}zzz",
    "malformed API key (prefix only)": lambda s, k: "Bearer owk_",
    "malformed API key (no secret)": lambda s, k: f"Bearer {k.valid.rsplit('_', 1)[0]}_",
    "malformed API key (no separator)": lambda s, k: "Bearer owk_0123456789ab",
}


async def _send(client: GraphQLClient, query: str, header: str | None, **variables: Any) -> dict[str, Any]:
    headers = {"Authorization": header} if header is not None else {}
    return await client.raw(query, variables, headers=headers)


class TestBadCredentials:
    @pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
    async def test_is_unauthenticated_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, settings: Settings, case: str
    ) -> None:
        keys = await make_keys(client)
        header = BAD_CREDENTIALS[case](settings, keys)
        counts, before = await row_counts(app), await snapshot(app)
        revoked_last_used = await _last_used(app, keys.revoked_id)

        viewer = await _send(client, VIEWER, header)
        created = await _send(client, CREATE_ORG, header, name="Intruders", slug="intruders")
        org = await _send(client, "query($id: ID!) { organization(id: $id) { id } }", header, id=keys.org)

        assert error_code(viewer, "viewer") == "UNAUTHENTICATED", viewer
        assert viewer["data"] is None
        assert error_code(created, "createOrganization") == "UNAUTHENTICATED", created
        assert error_code(org, "organization") == "UNAUTHENTICATED", org
        assert await row_counts(app) == counts
        assert await snapshot(app) == before
        assert await _last_used(app, keys.revoked_id) == revoked_last_used

    async def test_the_error_says_what_is_wrong(self, client: GraphQLClient, settings: Settings) -> None:
        body = await _send(client, VIEWER, f"Bearer {signed(settings, iss='someone-else')}")
        assert "issuer" in body["errors"][0]["message"].lower()
        body = await _send(client, VIEWER, None)
        assert body["errors"][0]["message"] == "authentication required"


async def _last_used(app: FastAPI, api_key_id: str) -> Any:
    key_uuid = uuid.UUID(GlobalID.from_id(api_key_id).node_id)
    async with app.state.runtime.engine.connect() as connection:
        return (
            await connection.execute(
                text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": key_uuid}
            )
        ).scalar_one()


class TestJwt:
    async def test_a_valid_token_is_its_subject(self, client: GraphQLClient, settings: Settings) -> None:
        body = await _send(client, VIEWER, f"Bearer {signed(settings, email='alice@example.com')}")
        assert body["data"]["viewer"] == {
            "subject": "alice",
            "email": "alice@example.com",
            "isPlatformAdmin": False,
        }

    async def test_the_scheme_is_case_insensitive(self, client: GraphQLClient, settings: Settings) -> None:
        body = await _send(client, VIEWER, f"bearer {signed(settings)}")
        assert body["data"]["viewer"]["subject"] == "alice"

    async def test_an_expiry_within_the_leeway_is_accepted(
        self, client: GraphQLClient, settings: Settings
    ) -> None:
        assert settings.jwt_leeway_seconds >= 10
        body = await _send(client, VIEWER, f"Bearer {signed(settings, exp=_now() - 5)}")
        assert body["data"]["viewer"]["subject"] == "alice"

    async def test_the_admin_claim_must_be_true(self, client: GraphQLClient, settings: Settings) -> None:
        for claim, admin in ((True, True), ("true", False), (1, False), (False, False)):
            token = signed(settings, sub="staff", orgwallet_admin=claim)
            body = await _send(client, VIEWER, f"Bearer {token}")
            assert body["data"]["viewer"]["isPlatformAdmin"] is admin, claim

    async def test_listed_subjects_are_platform_admins(self, client: GraphQLClient) -> None:
        assert "root-admin" in client.settings.platform_admins
        data = await client.data(VIEWER, as_="root-admin")
        assert data["viewer"]["isPlatformAdmin"] is True

    async def test_a_valid_token_of_a_new_subject_writes_nothing_by_itself(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        counts = await row_counts(app)
        await client.data(VIEWER, as_="newcomer")
        assert await row_counts(app) == counts


class TestApiKey:
    async def test_is_its_organization_with_its_scopes(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia", name="Acme", slug="acme")
        other = await create_org(client, "otto", name="Other", slug="other")
        key_id, secret = await create_api_key(
            client, org, scopes=["tokens.view", "tokens.consume"], as_="olivia"
        )
        key_uuid = GlobalID.from_id(key_id).node_id

        data = await client.data(
            "query($a: ID!, $b: ID!) { viewer { subject email isPlatformAdmin memberships { role } }"
            " a: organization(id: $a) { id slug } b: organization(id: $b) { id } }",
            {"a": org, "b": other},
            bearer=secret,
        )

        assert data["viewer"] == {
            "subject": f"apikey:{key_uuid}",
            "email": None,
            "isPlatformAdmin": False,
            "memberships": [],
        }
        assert data["a"] == {"id": org, "slug": "acme"}
        assert data["b"] is None
        principal = await app.state.runtime.authenticate(f"Bearer {secret}")
        assert principal == ApiKeyPrincipal(
            api_key_id=uuid.UUID(key_uuid),
            organization_id=uuid.UUID(GlobalID.from_id(org).node_id),
            scopes=frozenset({Permission.TOKENS_VIEW, Permission.TOKENS_CONSUME}),
        )

    async def test_use_is_stamped(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        key_id, secret = await create_api_key(client, org, scopes=[], as_="olivia")
        assert await _last_used(app, key_id) is None
        await client.data(VIEWER, bearer=secret)
        assert await _last_used(app, key_id) is not None
