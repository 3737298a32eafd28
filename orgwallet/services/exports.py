"""CSV exports of an organization's ledger, purchases and audit log, through short-lived links.

``create_export`` (the ``createExport`` mutation) checks that the caller may read what is
exported, records ``export.create`` in the audit log and returns ``<public_url>/exports/<token>``,
a link a browser opens without an Authorization header. The token carries the export's terms
(organization, kind, filters, who asked, expiry) and an HMAC of them keyed with the
installation's signing secret under a purpose of its own, so a JWT signed with the same secret
never passes for a link, nor the reverse. Changing any term (another organization, kind,
filter or expiry) breaks the signature.

The download (``GET /exports/<token>``, ``export_route``) checks the signature, the expiry on the
runtime's clock, that the organization still exists and that whoever asked still may read it:
a person still a member whose role has the right (platform staff: as signed, for the link's
few minutes), an API key not revoked that still holds the scope. Then it streams the file: a
UTF-8 byte order mark (Excel reads the file as UTF-8 only with it; other spreadsheets skip it)
and the header row at once, then keyset pages read on the driver, newest first like the
GraphQL lists, each page on a connection taken for it and given back. Memory stays flat
whatever the size, a slow download holds no database connection, and rows that arrive during
the download are not in it (the first page fixes the newest row).

Cells: times in ISO 8601 UTC (``2027-01-31T12:00:00.000000Z``), amounts as whole numbers,
enums as in GraphQL (``CONSUMPTION``), JSON as compact JSON text, quoting by the standard
library's ``csv`` writer (RFC 4180, CRLF line ends). Free text that a spreadsheet would run as
a formula (a leading ``=``, ``+``, ``-``, ``@``, tab or carriage return) is prefixed with ``'``,
as OWASP advises: a consumption's ``reason`` is an API client's to write.
"""

from __future__ import annotations

import base64
import csv
import enum
import hashlib
import hmac
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from orgwallet.auth.permissions import ROLE_PERMISSIONS, Permission
from orgwallet.auth.principals import ApiKeyPrincipal, Principal
from orgwallet.config import Settings
from orgwallet.db.engine import DriverPool
from orgwallet.db.models import PurchaseStatus, Role
from orgwallet.errors import InvalidInput
from orgwallet.ledger import EntryKind
from orgwallet.services import access, audit, validation
from orgwallet.services import wallets as wallet_service

log = logging.getLogger(__name__)


class ExportKind(enum.StrEnum):
    LEDGER = "ledger"
    PURCHASES = "purchases"
    AUDIT_LOG = "audit_log"


#: What reading each kind takes: the lists' own permissions.
PERMISSIONS = {
    ExportKind.LEDGER: Permission.TOKENS_VIEW,
    ExportKind.PURCHASES: Permission.TOKENS_VIEW,
    ExportKind.AUDIT_LOG: audit.READ_PERMISSION,
}

#: Rows per page read from the database: the ledger's page (``wallets.ledger_page``).
PAGE_ROWS = wallet_service.MAX_PAGE

#: Keys the signature apart from every other use of the signing secret.
_PURPOSE = b"orgwallet.export.v1."

EXPORTED_ROWS = Counter("orgwallet_export_rows", "Rows written to CSV exports, by kind", ["kind"])


@dataclass(frozen=True, slots=True)
class Terms:
    """What a link exports, for whom, until when: all of it signed."""

    organization_id: uuid.UUID
    kind: ExportKind
    since: datetime | None
    until: datetime | None
    #: The kind's own filter: ledger entry kinds, purchase statuses, or audit actions (values).
    only: tuple[str, ...] | None
    actor: str  # who asked: a person's subject or ``apikey:<id>``
    api_key_id: uuid.UUID | None  # when an API key asked
    staff: bool  # platform staff when asking
    expires: int  # Unix time, in seconds

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, UTC)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "o": str(self.organization_id),
                "k": self.kind.value,
                "s": None if self.since is None else self.since.isoformat(),
                "u": None if self.until is None else self.until.isoformat(),
                "f": None if self.only is None else list(self.only),
                "p": self.actor,
                "i": None if self.api_key_id is None else str(self.api_key_id),
                "a": self.staff,
                "e": self.expires,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Terms:
        fields = orjson.loads(data)
        return cls(
            organization_id=uuid.UUID(fields["o"]),
            kind=ExportKind(fields["k"]),
            since=None if fields["s"] is None else datetime.fromisoformat(fields["s"]),
            until=None if fields["u"] is None else datetime.fromisoformat(fields["u"]),
            only=None if fields["f"] is None else tuple(str(v) for v in fields["f"]),
            actor=str(fields["p"]),
            api_key_id=None if fields["i"] is None else uuid.UUID(fields["i"]),
            staff=bool(fields["a"]),
            expires=int(fields["e"]),
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: str, body: str) -> bytes:
    return hmac.new(secret.encode(), _PURPOSE + body.encode(), hashlib.sha256).digest()


def sign(secret: str, terms: Terms) -> str:
    body = _b64(terms.encode())
    return f"{body}.{_b64(_signature(secret, body))}"


class BadLink(Exception):
    """A link that opens nothing: ``status`` and a plain message for the browser."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def verify(secret: str, token: str) -> Terms:
    """The terms of a link signed here; ``BadLink(404)`` for anything else (forged, altered,
    truncated): such a link names no export."""
    body, _, signature = token.partition(".")
    try:
        valid = hmac.compare_digest(_unb64(signature), _signature(secret, body))
        if valid:
            return Terms.decode(_unb64(body))
    except (ValueError, KeyError, TypeError):
        pass
    raise BadLink(404, "This export link is not valid.")


# ---------------------------------------------------------------- creating a link


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """``createExport``'s input, its enums as the domain's. ``kinds`` filters a ledger export,
    ``statuses`` a purchases export, ``actions`` an audit log export."""

    kind: ExportKind
    since: datetime | None = None
    until: datetime | None = None
    kinds: Sequence[EntryKind] | None = None
    statuses: Sequence[PurchaseStatus] | None = None
    actions: Sequence[str] | None = None


@dataclass(frozen=True, slots=True)
class ExportLink:
    url: str
    expires_at: datetime


def _only(request: ExportRequest) -> tuple[str, ...] | None:
    """The kind's own filter, checked; a filter of another kind is refused (it would filter nothing)."""
    filters: dict[str, tuple[ExportKind, Sequence[str] | None]] = {
        "kinds": (ExportKind.LEDGER, None if request.kinds is None else [k.value for k in request.kinds]),
        "statuses": (
            ExportKind.PURCHASES,
            None if request.statuses is None else [s.value for s in request.statuses],
        ),
        "actions": (ExportKind.AUDIT_LOG, audit.actions_filter(request.actions)),
    }
    only: tuple[str, ...] | None = None
    for field, (kind, values) in filters.items():
        if values is None:
            continue
        if kind != request.kind:
            raise InvalidInput(f"{field} filters an export of {kind.name} only", field=field)
        only = tuple(dict.fromkeys(values))
    return only


async def create_export(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    organization_id: uuid.UUID,
    request: ExportRequest,
    *,
    now: datetime,
) -> ExportLink:
    """A signed link to the export, valid ``settings.export_link_seconds`` from ``now`` (the
    runtime's clock); audited as ``export.create``."""
    await access.authorize(session, principal, organization_id, PERMISSIONS[request.kind])
    since, until = validation.time_window(request.since, request.until)
    terms = Terms(
        organization_id=organization_id,
        kind=request.kind,
        since=since,
        until=until,
        only=_only(request),
        actor=principal.actor,
        api_key_id=principal.api_key_id if isinstance(principal, ApiKeyPrincipal) else None,
        staff=principal.is_platform_admin,
        expires=int((now + timedelta(seconds=settings.export_link_seconds)).timestamp()),
    )
    await audit.record(
        session,
        principal,
        action="export.create",
        organization_id=organization_id,
        target_type="export",
        target_id=request.kind.value,
        after={
            "kind": request.kind.value,
            "since": None if since is None else since.isoformat(),
            "until": None if until is None else until.isoformat(),
            "filter": None if terms.only is None else list(terms.only),
            "expires_at": terms.expires_at.isoformat(),
        },
    )
    url = f"{settings.public_url.rstrip('/')}/exports/{sign(settings.signing_secret, terms)}"
    return ExportLink(url=url, expires_at=terms.expires_at)


# ---------------------------------------------------------------- opening a link

_ASKER = """
    SELECT o.slug,
           (SELECT m.role FROM memberships m JOIN users u ON u.id = m.user_id
            WHERE m.organization_id = o.id AND u.subject = $2) AS role,
           (SELECT k.scopes FROM api_keys k
            WHERE k.id = $3 AND k.organization_id = o.id AND k.revoked_at IS NULL) AS scopes
    FROM organizations o WHERE o.id = $1
"""


async def admit(driver: DriverPool, terms: Terms, now: datetime) -> str:
    """Whether the link opens now: the organization's slug, or ``BadLink``."""
    if now.timestamp() >= terms.expires:
        raise BadLink(410, "This export link has expired: create a new export.")
    key_id = terms.api_key_id
    subject = None if key_id else terms.actor
    async with driver.acquire() as connection:
        row = await connection.fetchrow(_ASKER, terms.organization_id, subject, key_id)
    if row is None:
        raise BadLink(404, "This organization no longer exists.")
    needed = PERMISSIONS[terms.kind]
    if key_id is not None:
        allowed = row["scopes"] is not None and needed.value in row["scopes"]
    else:
        allowed = terms.staff or (row["role"] is not None and needed in ROLE_PERMISSIONS[Role(row["role"])])
    if not allowed:
        raise BadLink(403, "Whoever created this link may no longer read this export.")
    return str(row["slug"])


# ---------------------------------------------------------------- the file

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str | None) -> str | None:
    """Free text as a cell that no spreadsheet runs as a formula."""
    if value and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


Row = Sequence[object]
Pages = AsyncIterator[list[Row]]

HEADERS: dict[ExportKind, tuple[str, ...]] = {
    ExportKind.LEDGER: (
        "id",
        "seq",
        "created_at",
        "kind",
        "amount",
        "held_change",
        "balance_after",
        "reserved_after",
        "reason",
        "idempotency_key",
        "actor",
        "metadata",
    ),
    ExportKind.PURCHASES: (
        "id",
        "reference",
        "created_at",
        "paid_at",
        "status",
        "method",
        "tokens",
        "amount_minor",
        "currency",
        "package",
        "refunded_minor",
        "tokens_clawed_back",
        "shortfall",
        "failure_reason",
        "receipt_url",
        "dispute_status",
    ),
    ExportKind.AUDIT_LOG: (
        "id",
        "created_at",
        "actor",
        "action",
        "target_type",
        "target_id",
        "request_id",
        "before",
        "after",
    ),
}


async def _ledger_pages(driver: DriverPool, terms: Terms) -> Pages:
    """The wallet's entries through ``ledger_page``, the GraphQL list's own reader."""
    async with driver.acquire() as connection:
        wallet_id = await connection.fetchval(
            "SELECT id FROM wallets WHERE organization_id = $1", terms.organization_id
        )
    if wallet_id is None:
        return
    kinds = None if terms.only is None else [EntryKind(k) for k in terms.only]
    after_seq: int | None = None
    while True:
        async with driver.acquire() as connection:
            page = await wallet_service.ledger_page(
                connection,
                wallet_id,
                first=PAGE_ROWS,
                after_seq=after_seq,
                kinds=kinds,
                since=terms.since,
                until=terms.until,
            )
        yield [
            (
                e.id,
                e.seq,
                _time(e.created_at),
                e.kind.name,
                e.amount,
                e.held_change,
                e.balance_after,
                e.reserved_after,
                _text(e.reason),
                _text(e.idempotency_key),
                _text(e.actor),
                _json(e.metadata),
            )
            for e in page.entries
        ]
        if not page.has_next:
            return
        after_seq = page.entries[-1].seq


_PURCHASES = (
    "SELECT p.id, p.reference, p.created_at, p.paid_at, p.status, p.method, p.tokens, p.amount_minor,"
    " p.currency, k.code, p.refunded_minor, p.tokens_clawed_back, p.shortfall, p.failure_reason,"
    " p.receipt_url, p.dispute_status"
    " FROM purchases p LEFT JOIN token_packages k ON k.id = p.package_id WHERE p.organization_id = $1"
)


async def _purchase_pages(driver: DriverPool, terms: Terms) -> Pages:
    """Newest first on the time-ordered ids, like ``Organization.purchases`` (its ``status``
    filter), within [since, until) of their creation."""
    before: uuid.UUID | None = None
    while True:
        conditions = [_PURCHASES]
        params: list[Any] = [terms.organization_id]
        for condition, value in (
            ("p.id < ${}", before),
            ("p.status = ANY(${}::text[])", None if terms.only is None else list(terms.only)),
            ("p.created_at >= ${}", terms.since),
            ("p.created_at < ${}", terms.until),
        ):
            if value is not None:
                params.append(value)
                conditions.append(condition.format(len(params)))
        params.append(PAGE_ROWS)
        query = " AND ".join(conditions) + f" ORDER BY p.id DESC LIMIT ${len(params)}"
        async with driver.acquire() as connection:
            rows = await connection.fetch(query, *params)
        yield [
            (
                r[0],
                r[1],
                _time(r[2]),
                _time(r[3]),
                r[4].upper(),
                r[5].upper(),
                r[6],
                r[7],
                r[8],
                r[9],
                r[10],
                r[11],
                r[12],
                _text(r[13]),
                r[14],
                r[15],
            )
            for r in rows
        ]
        if len(rows) < PAGE_ROWS:
            return
        before = rows[-1][0]


async def _audit_pages(driver: DriverPool, terms: Terms) -> Pages:
    """Through ``audit.events_page``, ``Organization.auditLog``'s own reader."""
    before: uuid.UUID | None = None
    while True:
        async with driver.acquire() as connection:
            page = await audit.events_page(
                connection,
                terms.organization_id,
                first=PAGE_ROWS,
                before_id=before,
                actions=None if terms.only is None else list(terms.only),
                since=terms.since,
                until=terms.until,
            )
        yield [
            (
                e.id,
                _time(e.at),
                _text(e.actor),
                e.action,
                e.target_type,
                _text(e.target_id),
                e.request_id,
                _json(e.before),
                _json(e.after),
            )
            for e in page.events
        ]
        if not page.has_next:
            return
        before = page.events[-1].id


_PAGES: dict[ExportKind, Callable[[DriverPool, Terms], Pages]] = {
    ExportKind.LEDGER: _ledger_pages,
    ExportKind.PURCHASES: _purchase_pages,
    ExportKind.AUDIT_LOG: _audit_pages,
}


async def csv_chunks(driver: DriverPool, terms: Terms) -> AsyncIterator[bytes]:
    """The file: the byte order mark and the header row first (the first byte leaves before any
    query), then one chunk per page."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADERS[terms.kind])
    yield b"\xef\xbb\xbf" + buffer.getvalue().encode()
    counted = EXPORTED_ROWS.labels(terms.kind.value)
    async for rows in _PAGES[terms.kind](driver, terms):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(rows)
        counted.inc(len(rows))
        yield buffer.getvalue().encode()


def filename(slug: str, kind: ExportKind, now: datetime) -> str:
    return f"orgwallet-{slug}-{kind.value.replace('_', '-')}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv"


def export_route(driver: DriverPool, secret: Callable[[], str], clock: Callable[[], datetime]) -> Route:
    """``GET /exports/<token>``. ``secret``: the signing secret; ``clock``: the runtime's time,
    read per request (tests move it)."""

    async def download(request: Request) -> Response:
        try:
            terms = verify(secret(), request.path_params["token"])
            now = clock()
            slug = await admit(driver, terms, now)
        except BadLink as refused:
            return PlainTextResponse(refused.message + "\n", status_code=refused.status)
        log.info("export of %s (%s) for %s", terms.organization_id, terms.kind.value, terms.actor)
        return StreamingResponse(
            csv_chunks(driver, terms),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{filename(slug, terms.kind, now)}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return Route("/exports/{token}", download, methods=["GET"], include_in_schema=False)
