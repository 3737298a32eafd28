"""The audit log: written one way by every change (mutations, Stripe's events, jobs), read
through ``Organization.auditLog`` and ``node`` by owners, admins and platform staff only."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet.runtime import Runtime
from orgwallet.services import purchases
from tests.helpers import GraphQLClient, add_member, create_api_key, create_org, error_code
from tests.jobs.conftest import drain
from tests.purchasing import DECLINED_CARD, Shop, shop

__all__ = ["shop"]

OWNER = "olivia"
STAFF = "root-admin"  # listed in the test settings' platform_admins

AUDIT_LOG = """
query($org: ID!, $first: Int, $after: String, $actions: [String!], $since: DateTime, $until: DateTime) {
  organization(id: $org) {
    auditLog(first: $first, after: $after, actions: $actions, since: $since, until: $until) {
      edges { cursor node { id actor action targetType targetId requestId before after createdAt } }
      pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
    }
  }
}
"""
NODE = "query($id: ID!) { node(id: $id) { id ... on AuditEvent { action actor } } }"

ADD_ALERT = """mutation($org: ID!, $threshold: BigInt!) {
  addBalanceAlert(input: {organizationId: $org, threshold: $threshold}) { alert { id } } }"""
REMOVE_ALERT = "mutation($id: ID!) { removeBalanceAlert(input: {alertId: $id}) { alertId } }"
MARK_READ = """mutation($org: ID!) {
  markNotificationsRead(input: {organizationId: $org}) { count unreadCount } }"""
SET_EMAIL = """mutation($org: ID!, $enabled: Boolean!) {
  setEmailNotifications(input: {organizationId: $org, enabled: $enabled}) { enabled } }"""
SUSPEND = """mutation($org: ID!) { suspendWallet(input: {organizationId: $org, reason: "fraud check"}) {
  __typename ... on UserError { code } } }"""
REACTIVATE = """mutation($org: ID!) { reactivateWallet(input: {organizationId: $org, reason: "cleared"}) {
  __typename ... on UserError { code } } }"""
GRANT = """mutation($org: ID!) { grantTokens(input: {organizationId: $org, amount: 10, reason: "goodwill"}) {
  __typename ... on TokensGranted { entry { id } } ... on UserError { code } } }"""
CREATE_EXPORT = """mutation($org: ID!) {
  createExport(input: {organizationId: $org, kind: LEDGER, kinds: [CONSUMPTION]}) { url expiresAt } }"""


def node_uuid(global_id: str) -> uuid.UUID:
    return uuid.UUID(GlobalID.from_id(global_id).node_id)


async def audit_log(client: GraphQLClient, org: str, *, as_: str = OWNER, **arguments: Any) -> dict[str, Any]:
    """The connection as ``as_`` reads it (the call must succeed)."""
    data = await client.data(AUDIT_LOG, {"org": org, **arguments}, as_=as_)
    connection: dict[str, Any] = data["organization"]["auditLog"]
    return connection


async def events(client: GraphQLClient, org: str, **arguments: Any) -> list[dict[str, Any]]:
    connection = await audit_log(client, org, **{"first": 200} | arguments)
    return [edge["node"] for edge in connection["edges"]]


async def audit_count(app: FastAPI) -> int:
    async with app.state.runtime.engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM audit_log"))).scalar_one())


# ---------------------------------------------------------------- written one way


@dataclass(frozen=True)
class Change:
    """A mutation, what it needs done first, and the audit row it must add."""

    document: str
    caller: str
    action: str
    target_type: str
    before: Callable[[dict[str, Any]], Any]
    after: Callable[[dict[str, Any]], Any]
    prepare: Callable[[GraphQLClient, str], Awaitable[dict[str, Any]]] | None = None


async def _with_alert(client: GraphQLClient, org: str) -> dict[str, Any]:
    data = await client.data(ADD_ALERT, {"org": org, "threshold": 500}, as_=OWNER)
    return {"id": data["addBalanceAlert"]["alert"]["id"]}


async def _with_a_notification(client: GraphQLClient, org: str) -> dict[str, Any]:
    await client.data(SUSPEND, {"org": org}, as_=STAFF)  # tells the organization
    return {}


async def _suspended(client: GraphQLClient, org: str) -> dict[str, Any]:
    await client.data(SUSPEND, {"org": org}, as_=STAFF)
    return {}


CHANGES = {
    "addBalanceAlert": Change(
        ADD_ALERT, OWNER, "balance_alert.add", "balance_alert", lambda v: None, lambda v: {"threshold": 40}
    ),
    "removeBalanceAlert": Change(
        REMOVE_ALERT,
        OWNER,
        "balance_alert.remove",
        "balance_alert",
        lambda v: {"threshold": 500},
        lambda v: None,
        _with_alert,
    ),
    "markNotificationsRead": Change(
        MARK_READ,
        OWNER,
        "notifications.mark_read",
        "notifications",
        lambda v: None,
        lambda v: {"count": 1, "ids": None},
        _with_a_notification,
    ),
    "setEmailNotifications": Change(
        SET_EMAIL,
        OWNER,
        "member.email_notifications",
        "member",
        lambda v: {"email_notifications": True},
        lambda v: {"email_notifications": False},
    ),
    "suspendWallet": Change(
        SUSPEND,
        STAFF,
        "wallet.suspend",
        "wallet",
        lambda v: {"status": "active"},
        lambda v: {"status": "suspended", "reason": "fraud check"},
    ),
    "reactivateWallet": Change(
        REACTIVATE,
        STAFF,
        "wallet.reactivate",
        "wallet",
        lambda v: {"status": "suspended"},
        lambda v: {"status": "active", "reason": "cleared"},
        _suspended,
    ),
    "grantTokens": Change(
        GRANT,
        STAFF,
        "wallet.grant",
        "wallet",
        lambda v: None,
        lambda v: {
            "amount": 10,
            "reason": "goodwill",
            "entry": str(node_uuid(v["grantTokens"]["entry"]["id"])),
        },
    ),
    "createExport": Change(
        CREATE_EXPORT,
        OWNER,
        "export.create",
        "export",
        lambda v: None,
        lambda v: {
            "kind": "ledger",
            "since": None,
            "until": None,
            "filter": ["consumption"],
            "expires_at": datetime.fromisoformat(v["createExport"]["expiresAt"]).isoformat(),
        },
    ),
}


class TestOneRowPerChange:
    @pytest.mark.parametrize("name", list(CHANGES))
    async def test_a_mutation_writes_one_row_with_its_change_and_request_id(
        self, client: GraphQLClient, app: FastAPI, name: str
    ) -> None:
        change = CHANGES[name]
        org = await create_org(client, OWNER)
        variables: dict[str, Any] = {"org": org, "threshold": 40, "enabled": False}
        if change.prepare is not None:
            variables |= await change.prepare(client, org)
        count = await audit_count(app)
        request_id = f"req-{name}"

        body = await client.raw(
            change.document, variables, as_=change.caller, headers={"X-Request-ID": request_id}
        )

        assert not body.get("errors"), body
        assert await audit_count(app) == count + 1
        [event] = await events(client, org, first=1)
        assert event["action"] == change.action
        assert (event["actor"], event["requestId"], event["targetType"]) == (
            change.caller,
            request_id,
            change.target_type,
        )
        assert event["before"] == change.before(body["data"])
        assert event["after"] == change.after(body["data"])

    async def test_a_change_that_changes_nothing_writes_nothing(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, OWNER)
        count = await audit_count(app)
        body = await client.raw(MARK_READ, {"org": org}, as_=OWNER)  # nothing unread
        assert body["data"]["markNotificationsRead"]["count"] == 0
        body = await client.raw(SET_EMAIL, {"org": org, "enabled": True}, as_=OWNER)  # on already
        assert body["data"]["setEmailNotifications"]["enabled"] is True
        assert await audit_count(app) == count


class TestStripeAndJobs:
    async def test_a_webhook_writes_as_stripe_with_the_event_id(
        self, shop: Shop, client: GraphQLClient
    ) -> None:
        purchase, url = await shop.checkout(package="tokens-50")
        page = await shop.press(url, "pay", DECLINED_CARD)
        assert page.status_code == 402
        await shop.drain()
        await shop.pay(url)

        declined, paid = reversed(
            await events(
                client, shop.org, actions=["purchase.attempt_declined", "purchase.paid"], as_=shop.owner
            )
        )
        failed_events = await shop.sql(
            "SELECT event_id FROM stripe_events WHERE outcome = 'attempt_declined'"
        )
        paid_events = await shop.sql("SELECT event_id FROM stripe_events WHERE outcome = 'credited'")
        assert (declined["actor"], declined["requestId"]) == ("stripe", failed_events[0].event_id)
        assert "declined" in declined["after"]["failure_reason"]
        assert (paid["actor"], paid["requestId"]) == ("stripe", paid_events[0].event_id)
        assert paid["targetId"] == str(node_uuid(purchase["id"]))
        assert (paid["before"]["status"], paid["after"]["status"]) == ("pending", "paid")
        assert paid["after"]["stripe_event"] == paid_events[0].event_id
        assert paid["after"]["lot_id"] != "None"

    async def test_a_job_writes_as_system_with_the_job_id(
        self, client: GraphQLClient, app: FastAPI, runtime: Runtime
    ) -> None:
        org = await create_org(client, OWNER)  # 3 trial tokens
        await client.data(ADD_ALERT, {"org": org, "threshold": 10}, as_=OWNER)  # asks for an evaluation

        await drain(runtime)  # the wallet-change signal's job fires the alert

        [fired] = await events(client, org, actions=["balance_alert.fire"])
        assert fired["actor"] == "system:balance-alerts"
        assert re.fullmatch(r"job:\d+", fired["requestId"]), fired["requestId"]
        assert fired["before"] == {"armed": True, "fired_count": 0}
        assert fired["after"] == {"armed": False, "fired_count": 1, "balance": 3, "threshold": 10}

    async def test_a_duty_writes_one_row_per_purchase_it_removes(
        self, client: GraphQLClient, app: FastAPI, runtime: Runtime
    ) -> None:
        org = await create_org(client, OWNER)
        async with app.state.runtime.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO purchases (organization_id, tokens, amount_minor, currency, status, method,"
                    " created_by, created_at) VALUES (:org, 10, 1000, 'USD', 'pending', 'checkout', :by,"
                    " now() - interval '2 hours')"
                ),
                {"org": node_uuid(org), "by": OWNER},
            )

        assert await purchases.remove_abandoned(runtime.sessions, datetime.now(UTC)) == 1

        [removed] = await events(client, org, actions=["purchase.remove_abandoned"])
        assert removed["actor"] == "system:purchases.abandoned"
        assert (removed["before"]["status"], removed["before"]["tokens"]) == ("pending", 10)
        assert removed["after"] is None


@pytest.fixture
def runtime(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


# ---------------------------------------------------------------- reading


async def busy_org(client: GraphQLClient, changes: int = 6) -> str:
    """An organization with ``changes`` alert additions after its creation."""
    org = await create_org(client, OWNER)
    for threshold in range(1, changes + 1):
        await client.data(ADD_ALERT, {"org": org, "threshold": threshold * 100}, as_=OWNER)
    return org


class TestFilters:
    async def test_actions_since_and_until(self, client: GraphQLClient) -> None:
        org = await busy_org(client, changes=4)
        await add_member(client, org, subject="mia", role="MEMBER", as_=OWNER)
        everything = await events(client, org)
        assert [e["action"] for e in everything] == ["member.add"] + ["balance_alert.add"] * 4 + [
            "organization.create"
        ]
        times = [datetime.fromisoformat(e["createdAt"]) for e in everything]
        assert times == sorted(times, reverse=True)

        alerts = await events(client, org, actions=["balance_alert.add"])
        assert alerts == everything[1:5]
        several = await events(client, org, actions=["member.add", "organization.create"])
        assert several == [everything[0], everything[5]]
        assert await events(client, org, actions=["nothing.like.this"]) == []

        since, until = everything[4]["createdAt"], everything[1]["createdAt"]
        assert await events(client, org, since=since) == everything[:5]
        assert await events(client, org, until=until) == everything[2:]
        assert await events(client, org, since=since, until=until) == everything[2:5]
        assert (
            await events(client, org, actions=["balance_alert.add"], since=since, until=until)
            == everything[2:5]
        )

    @pytest.mark.parametrize(
        ("arguments", "field"),
        [
            ({"first": 0}, "first"),
            ({"first": 201}, "first"),
            ({"after": "bm90IGEgY3Vyc29y"}, "after"),
            ({"since": "2027-01-01T00:00:00"}, "since"),
            ({"since": "2027-01-02T00:00:00Z", "until": "2027-01-01T00:00:00Z"}, "until"),
            ({"actions": [""]}, "actions"),
        ],
    )
    async def test_bad_arguments_are_typed_errors(
        self, client: GraphQLClient, arguments: dict[str, Any], field: str
    ) -> None:
        org = await create_org(client, OWNER)
        body = await client.raw(AUDIT_LOG, {"org": org, **arguments}, as_=OWNER)
        [error] = body["errors"]
        assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": field}, error


class TestPages:
    async def test_pages_have_no_overlap_no_gap_and_hold_while_rows_arrive(
        self, client: GraphQLClient
    ) -> None:
        org = await busy_org(client, changes=6)
        everything = await events(client, org)
        assert len(everything) == 7

        seen: list[dict[str, Any]] = []
        after = None
        pages = 0
        while True:
            page = await audit_log(client, org, first=2, after=after)
            seen += [edge["node"] for edge in page["edges"]]
            assert page["pageInfo"]["hasPreviousPage"] is (after is not None)
            pages += 1
            # A change arrives between pages: it is newer than every page already read.
            await client.data(ADD_ALERT, {"org": org, "threshold": 10_000 + pages}, as_=OWNER)
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
            assert after == page["edges"][-1]["cursor"]

        assert pages == 4
        assert seen == everything
        newest = await events(client, org, first=4)
        assert [e["after"]["threshold"] for e in newest[:4]] == [10_004, 10_003, 10_002, 10_001]


# ---------------------------------------------------------------- who reads it

ROLES = {"owner": "OWNER", "admin": "ADMIN", "bill": "BILLING", "mia": "MEMBER", "vic": "VIEWER"}


class TestWhoReads:
    async def test_owners_admins_and_staff_read_the_others_are_refused(self, client: GraphQLClient) -> None:
        org = await create_org(client, "owner")
        for subject, role in ROLES.items():
            if role != "OWNER":
                await add_member(client, org, subject=subject, role=role, as_="owner")
        _, key = await create_api_key(
            client,
            org,
            scopes=["tokens.view", "tokens.consume", "tokens.purchase", "tokens.configure"],
            as_="owner",
        )
        other = await create_org(client, "stranger", name="Other")
        _, foreign_key = await create_api_key(client, other, scopes=["tokens.view"], as_="stranger")

        outcomes = {}
        for caller in [*ROLES, STAFF, "stranger"]:
            body = await client.raw(AUDIT_LOG, {"org": org, "first": 5}, as_=caller)
            outcomes[caller] = error_code(body, "organization") or (
                "null" if body["data"]["organization"] is None else "ok"
            )
        for name, bearer in (("key", key), ("foreign key", foreign_key)):
            body = await client.raw(AUDIT_LOG, {"org": org, "first": 5}, bearer=bearer)
            outcomes[name] = error_code(body, "organization") or (
                "null" if body["data"]["organization"] is None else "ok"
            )

        assert outcomes == {
            "owner": "ok",
            "admin": "ok",
            STAFF: "ok",
            "bill": "FORBIDDEN",
            "mia": "FORBIDDEN",
            "vic": "FORBIDDEN",
            "key": "FORBIDDEN",  # no API key scope reads the audit log
            "stranger": "null",  # another organization: as if it did not exist
            "foreign key": "null",
        }

    async def test_node_answers_whoever_may_read_the_log_and_null_to_the_rest(
        self, client: GraphQLClient
    ) -> None:
        org = await create_org(client, OWNER)
        await add_member(client, org, subject="mia", role="MEMBER", as_=OWNER)
        await create_org(client, "stranger", name="Other")
        [newest, *_] = await events(client, org)

        answers = {}
        for caller in (OWNER, STAFF, "mia", "stranger"):
            answers[caller] = (await client.data(NODE, {"id": newest["id"]}, as_=caller))["node"]

        assert answers[OWNER] == {"id": newest["id"], "action": "member.add", "actor": OWNER}
        assert answers[STAFF] == answers[OWNER]
        assert answers["mia"] is None
        assert answers["stranger"] is None
        missing = GlobalID("AuditEvent", str(uuid.uuid4()))
        assert (await client.data(NODE, {"id": str(missing)}, as_=OWNER))["node"] is None
