"""The permission matrix: every kind of caller against every operation.

Each operation is one row of ``OPERATIONS``: its GraphQL document, its variables in a
prepared world, where its outcome is read, and the outcome expected for every principal,
written out here (not derived from the code under test). A later issue adds its
operations as rows; the principals and the world stay.

Outcomes: ``OK``; ``NULL`` (a nullable field answered null: "not found" for queries);
a GraphQL error with ``extensions.code`` (``UNAUTHENTICATED``, ``FORBIDDEN``); or a typed
result member with its code (``NOT_FOUND`` is the ``NotFound`` member of a mutation's
result union). A call that is not ``OK`` writes nothing; a successful mutation writes
exactly one audit row.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet import ledger
from orgwallet.app import create_app
from orgwallet.auth.permissions import API_KEY_SCOPES, ROLE_PERMISSIONS, Permission
from orgwallet.auth.principals import UserPrincipal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction
from orgwallet.db.models import Role
from orgwallet.ledger import GrantSource
from orgwallet.services import api_keys as key_service
from orgwallet.services import organizations as org_service
from orgwallet.services import wallets as wallet_service
from tests.conftest import TEMPLATE, Postgres
from tests.helpers import (
    ADD_MEMBER,
    CREATE_API_KEY,
    CREATE_ORG,
    REMOVE_MEMBER,
    REVOKE_API_KEY,
    SET_MEMBER_ROLE,
    GraphQLClient,
    snapshot,
)

# ---------------------------------------------------------------- outcomes

OK = "ok"
NULL = "null"
UNAUTHENTICATED = "error UNAUTHENTICATED"
FORBIDDEN = "error FORBIDDEN"
NOT_FOUND = "NotFound NOT_FOUND"  # the typed result member of a mutation

# ---------------------------------------------------------------- principals

# Members of the organization under test, one per role.
OWNER = "owner"
ADMIN = "admin"
BILLING = "billing"
MEMBER = "member"
VIEWER = "viewer"
# API keys of the organization under test: no scope, and each single scope.
KEY_NO_SCOPE = "key-no-scope"
KEY_VIEW = "key-tokens.view"
KEY_CONSUME = "key-tokens.consume"
KEY_PURCHASE = "key-tokens.purchase"
KEY_CONFIGURE = "key-tokens.configure"
# An API key of another organization, with every scope.
FOREIGN_KEY = "key-of-other-org"
# A signed-in user who is a member of another organization only.
OUTSIDER = "outsider"
# Platform staff: listed in the settings by subject, or carrying the admin claim.
STAFF = "platform-admin"
STAFF_BY_CLAIM = "platform-admin-by-claim"
ANONYMOUS = "anonymous"

ROLE_MEMBERS = (OWNER, ADMIN, BILLING, MEMBER, VIEWER)
OWN_KEYS = (KEY_NO_SCOPE, KEY_VIEW, KEY_CONSUME, KEY_PURCHASE, KEY_CONFIGURE)
PLATFORM_ADMINS = (STAFF, STAFF_BY_CLAIM)
PRINCIPALS = (*ROLE_MEMBERS, *OWN_KEYS, FOREIGN_KEY, OUTSIDER, *PLATFORM_ADMINS, ANONYMOUS)

#: Platform staff are not members of anything, so the same subjects serve every world.
STAFF_SUBJECT = "root-admin"  # listed in the settings' platform admins
STAFF_BY_CLAIM_SUBJECT = "staff-with-claim"
KEY_SCOPES = {
    KEY_NO_SCOPE: [],
    KEY_VIEW: ["tokens.view"],
    KEY_CONSUME: ["tokens.consume"],
    KEY_PURCHASE: ["tokens.purchase"],
    KEY_CONFIGURE: ["tokens.configure"],
}


@dataclass
class World:
    """Organization A with one member per role, a second owner, a MEMBER that member
    operations act on, and an API key per scope; organization B, of the outsider, with an
    API key. Every world has its own organizations and people (subjects end in a number)."""

    org: str  # global ids
    other_org: str
    spare_key: str  # an API key of A that revokeApiKey acts on
    subjects: dict[str, str]  # principal -> subject, for the people
    co_owner: str
    target: str  # a MEMBER of A
    newcomer: str  # not a member of anything yet
    bearers: dict[str, str | None]
    reservation: str  # an open reservation of A's wallet
    consumption: str  # a consumption entry of A's wallet


_worlds = itertools.count()


def _user(subject: str) -> UserPrincipal:
    return UserPrincipal(subject=subject, email=None, name=None, is_platform_admin=False)


async def build_world(app: FastAPI, client: GraphQLClient) -> World:
    """Built through the services in one transaction (fast); what it builds is checked through
    the API by the tests below the matrix."""
    n = next(_worlds)
    subjects = {p: f"{p}-{n}" for p in (*ROLE_MEMBERS, OUTSIDER)}
    subjects |= {STAFF: STAFF_SUBJECT, STAFF_BY_CLAIM: STAFF_BY_CLAIM_SUBJECT}
    co_owner, target, newcomer = f"co-owner-{n}", f"target-{n}", f"newcomer-{n}"
    services = app.state.runtime
    owner = _user(subjects[OWNER])
    bearers: dict[str, str | None] = {}
    async with transaction(services.sessions) as session:
        org = await org_service.create_organization(
            session, owner, services.settings, name=f"Acme {n}", slug=f"acme-{n}"
        )
        people = [(co_owner, Role.OWNER), (target, Role.MEMBER)]
        people += [(subjects[p], Role(p)) for p in (ADMIN, BILLING, MEMBER, VIEWER)]
        for subject, role in people:
            await org_service.add_member(session, owner, org.id, subject=subject, email=None, role=role)
            await session.flush()
        other = await org_service.create_organization(
            session, _user(subjects[OUTSIDER]), services.settings, name=f"Other {n}", slug=f"other-{n}"
        )
        for principal, scopes in KEY_SCOPES.items():
            _, bearers[principal] = await key_service.create_api_key(
                session, owner, org.id, name=principal, scopes=scopes
            )
        _, bearers[FOREIGN_KEY] = await key_service.create_api_key(
            session,
            _user(subjects[OUTSIDER]),
            other.id,
            name="theirs",
            scopes=[s.value for s in API_KEY_SCOPES],
        )
        spare, _ = await key_service.create_api_key(
            session, owner, org.id, name="spare", scopes=["tokens.view"]
        )
        wallet_id = await wallet_service.wallet_id_of(session, org.id)
        await ledger.credit(session, wallet_id, amount=100, source=GrantSource.ADMIN, actor="matrix")
        held = await ledger.reserve(
            session, wallet_id, amount=5, key="held", ttl_seconds=3600, actor="matrix"
        )
        spent = await ledger.consume(session, wallet_id, amount=2, key="spent", actor="matrix")
        assert held.reservation_id is not None and spent.entry is not None
    for principal in (*ROLE_MEMBERS, OUTSIDER, STAFF):
        bearers[principal] = client.token(subjects[principal])
    bearers[STAFF_BY_CLAIM] = client.token(STAFF_BY_CLAIM_SUBJECT, admin=True)
    bearers[ANONYMOUS] = None
    return World(
        org=str(GlobalID("Organization", str(org.id))),
        other_org=str(GlobalID("Organization", str(other.id))),
        spare_key=str(GlobalID("ApiKey", str(spare.id))),
        subjects=subjects,
        co_owner=co_owner,
        target=target,
        newcomer=newcomer,
        bearers=bearers,
        reservation=str(GlobalID("Reservation", str(held.reservation_id))),
        consumption=str(GlobalID("LedgerEntry", str(spent.entry.id))),
    )


# ---------------------------------------------------------------- one database for the matrix


@pytest.fixture(scope="module")
async def matrix_app(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    """One database and app for the whole matrix: a clone per case would cost more than the
    case. Cases stay independent because each builds its own world (own organizations,
    own people) and compares whole tables only around its own call."""
    name = f"matrix_{os.getpid()}"
    postgres.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE};")
    settings = Settings(
        database_url=postgres.url(name),
        home=tmp_path_factory.mktemp("matrix"),
        jwt_secret="test-secret-" + "x" * 40,
        platform_admins=[STAFF_SUBJECT],
        database_pool_size=5,
    )
    application = create_app(settings)
    yield application
    await application.state.runtime.close()
    postgres.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture(scope="module")
async def matrix_client(matrix_app: FastAPI) -> AsyncIterator[GraphQLClient]:
    transport = httpx.ASGITransport(app=matrix_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield GraphQLClient(http, matrix_app.state.runtime.settings)


@pytest.fixture(scope="module")
async def shared_world(matrix_app: FastAPI, matrix_client: GraphQLClient) -> World:
    """For the cases that must not change anything (they are checked not to)."""
    return await build_world(matrix_app, matrix_client)


@pytest.fixture
async def world(matrix_app: FastAPI, matrix_client: GraphQLClient) -> World:
    return await build_world(matrix_app, matrix_client)


# ---------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    name: str
    document: str
    variables: Callable[[World], dict[str, Any]]
    #: where the outcome is read in ``data``: a null on the way is NULL, a typed error its code
    path: tuple[str, ...]
    #: outcome -> the principals that get it; every principal exactly once
    expect: Mapping[str, Collection[str]]
    #: audit rows a successful call adds (token movements are recorded by the ledger itself)
    audit_rows: int = 1

    @property
    def is_mutation(self) -> bool:
        return self.document.lstrip().startswith("mutation")

    def expected(self, principal: str) -> str:
        found = [outcome for outcome, principals in self.expect.items() if principal in principals]
        assert len(found) == 1, f"{self.name}: {principal} has outcomes {found}"
        return found[0]


ORGANIZATION = "query($id: ID!) { organization(id: $id) { id name } }"
ORGANIZATION_API_KEYS = "query($id: ID!) { organization(id: $id) { apiKeys { id name scopes } } }"
NODE = "query($id: ID!) { node(id: $id) { __typename id } }"

EVERYONE_SIGNED_IN = tuple(p for p in PRINCIPALS if p != ANONYMOUS)
CAN_SEE_A = (*ROLE_MEMBERS, *OWN_KEYS, *PLATFORM_ADMINS)
MANAGE_MEMBERS = (OWNER, ADMIN, *PLATFORM_ADMINS)
MANAGE_OWNERS = (OWNER, *PLATFORM_ADMINS)
USERS = (*ROLE_MEMBERS, OUTSIDER, *PLATFORM_ADMINS)
API_KEYS = (*OWN_KEYS, FOREIGN_KEY)

#: An operation that only members who manage members may call: anyone else in A is
#: FORBIDDEN, API keys (user-only operation) are FORBIDDEN, outsiders do not find A.
MEMBER_MANAGEMENT = {
    OK: MANAGE_MEMBERS,
    FORBIDDEN: (BILLING, MEMBER, VIEWER, *API_KEYS),
    NOT_FOUND: (OUTSIDER,),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: The same, for changes to the OWNER role: an ADMIN is FORBIDDEN too.
OWNER_MANAGEMENT = {
    OK: MANAGE_OWNERS,
    FORBIDDEN: (ADMIN, BILLING, MEMBER, VIEWER, *API_KEYS),
    NOT_FOUND: (OUTSIDER,),
    UNAUTHENTICATED: (ANONYMOUS,),
}

OPERATIONS = [
    Operation(
        "viewer",
        "{ viewer { subject isPlatformAdmin } }",
        lambda w: {},
        ("viewer",),
        {OK: EVERYONE_SIGNED_IN, UNAUTHENTICATED: (ANONYMOUS,)},
    ),
    Operation(
        "organization",
        ORGANIZATION,
        lambda w: {"id": w.org},
        ("organization",),
        {OK: CAN_SEE_A, NULL: (OUTSIDER, FOREIGN_KEY), UNAUTHENTICATED: (ANONYMOUS,)},
    ),
    Operation(
        "node(Organization)",
        NODE,
        lambda w: {"id": w.org},
        ("node",),
        {OK: CAN_SEE_A, NULL: (OUTSIDER, FOREIGN_KEY), UNAUTHENTICATED: (ANONYMOUS,)},
    ),
    Operation(
        "Organization.apiKeys",
        ORGANIZATION_API_KEYS,
        lambda w: {"id": w.org},
        ("organization", "apiKeys"),
        {
            OK: MANAGE_MEMBERS,
            FORBIDDEN: (BILLING, MEMBER, VIEWER, *OWN_KEYS),
            NULL: (OUTSIDER, FOREIGN_KEY),
            UNAUTHENTICATED: (ANONYMOUS,),
        },
    ),
    Operation(
        "node(ApiKey)",
        NODE,
        lambda w: {"id": w.spare_key},
        ("node",),
        {
            OK: MANAGE_MEMBERS,
            NULL: (BILLING, MEMBER, VIEWER, *API_KEYS, OUTSIDER),
            UNAUTHENTICATED: (ANONYMOUS,),
        },
    ),
    Operation(
        "createOrganization",
        CREATE_ORG,
        lambda w: {"name": "New Org", "slug": None},
        ("createOrganization",),
        {OK: USERS, FORBIDDEN: API_KEYS, UNAUTHENTICATED: (ANONYMOUS,)},
    ),
    Operation(
        "addMember",
        ADD_MEMBER,
        lambda w: {"org": w.org, "subject": w.newcomer, "role": "MEMBER"},
        ("addMember",),
        MEMBER_MANAGEMENT,
    ),
    Operation(
        "addMember(role OWNER)",
        ADD_MEMBER,
        lambda w: {"org": w.org, "subject": w.newcomer, "role": "OWNER"},
        ("addMember",),
        OWNER_MANAGEMENT,
    ),
    Operation(
        "setMemberRole",
        SET_MEMBER_ROLE,
        lambda w: {"org": w.org, "subject": w.target, "role": "VIEWER"},
        ("setMemberRole",),
        MEMBER_MANAGEMENT,
    ),
    Operation(
        "setMemberRole(to OWNER)",
        SET_MEMBER_ROLE,
        lambda w: {"org": w.org, "subject": w.target, "role": "OWNER"},
        ("setMemberRole",),
        OWNER_MANAGEMENT,
    ),
    Operation(
        "setMemberRole(demote an OWNER)",
        SET_MEMBER_ROLE,
        lambda w: {"org": w.org, "subject": w.co_owner, "role": "ADMIN"},
        ("setMemberRole",),
        OWNER_MANAGEMENT,
    ),
    Operation(
        "removeMember",
        REMOVE_MEMBER,
        lambda w: {"org": w.org, "subject": w.target},
        ("removeMember",),
        MEMBER_MANAGEMENT,
    ),
    Operation(
        "removeMember(an OWNER)",
        REMOVE_MEMBER,
        lambda w: {"org": w.org, "subject": w.co_owner},
        ("removeMember",),
        OWNER_MANAGEMENT,
    ),
    Operation(
        "createApiKey",
        CREATE_API_KEY,
        lambda w: {"org": w.org, "name": "matrix", "scopes": ["tokens.consume"]},
        ("createApiKey",),
        MEMBER_MANAGEMENT,
    ),
    Operation(
        "revokeApiKey",
        REVOKE_API_KEY,
        lambda w: {"key": w.spare_key},
        ("revokeApiKey",),
        MEMBER_MANAGEMENT,
    ),
]


#: An operation on A's tokens that needs tokens.consume.
CONSUMING = {
    OK: (OWNER, ADMIN, MEMBER, KEY_CONSUME, *PLATFORM_ADMINS),
    FORBIDDEN: (BILLING, VIEWER, KEY_NO_SCOPE, KEY_VIEW, KEY_PURCHASE, KEY_CONFIGURE),
    NOT_FOUND: (OUTSIDER, FOREIGN_KEY),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: What only platform staff may do.
STAFF_ONLY = {
    OK: PLATFORM_ADMINS,
    FORBIDDEN: tuple(p for p in EVERYONE_SIGNED_IN if p not in PLATFORM_ADMINS),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: Reading A's tokens (tokens.view): a query, so "not found" is null.
VIEWING = {
    OK: (*ROLE_MEMBERS, KEY_VIEW, *PLATFORM_ADMINS),
    FORBIDDEN: (KEY_NO_SCOPE, KEY_CONSUME, KEY_PURCHASE, KEY_CONFIGURE),
    NULL: (OUTSIDER, FOREIGN_KEY),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: Fetching one of A's ledger objects by global id: invisible is null, never an error.
NODE_VIEWING = {
    OK: (*ROLE_MEMBERS, KEY_VIEW, *PLATFORM_ADMINS),
    NULL: (KEY_NO_SCOPE, KEY_CONSUME, KEY_PURCHASE, KEY_CONFIGURE, OUTSIDER, FOREIGN_KEY),
    UNAUTHENTICATED: (ANONYMOUS,),
}
WALLET = "query($id: ID!) { organization(id: $id) { wallet { balance reserved } } }"
CONSUME = """mutation($org: ID!) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: "m"}) {
  __typename ... on UserError { code } } }"""
RESERVE = """mutation($org: ID!) {
  reserveTokens(input: {organizationId: $org, amount: 1, idempotencyKey: "m"}) {
  __typename ... on UserError { code } } }"""
CAPTURE = """mutation($id: ID!) { captureReservation(input: {reservationId: $id, amount: 3}) {
  __typename ... on UserError { code } } }"""
RELEASE = """mutation($id: ID!) { releaseReservation(input: {reservationId: $id}) {
  __typename ... on UserError { code } } }"""
REFUND = """mutation($id: ID!) { refundConsumption(input: {entryId: $id, amount: 1}) {
  __typename ... on UserError { code } } }"""
GRANT = """mutation($org: ID!) { grantTokens(input: {organizationId: $org, amount: 10, reason: "goodwill"}) {
  __typename ... on UserError { code } } }"""
SET_STATUS = """mutation($org: ID!) { %s(input: {organizationId: $org, reason: "matrix"}) {
  __typename ... on UserError { code } } }"""

OPERATIONS += [
    Operation("Organization.wallet", WALLET, lambda w: {"id": w.org}, ("organization", "wallet"), VIEWING),
    Operation(
        "Organization.members",
        "query($id: ID!) { organization(id: $id) { members { subject role } } }",
        lambda w: {"id": w.org},
        ("organization", "members"),
        {
            OK: (*ROLE_MEMBERS, *PLATFORM_ADMINS),
            FORBIDDEN: OWN_KEYS,
            NULL: (OUTSIDER, FOREIGN_KEY),
            UNAUTHENTICATED: (ANONYMOUS,),
        },
    ),
    Operation("node(Reservation)", NODE, lambda w: {"id": w.reservation}, ("node",), NODE_VIEWING),
    Operation("node(LedgerEntry)", NODE, lambda w: {"id": w.consumption}, ("node",), NODE_VIEWING),
    Operation("consumeTokens", CONSUME, lambda w: {"org": w.org}, ("consumeTokens",), CONSUMING, 0),
    Operation("reserveTokens", RESERVE, lambda w: {"org": w.org}, ("reserveTokens",), CONSUMING, 0),
    Operation(
        "captureReservation", CAPTURE, lambda w: {"id": w.reservation}, ("captureReservation",), CONSUMING, 0
    ),
    Operation(
        "releaseReservation", RELEASE, lambda w: {"id": w.reservation}, ("releaseReservation",), CONSUMING, 0
    ),
    Operation(
        "refundConsumption", REFUND, lambda w: {"id": w.consumption}, ("refundConsumption",), CONSUMING, 0
    ),
    Operation("grantTokens", GRANT, lambda w: {"org": w.org}, ("grantTokens",), STAFF_ONLY),
    Operation(
        "suspendWallet",
        SET_STATUS % "suspendWallet",
        lambda w: {"org": w.org},
        ("suspendWallet",),
        STAFF_ONLY,
    ),
    # The wallet is active already: reactivating it is allowed and changes (and audits) nothing.
    Operation(
        "reactivateWallet",
        SET_STATUS % "reactivateWallet",
        lambda w: {"org": w.org},
        ("reactivateWallet",),
        STAFF_ONLY,
        0,
    ),
]


# ---------------------------------------------------------------- buying tokens (issue 4)

_codes = itertools.count()

#: Buying for A (tokens.purchase).
PURCHASING = {
    OK: (OWNER, ADMIN, BILLING, KEY_PURCHASE, *PLATFORM_ADMINS),
    FORBIDDEN: (MEMBER, VIEWER, KEY_NO_SCOPE, KEY_VIEW, KEY_CONSUME, KEY_CONFIGURE),
    NOT_FOUND: (OUTSIDER, FOREIGN_KEY),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: The world has no saved card: whoever may buy gets that far, and no further.
NO_SAVED_CARD = "PaymentMethodRequired PAYMENT_METHOD_REQUIRED"
SAVED_CARD_PURCHASING = {NO_SAVED_CARD if k == OK else k: v for k, v in PURCHASING.items()}
#: A's prices (tokens.view): a query whose answer is a list, so "not found" is an error.
PRICE_VIEWING = {
    OK: (*ROLE_MEMBERS, KEY_VIEW, *PLATFORM_ADMINS),
    FORBIDDEN: (KEY_NO_SCOPE, KEY_CONSUME, KEY_PURCHASE, KEY_CONFIGURE),
    "error NOT_FOUND": (OUTSIDER, FOREIGN_KEY),
    UNAUTHENTICATED: (ANONYMOUS,),
}
#: Staff only, on something A has not got: they find nothing to do; anyone else is refused.
STAFF_ONLY_NOTHING_THERE = {NOT_FOUND if k == OK else k: v for k, v in STAFF_ONLY.items()}
SIGNED_IN = {OK: EVERYONE_SIGNED_IN, UNAUTHENTICATED: (ANONYMOUS,)}

RESULT = "__typename ... on UserError { code }"
URLS = 'successUrl: "https://spa.example/ok", cancelUrl: "https://spa.example/no"'
PACKAGES_OF = "query($org: ID) { packages(organizationId: $org) { code priceMinor } }"
QUOTE_FOR = "query($org: ID!) { quote(organizationId: $org, tokens: 60) { priceMinor } }"
PURCHASES_OF = "query($id: ID!) { organization(id: $id) { purchases(first: 5) { edges { cursor } } } }"
START_CHECKOUT = f"""mutation($org: ID!) {{
  startCheckout(input: {{organizationId: $org, tokens: 20, {URLS}}}) {{ {RESULT} }} }}"""
SAVED_CARD = f"""mutation($org: ID!) {{
  purchaseWithSavedCard(input: {{organizationId: $org, tokens: 20, idempotencyKey: "m"}}) {{ {RESULT} }} }}"""
SETUP_CARD = f"""mutation($org: ID!) {{
  setupPaymentMethod(input: {{organizationId: $org, {URLS}}}) {{ {RESULT} }} }}"""
CREATE_PACKAGE = f"""mutation($code: String!) {{
  createTokenPackage(input: {{code: $code, name: "Matrix", tokens: 7, priceMinor: 700}}) {{ {RESULT} }} }}"""
UPDATE_PACKAGE = f"""mutation($id: ID!, $name: String!) {{
  updateTokenPackage(input: {{packageId: $id, name: $name}}) {{ {RESULT} }} }}"""
ARCHIVE_PACKAGE = f"""mutation($id: ID!) {{
  archiveTokenPackage(input: {{packageId: $id}}) {{ {RESULT} }} }}"""
SET_TIERS = f"""mutation {{ setPriceTiers(input: {{tiers: [
  {{minTokens: 1, unitPriceMinor: 100}}, {{minTokens: 50, unitPriceMinor: 90}},
  {{minTokens: 500, unitPriceMinor: 80}}
]}}) {{ {RESULT} }} }}"""
SET_ORG_PRICE = f"""mutation($org: ID!) {{
  setOrganizationPrice(input: {{organizationId: $org, discountPercent: 5}}) {{ {RESULT} }} }}"""
CLEAR_ORG_PRICE = f"""mutation($org: ID!) {{
  clearOrganizationPrice(input: {{organizationId: $org}}) {{ {RESULT} }} }}"""

#: The seeded packages' global ids in the matrix database (package code -> id).
SEEDED_PACKAGES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
async def seeded_packages(matrix_app: FastAPI) -> None:
    async with matrix_app.state.runtime.engine.connect() as connection:
        rows = await connection.execute(text("SELECT code, id FROM token_packages"))
        SEEDED_PACKAGES.update({code: str(GlobalID("TokenPackage", str(pk))) for code, pk in rows})


OPERATIONS += [
    Operation("packages", PACKAGES_OF, lambda w: {"org": None}, ("packages",), SIGNED_IN),
    Operation(
        "packages(organizationId)", PACKAGES_OF, lambda w: {"org": w.org}, ("packages",), PRICE_VIEWING
    ),
    Operation(
        "packages(includeArchived)",
        "{ packages(includeArchived: true) { code active } }",
        lambda w: {},
        ("packages",),
        STAFF_ONLY,
    ),
    Operation("quote", QUOTE_FOR, lambda w: {"org": w.org}, ("quote",), PRICE_VIEWING),
    Operation("priceTiers", "{ priceTiers { minTokens } }", lambda w: {}, ("priceTiers",), SIGNED_IN),
    Operation(
        "Organization.purchases",
        PURCHASES_OF,
        lambda w: {"id": w.org},
        ("organization", "purchases"),
        VIEWING,
    ),
    Operation(
        "organizationPrices",
        "query($org: ID!) { organizationPrices(organizationId: $org) { priceMinor } }",
        lambda w: {"org": w.org},
        ("organizationPrices",),
        STAFF_ONLY,
    ),
    Operation("startCheckout", START_CHECKOUT, lambda w: {"org": w.org}, ("startCheckout",), PURCHASING),
    Operation(
        "purchaseWithSavedCard",
        SAVED_CARD,
        lambda w: {"org": w.org},
        ("purchaseWithSavedCard",),
        SAVED_CARD_PURCHASING,
    ),
    Operation(
        "setupPaymentMethod", SETUP_CARD, lambda w: {"org": w.org}, ("setupPaymentMethod",), PURCHASING
    ),
    Operation(
        "createTokenPackage",
        CREATE_PACKAGE,
        lambda w: {"code": f"matrix-{next(_codes)}"},
        ("createTokenPackage",),
        STAFF_ONLY,
    ),
    Operation(
        "updateTokenPackage",
        UPDATE_PACKAGE,
        lambda w: {"id": SEEDED_PACKAGES["tokens-10"], "name": f"10 tokens ({next(_codes)})"},
        ("updateTokenPackage",),
        STAFF_ONLY,
    ),
    Operation(
        "archiveTokenPackage",
        ARCHIVE_PACKAGE,
        lambda w: {"id": SEEDED_PACKAGES["tokens-100"]},
        ("archiveTokenPackage",),
        STAFF_ONLY,
    ),
    Operation("setPriceTiers", SET_TIERS, lambda w: {}, ("setPriceTiers",), STAFF_ONLY),
    Operation(
        "setOrganizationPrice", SET_ORG_PRICE, lambda w: {"org": w.org}, ("setOrganizationPrice",), STAFF_ONLY
    ),
    Operation(
        "clearOrganizationPrice",
        CLEAR_ORG_PRICE,
        lambda w: {"org": w.org},
        ("clearOrganizationPrice",),
        STAFF_ONLY_NOTHING_THERE,
    ),
]


def outcome(body: dict[str, Any], path: tuple[str, ...]) -> str:
    errors = body.get("errors")
    if errors:
        codes = {str(e.get("extensions", {}).get("code", "UNCODED")) for e in errors}
        assert len(codes) == 1, body
        return f"error {codes.pop()}"
    value: Any = body["data"]
    for key in path:
        if value is None:
            return NULL
        value = value[key]
    if value is None:
        return NULL
    if isinstance(value, dict) and "code" in value:
        return f"{value['__typename']} {value['code']}"
    return OK


CASES = [
    pytest.param(op, principal, id=f"{op.name}-{principal}") for op in OPERATIONS for principal in PRINCIPALS
]


def test_every_row_gives_every_principal_exactly_one_outcome() -> None:
    for op in OPERATIONS:
        for principal in PRINCIPALS:
            op.expected(principal)
        listed = [p for principals in op.expect.values() for p in principals]
        assert sorted(listed) == sorted(PRINCIPALS), op.name


@pytest.mark.parametrize(("op", "principal"), CASES)
async def test_permission_matrix(
    matrix_app: FastAPI, matrix_client: GraphQLClient, shared_world: World, op: Operation, principal: str
) -> None:
    expected = op.expected(principal)
    changes_the_world = expected == OK and op.is_mutation
    world = await build_world(matrix_app, matrix_client) if changes_the_world else shared_world
    before = await snapshot(matrix_app)

    body = await matrix_client.raw(op.document, op.variables(world), bearer=world.bearers[principal])

    assert outcome(body, op.path) == expected, body
    after = await snapshot(matrix_app)
    if changes_the_world:
        assert len(after["audit_log"]) == len(before["audit_log"]) + op.audit_rows
    else:
        assert after == before, "a refused call (or a query) must write nothing"


# ---------------------------------------------------------------- the roles themselves

#: DESIGN.md section 5, written out.
DESIGN_TABLE = {
    Role.OWNER: {"tokens.view", "tokens.consume", "tokens.purchase", "tokens.configure", "members.manage"},
    Role.ADMIN: {"tokens.view", "tokens.consume", "tokens.purchase", "tokens.configure", "members.manage"},
    Role.BILLING: {"tokens.view", "tokens.purchase", "tokens.configure"},
    Role.MEMBER: {"tokens.view", "tokens.consume"},
    Role.VIEWER: {"tokens.view"},
}


def test_role_permissions_are_the_design_table() -> None:
    assert {role: {p.value for p in perms} for role, perms in ROLE_PERMISSIONS.items()} == DESIGN_TABLE


def test_api_key_scopes_are_every_permission_but_managing_members() -> None:
    assert {p.value for p in API_KEY_SCOPES} == {
        "tokens.view",
        "tokens.consume",
        "tokens.purchase",
        "tokens.configure",
    }
    assert Permission.MEMBERS_MANAGE not in API_KEY_SCOPES


async def test_the_world_is_as_described(matrix_client: GraphQLClient, world: World) -> None:
    query = "query($id: ID!) { organization(id: $id) { members { subject role } apiKeys { name scopes } } }"
    organization = (await matrix_client.data(query, {"id": world.org}, bearer=world.bearers[OWNER]))[
        "organization"
    ]
    members = {m["subject"]: m["role"] for m in organization["members"]}
    assert members == {
        world.subjects[OWNER]: "OWNER",
        world.co_owner: "OWNER",
        world.target: "MEMBER",
        world.subjects[ADMIN]: "ADMIN",
        world.subjects[BILLING]: "BILLING",
        world.subjects[MEMBER]: "MEMBER",
        world.subjects[VIEWER]: "VIEWER",
    }
    keys = {k["name"]: k["scopes"] for k in organization["apiKeys"]}
    assert keys == {**KEY_SCOPES, "spare": ["tokens.view"]}


async def test_each_member_sees_their_role_and_its_permissions(
    matrix_client: GraphQLClient, world: World
) -> None:
    query = "{ viewer { memberships { organization { id } role permissions } } }"
    for principal in ROLE_MEMBERS:
        data = await matrix_client.data(query, bearer=world.bearers[principal])
        [membership] = data["viewer"]["memberships"]
        assert membership["organization"]["id"] == world.org
        assert membership["role"] == principal.upper()
        assert set(membership["permissions"]) == DESIGN_TABLE[Role(principal)]


async def test_viewer_says_who_is_calling(matrix_client: GraphQLClient, world: World) -> None:
    query = "{ viewer { subject isPlatformAdmin } }"
    for principal in EVERYONE_SIGNED_IN:
        viewer = (await matrix_client.data(query, bearer=world.bearers[principal]))["viewer"]
        assert viewer["isPlatformAdmin"] is (principal in PLATFORM_ADMINS), principal
        if principal in API_KEYS:
            assert viewer["subject"].startswith("apikey:"), principal
        else:
            assert viewer["subject"] == world.subjects[principal], principal
