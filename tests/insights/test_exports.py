"""CSV exports: createExport's signed link, downloaded without credentials, over ASGI and over a
real socket; the file matches the GraphQL list with the same filters; the link is bound to its
terms, expires on the runtime's clock and dies with its creator's access; the file streams."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import re
import socket
import uuid
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from strawberry.relay import GlobalID

from orgwallet.clock import ManualClock
from orgwallet.config import Settings
from orgwallet.services import exports
from tests.helpers import GraphQLClient, add_member, create_api_key, create_org, error_code
from tests.purchasing import Shop, shop

__all__ = ["shop"]

OWNER = "olivia"
STAFF = "root-admin"
BOM = "\ufeff"

CREATE_EXPORT = """
mutation($input: CreateExportInput!) { createExport(input: $input) { url expiresAt } }
"""
GRANT = """mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "stock"}) { __typename } }"""
CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!, $reason: String, $metadata: JSON) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, reason: $reason,
                        metadata: $metadata}) { __typename }
}
"""
LEDGER = """
query($org: ID!, $kinds: [LedgerEntryKind!], $since: DateTime, $until: DateTime) {
  organization(id: $org) { wallet { ledger(first: 500, kinds: $kinds, since: $since, until: $until) {
    edges { node { id kind amount heldChange balanceAfter reservedAfter reason idempotencyKey actor metadata
                   createdAt } } } } }
}
"""
PURCHASES = """
query($org: ID!, $status: [PurchaseStatus!]) {
  organization(id: $org) { purchases(first: 500, status: $status) { edges { node {
    id reference createdAt paidAt status method tokens amountMinor currency package { code } refundedMinor
    tokensClawedBack shortfall failureReason receiptUrl dispute { status } } } } }
}
"""
AUDIT = """
query($org: ID!, $actions: [String!], $since: DateTime, $until: DateTime) {
  organization(id: $org) { auditLog(first: 200, actions: $actions, since: $since, until: $until) {
    edges { node { id createdAt actor action targetType targetId requestId before after } } } }
}
"""
REMOVE_MEMBER = """mutation($org: ID!, $subject: String!) {
  removeMember(input: {organizationId: $org, subject: $subject}) { __typename } }"""
REVOKE = "mutation($key: ID!) { revokeApiKey(input: {apiKeyId: $key}) { __typename } }"

#: Cells a spreadsheet must show as written: a comma, a quote, non-ASCII; and a line break,
#: which the API refuses in a reason but the file must carry (a row written by another path).
TRICKY = 'Hello, "world", naïve café ✓ 日本'
MULTILINE = 'first line\nsecond line, "quoted"'


def node_uuid(global_id: str) -> str:
    return GlobalID.from_id(global_id).node_id


def iso(value: str | None) -> datetime | None:
    return None if value in (None, "") else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def parse(body: bytes) -> list[dict[str, str]]:
    """The file as a spreadsheet reads it: UTF-8 after its byte order mark, CSV, a header row."""
    assert body.startswith(BOM.encode())
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline="")))


async def export(client: GraphQLClient, org: str, kind: str, *, as_: str = OWNER, **filters: Any) -> str:
    data = await client.data(
        CREATE_EXPORT, {"input": {"organizationId": org, "kind": kind, **filters}}, as_=as_
    )
    url: str = data["createExport"]["url"]
    return url


async def download(client: GraphQLClient, url: str) -> httpx.Response:
    """A browser's GET: no Authorization header."""
    response = await client.http.get(url)
    assert "authorization" not in {k.lower() for k in response.request.headers}
    return response


async def spend(
    client: GraphQLClient, org: str, amount: int, *, reason: str | None = None, **extra: Any
) -> None:
    variables = {"org": org, "amount": amount, "key": f"k-{uuid.uuid4()}", "reason": reason, **extra}
    result = (await client.data(CONSUME, variables, as_=OWNER))["consumeTokens"]
    assert result["__typename"] == "TokensConsumed", result


async def stocked_org(client: GraphQLClient, app: FastAPI) -> str:
    org = await create_org(client, OWNER)
    await client.data(GRANT, {"org": org, "amount": 1000}, as_=STAFF)
    await spend(client, org, 5, reason=TRICKY, metadata={"note": 'naïve, "quoted"', "n": [1, 2]})
    await spend(client, org, 7, reason='=HYPERLINK("http://evil")')
    await spend(client, org, 3, reason="-2+3")
    await spend(client, org, 2)
    await seed_consumptions(app, org, 1, reason=MULTILINE)
    return org


def ledger_cells(node: dict[str, Any]) -> dict[str, Any]:
    def guarded(value: str | None) -> str:
        return "" if value is None else ("'" + value if value[:1] in "=+-@" else value)

    return {
        "id": node_uuid(node["id"]),
        "created_at": iso(node["createdAt"]),
        "kind": node["kind"],
        "amount": str(node["amount"]),
        "held_change": str(node["heldChange"]),
        "balance_after": str(node["balanceAfter"]),
        "reserved_after": str(node["reservedAfter"]),
        "reason": guarded(node["reason"]),
        "idempotency_key": guarded(node["idempotencyKey"]),
        "actor": guarded(node["actor"]),
        "metadata": node["metadata"],
    }


def ledger_row(row: dict[str, str]) -> dict[str, Any]:
    cells: dict[str, Any] = {k: v for k, v in row.items() if k != "seq"}
    cells["created_at"] = iso(row["created_at"])
    cells["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    return cells


class TestLedger:
    @pytest.mark.parametrize(
        "filters",
        [{}, {"kinds": ["CONSUMPTION"]}, {"kinds": ["ADMIN_GRANT", "TRIAL_GRANT"]}, {"window": True}],
    )
    async def test_the_file_is_the_list_with_the_same_filters(
        self, client: GraphQLClient, app: FastAPI, filters: dict[str, Any]
    ) -> None:
        org = await stocked_org(client, app)
        if filters.pop("window", False):
            nodes = (await client.data(LEDGER, {"org": org}, as_=OWNER))["organization"]["wallet"]["ledger"][
                "edges"
            ]
            filters = {"since": nodes[3]["node"]["createdAt"], "until": nodes[0]["node"]["createdAt"]}
        listed = (await client.data(LEDGER, {"org": org, **filters}, as_=OWNER))["organization"]["wallet"][
            "ledger"
        ]

        response = await download(client, await export(client, org, "LEDGER", **filters))

        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert re.fullmatch(
            r'attachment; filename="orgwallet-acme-ledger-\d{8}T\d{6}Z\.csv"',
            response.headers["content-disposition"],
        )
        assert response.headers["cache-control"] == "no-store"
        rows = parse(response.content)
        assert response.content.decode("utf-8-sig").splitlines()[0] == ",".join(
            exports.HEADERS[exports.ExportKind.LEDGER]
        )
        assert [ledger_row(r) for r in rows] == [ledger_cells(e["node"]) for e in listed["edges"]]
        seqs = [int(r["seq"]) for r in rows]
        assert seqs == sorted(seqs, reverse=True)
        assert rows or filters

    async def test_cells_survive_a_spreadsheet(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await stocked_org(client, app)
        body = (await download(client, await export(client, org, "LEDGER", kinds=["CONSUMPTION"]))).content
        text_body = body.decode("utf-8-sig")
        rows = parse(body)

        # Newest first: the seeded row, then the consumptions in reverse.
        assert [r["amount"] for r in rows] == ["-1", "-2", "-3", "-7", "-5"]  # whole numbers, signed
        seeded, plain, minus, formula, tricky = rows
        assert tricky["reason"] == TRICKY  # a comma, quotes, UTF-8: quoted, intact
        assert '"Hello, ""world"", naïve café ✓ 日本"' in text_body
        assert seeded["reason"] == MULTILINE  # a line break inside a quoted cell
        assert '"first line\nsecond line, ""quoted"""' in text_body
        assert json.loads(tricky["metadata"]) == {"note": 'naïve, "quoted"', "n": [1, 2]}
        assert tricky["metadata"] == '{"n":[1,2],"note":"naïve, \\"quoted\\""}'  # compact (jsonb's key order)
        # What a spreadsheet would run as a formula is shown as text.
        assert formula["reason"] == '\'=HYPERLINK("http://evil")'
        assert minus["reason"] == "'-2+3"
        assert (plain["reason"], plain["metadata"]) == ("", "")
        for row in rows:
            created = iso(row["created_at"])
            assert row["created_at"].endswith("Z") and created is not None and created.tzinfo is not None
        assert (
            text_body.count("\r\n") == len(rows) + 1
        )  # RFC 4180 line ends; the line break in a cell stays \n


class TestPurchasesAndAuditLog:
    async def test_purchases_match_the_list(self, shop: Shop, client: GraphQLClient) -> None:
        _, paid_url = await shop.checkout(package="tokens-50")
        await shop.pay(paid_url)
        await shop.checkout(package="tokens-10")  # left PENDING
        _, paid_url = await shop.checkout(tokens=7)
        await shop.pay(paid_url)

        for status in (None, ["PAID"]):
            listed = (await client.data(PURCHASES, {"org": shop.org, "status": status}, as_=shop.owner))[
                "organization"
            ]["purchases"]["edges"]
            filters = {} if status is None else {"statuses": status}
            response = await download(
                client, await export(client, shop.org, "PURCHASES", as_=shop.owner, **filters)
            )
            rows = parse(response.content)

            assert len(rows) == len(listed) == (3 if status is None else 2)
            if status is None:
                everything = listed
            for row, edge in zip(rows, listed, strict=True):
                node = edge["node"]
                assert row["id"] == node_uuid(node["id"])
                assert (row["reference"], row["status"], row["method"]) == (
                    node["reference"],
                    node["status"],
                    node["method"],
                )
                assert (int(row["tokens"]), int(row["amount_minor"]), row["currency"]) == (
                    node["tokens"],
                    node["amountMinor"],
                    node["currency"],
                )
                assert row["package"] == ((node["package"] or {}).get("code") or "")
                assert iso(row["created_at"]) == iso(node["createdAt"])
                assert iso(row["paid_at"]) == iso(node["paidAt"])
                assert row["receipt_url"] == (node["receiptUrl"] or "")

        # since/until: the purchases created in [since, until), whatever their status.
        created = [iso(e["node"]["createdAt"]) for e in everything]
        since, until = created[2], created[0]
        assert since is not None and until is not None
        window = {"since": since.isoformat(), "until": until.isoformat()}
        url = await export(client, shop.org, "PURCHASES", as_=shop.owner, **window)
        rows = parse((await download(client, url)).content)
        assert [iso(r["created_at"]) for r in rows] == created[1:]

    async def test_the_audit_log_matches_the_list(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await stocked_org(client, app)
        await add_member(client, org, subject="mia", role="MEMBER", as_=OWNER)
        await add_member(client, org, subject="=cmd|' /C calc'!A0", role="VIEWER", as_=OWNER)
        choices: list[dict[str, Any]] = [{}, {"actions": ["member.add"]}]
        for filters in choices:
            listed = (await client.data(AUDIT, {"org": org, **filters}, as_=OWNER))["organization"][
                "auditLog"
            ]["edges"]
            rows = parse((await download(client, await export(client, org, "AUDIT_LOG", **filters))).content)
            # The export's own row (export.create) is newer than the list read before it.
            if not filters:
                assert rows[0]["action"] == "export.create"
                rows = rows[1:]
            assert len(rows) == len(listed)
            for row, edge in zip(rows, listed, strict=True):
                node = edge["node"]
                assert row["id"] == node_uuid(node["id"])
                assert iso(row["created_at"]) == iso(node["createdAt"])
                assert (row["actor"], row["action"], row["target_type"]) == (
                    node["actor"],
                    node["action"],
                    node["targetType"],
                )
                target = node["targetId"] or ""
                assert row["target_id"] == ("'" + target if target.startswith("=") else target)
                assert row["request_id"] == (node["requestId"] or "")
                assert (json.loads(row["before"] or "null"), json.loads(row["after"] or "null")) == (
                    node["before"],
                    node["after"],
                )
        assert [r["action"] for r in rows] == ["member.add", "member.add"]
        assert rows[0]["target_id"] == "'=cmd|' /C calc'!A0"


class TestTheLink:
    async def test_it_opens_until_it_expires_on_the_runtime_clock(
        self, client: GraphQLClient, app: FastAPI, settings: Settings
    ) -> None:
        clock = ManualClock(datetime.now(UTC))
        app.state.runtime.clock = clock
        org = await stocked_org(client, app)
        data = await client.data(
            CREATE_EXPORT, {"input": {"organizationId": org, "kind": "LEDGER"}}, as_=OWNER
        )
        url, expires_at = data["createExport"]["url"], iso(data["createExport"]["expiresAt"])
        assert url.startswith(f"{settings.public_url}/exports/")
        assert expires_at is not None
        assert timedelta(seconds=299) <= expires_at - clock.now() <= timedelta(seconds=300)

        clock.set(expires_at - timedelta(seconds=1))
        assert (await download(client, url)).status_code == 200
        clock.set(expires_at)
        expired = await download(client, url)
        assert (expired.status_code, expired.headers["content-type"]) == (410, "text/plain; charset=utf-8")
        assert "expired" in expired.text and "," not in expired.text

    @pytest.mark.parametrize(
        "tamper",
        [
            "another organization",
            "another kind",
            "another expiry",
            "another filter",
            "another signer",
            "garbage",
        ],
    )
    async def test_a_tampered_link_opens_nothing(
        self, client: GraphQLClient, app: FastAPI, settings: Settings, tamper: str
    ) -> None:
        org = await stocked_org(client, app)
        other = await create_org(client, OWNER, name="Other")
        url = await export(client, org, "LEDGER", kinds=["CONSUMPTION"])
        token = url.rsplit("/", 1)[1]
        body, signature = token.split(".")
        terms = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        changed = {
            "another organization": {"o": node_uuid(other)},
            "another kind": {"k": "audit_log"},
            "another expiry": {"e": terms["e"] + 3600},
            "another filter": {"f": None},
        }.get(tamper)
        if changed is not None:
            forged_body = base64.urlsafe_b64encode(orjson.dumps(terms | changed)).rstrip(b"=").decode()
            forged = f"{forged_body}.{signature}"
        elif tamper == "another signer":
            forged = exports.sign(
                "a secret that is not the installation's", exports.verify(settings.signing_secret, token)
            )
        else:
            forged = "not-a-token"

        response = await download(client, url.replace(token, forged))

        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/plain")
        assert "," not in response.text  # no data
        assert (await download(client, url)).status_code == 200  # the real one still opens

    async def test_it_dies_with_its_creators_access(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await stocked_org(client, app)
        await add_member(client, org, subject="vic", role="VIEWER", as_=OWNER)
        key_id, key = await create_api_key(client, org, scopes=["tokens.view"], as_=OWNER)
        by_viewer = await export(client, org, "LEDGER", as_="vic")
        data = await client.data(
            CREATE_EXPORT, {"input": {"organizationId": org, "kind": "PURCHASES"}}, bearer=key
        )
        by_key = data["createExport"]["url"]
        assert (await download(client, by_viewer)).status_code == 200
        assert (await download(client, by_key)).status_code == 200

        await client.data(REMOVE_MEMBER, {"org": org, "subject": "vic"}, as_=OWNER)
        await client.data(REVOKE, {"key": key_id}, as_=OWNER)

        assert (await download(client, by_viewer)).status_code == 403
        assert (await download(client, by_key)).status_code == 403


class TestWhoCreates:
    async def test_the_lists_permissions_decide(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, OWNER)
        for subject, role in (("adam", "ADMIN"), ("bill", "BILLING"), ("vic", "VIEWER")):
            await add_member(client, org, subject=subject, role=role, as_=OWNER)
        _, viewing_key = await create_api_key(client, org, scopes=["tokens.view"], as_=OWNER)
        _, spending_key = await create_api_key(client, org, scopes=["tokens.consume"], as_=OWNER)
        await create_org(client, "stranger", name="Other")

        async def outcome(kind: str, **caller: Any) -> str:
            before = await audit_rows(app)
            body = await client.raw(CREATE_EXPORT, {"input": {"organizationId": org, "kind": kind}}, **caller)
            code = error_code(body, "createExport")
            if code is not None:
                assert await audit_rows(app) == before  # refused: nothing written
                return code
            assert await audit_rows(app) == before + 1
            return "ok"

        assert {
            who: (await outcome("LEDGER", **caller), await outcome("AUDIT_LOG", **caller))
            for who, caller in {
                "owner": {"as_": OWNER},
                "admin": {"as_": "adam"},
                "billing": {"as_": "bill"},
                "viewer": {"as_": "vic"},
                "staff": {"as_": STAFF},
                "stranger": {"as_": "stranger"},
                "viewing key": {"bearer": viewing_key},
                "spending key": {"bearer": spending_key},
                "nobody": {},
            }.items()
        } == {
            "owner": ("ok", "ok"),
            "admin": ("ok", "ok"),
            "billing": ("ok", "FORBIDDEN"),
            "viewer": ("ok", "FORBIDDEN"),
            "staff": ("ok", "ok"),
            "stranger": ("NOT_FOUND", "NOT_FOUND"),
            "viewing key": ("ok", "FORBIDDEN"),
            "spending key": ("FORBIDDEN", "FORBIDDEN"),
            "nobody": ("UNAUTHENTICATED", "UNAUTHENTICATED"),
        }

    @pytest.mark.parametrize(
        ("extra", "field"),
        [
            ({"kind": "PURCHASES", "kinds": ["CONSUMPTION"]}, "kinds"),
            ({"kind": "LEDGER", "statuses": ["PAID"]}, "statuses"),
            ({"kind": "LEDGER", "actions": ["member.add"]}, "actions"),
            ({"kind": "AUDIT_LOG", "actions": [""]}, "actions"),
            ({"kind": "LEDGER", "since": "2027-01-01T00:00:00"}, "since"),
            ({"kind": "LEDGER", "since": "2027-01-02T00:00:00Z", "until": "2027-01-01T00:00:00Z"}, "until"),
            ({"kind": "LEDGER", "organizationId": "nonsense"}, "organizationId"),
        ],
    )
    async def test_bad_input_is_a_typed_error_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, extra: dict[str, Any], field: str
    ) -> None:
        org = await create_org(client, OWNER)
        before = await audit_rows(app)
        body = await client.raw(CREATE_EXPORT, {"input": {"organizationId": org, **extra}}, as_=OWNER)
        [error] = body["errors"]
        assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": field}, error
        assert await audit_rows(app) == before


async def audit_rows(app: FastAPI) -> int:
    async with app.state.runtime.engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM audit_log"))).scalar_one())


# ---------------------------------------------------------------- streaming

SEEDED = 200_000


async def seed_consumptions(app: FastAPI, org: str, count: int, *, reason: str = "seeded") -> None:
    """``count`` consumptions of one token written straight into the ledger with
    ``generate_series``: a history the API would take minutes to write."""
    async with app.state.runtime.engine.begin() as connection:
        await connection.execute(
            text(
                """
                WITH w AS (
                    UPDATE wallets SET entry_seq = entry_seq + :n,
                                       balance = balance + :n, lifetime_granted = lifetime_granted + :n
                    WHERE organization_id = :org RETURNING id, entry_seq - :n AS seq, balance - :n AS balance
                )
                INSERT INTO ledger_entries (wallet_id, seq, kind, amount, balance_after, reserved_after,
                                            idempotency_key, reason, actor)
                SELECT w.id, w.seq + i, 'consumption', -1, w.balance + :n - i, 0,
                       'seed-' || w.seq + i, :reason, 'seed'
                FROM w, generate_series(1, :n) AS i
                """
            ),
            {"n": count, "org": uuid.UUID(node_uuid(org)), "reason": reason},
        )


def exported_rows(kind: str = "ledger") -> float:
    return REGISTRY.get_sample_value("orgwallet_export_rows_total", {"kind": kind}) or 0.0


class TestStreaming:
    async def test_the_first_bytes_leave_before_the_rows_are_read(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, OWNER)
        await seed_consumptions(app, org, SEEDED)
        path = urlsplit(await export(client, org, "LEDGER")).path
        start = exported_rows()
        chunks: list[bytes] = []
        read_when: list[float] = []
        disconnected = asyncio.Event()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                read_when.append(exported_rows() - start)
                if len(chunks) == 3:
                    disconnected.set()  # the browser goes away after three chunks

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "server": ("test", 80),
            "client": ("127.0.0.1", 50000),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=60)

        # The header row left before any row was read, then one page per chunk.
        assert read_when[:3] == [0, exports.PAGE_ROWS, 2 * exports.PAGE_ROWS]
        assert chunks[0].decode("utf-8-sig").startswith("id,seq,created_at,kind,amount")
        # The browser left: the rest was never read.
        assert exported_rows() - start <= 4 * exports.PAGE_ROWS

    async def test_over_a_real_socket(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, OWNER)
        await seed_consumptions(app, org, SEEDED)
        path = urlsplit(await export(client, org, "LEDGER")).path

        async with serving(app) as base, httpx.AsyncClient(base_url=base, timeout=60) as browser:
            start = exported_rows()
            async with browser.stream("GET", path) as response:
                assert response.status_code == 200
                first = await anext(response.aiter_raw())
                assert first.startswith(BOM.encode() + b"id,seq,created_at")
                assert exported_rows() - start < SEEDED  # streamed: not all read before the first byte
            # and whole, when read to the end:
            response = await browser.get(path)
            rows = parse(response.content)
        assert len(rows) == SEEDED + 1  # the seeded history and the trial grant
        assert [int(r["seq"]) for r in rows[:2]] == [SEEDED + 1, SEEDED]


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class serving:
    """The app served by uvicorn on a loopback socket, in this event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.server = _Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        self.socket.bind(("127.0.0.1", 0))
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        await asyncio.wait_for(self.server.listening.wait(), timeout=30)
        host, port = self.socket.getsockname()
        return f"http://{host}:{port}"

    async def __aexit__(self, *_: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task
        self.socket.close()
