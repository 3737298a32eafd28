"""GraphQL types of wallets and the ledger, their inputs, payloads and result unions."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar, cast

import strawberry
from strawberry import relay
from strawberry.scalars import JSON

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.db import models
from orgwallet.errors import InvalidInput as InvalidInputError
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.schema.errors import (
    IdempotencyConflict,
    InsufficientTokens,
    InvalidInput,
    NotFound,
    NotRefundable,
    ReservationNotOpen,
    WalletSuspended,
)
from orgwallet.schema.scalars import BigInt
from orgwallet.schema.types import page_info
from orgwallet.services import access
from orgwallet.services import wallets as wallet_service

if TYPE_CHECKING:
    from orgwallet.schema.insights import UsageForecast
    from orgwallet.schema.types import Organization

T = TypeVar("T")


@strawberry.enum
class WalletStatus(Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@strawberry.enum
class GrantSource(Enum):
    PURCHASE = "purchase"
    SUBSCRIPTION = "subscription"
    TRIAL = "trial"
    ADMIN = "admin"
    REFUND = "refund"


# The ledger's own kinds are the GraphQL enum (values by name: PURCHASE, CONSUMPTION...):
# strawberry.enum registers the class itself, so fields are annotated with ledger.EntryKind.
strawberry.enum(ledger.EntryKind, name="LedgerEntryKind")


@strawberry.enum
class ReservationStatus(Enum):
    OPEN = "open"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


def _uuid(node_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(node_id)
    except ValueError:
        return None


async def _visible(info: Info, organization_id: uuid.UUID, session: Any) -> bool:
    try:
        await access.authorize(session, info.context.principal, organization_id, Permission.TOKENS_VIEW)
    except OrgWalletError:
        return False
    return True


async def _visible_nodes(
    info: Info, node_ids: Iterable[str], model: type[Any], build: Callable[[Any], T]
) -> list[T | None]:
    """Rows of a wallet-owned table by id, each built only when its organization's tokens are
    visible to the caller (tokens.view); anything else is null, as if it did not exist."""
    out: list[T | None] = []
    async with info.context.reading() as session:
        for node_id in node_ids:
            key = _uuid(node_id)
            row = await session.get(model, key) if key else None
            if row is not None and not isinstance(row, models.Wallet):
                wallet = await session.get(models.Wallet, row.wallet_id)
                organization_id = wallet.organization_id if wallet else None
            else:
                organization_id = row.organization_id if row else None
            visible = organization_id is not None and await _visible(info, organization_id, session)
            out.append(build(row) if visible else None)
    return out


@strawberry.type
class CreditGrant(relay.Node):
    id: relay.NodeID[str]
    source: GrantSource
    amount: BigInt
    remaining: BigInt
    priority: int
    expires_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, lot: models.CreditLot) -> Self:
        return cls(
            id=str(lot.id),
            source=GrantSource(lot.source),
            amount=BigInt(lot.amount),
            remaining=BigInt(lot.remaining),
            priority=lot.priority,
            expires_at=lot.expires_at,
            created_at=lot.created_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await _visible_nodes(info, node_ids, models.CreditLot, cls.of)


@strawberry.type
class LedgerEntry(relay.Node):
    id: relay.NodeID[str]
    kind: ledger.EntryKind
    amount: BigInt = strawberry.field(description="Signed: + into the wallet, - out of it.")
    held_change: BigInt = strawberry.field(description="Signed change of the reserved tokens.")
    balance_after: BigInt
    reserved_after: BigInt
    reason: str | None
    idempotency_key: str | None
    metadata: JSON | None
    actor: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: models.LedgerEntry | ledger.Entry, actor: str | None = None) -> Self:
        metadata = row.metadata_ if isinstance(row, models.LedgerEntry) else row.metadata
        return cls(
            id=str(row.id),
            kind=ledger.EntryKind(row.kind),
            amount=BigInt(row.amount),
            held_change=BigInt(row.held_change),
            balance_after=BigInt(row.balance_after),
            reserved_after=BigInt(row.reserved_after),
            reason=row.reason,
            idempotency_key=row.idempotency_key,
            metadata=cast(JSON, metadata),
            actor=row.actor if isinstance(row, models.LedgerEntry) else actor or row.actor,
            created_at=row.created_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await _visible_nodes(info, node_ids, models.LedgerEntry, cls.of)


@strawberry.type
class LedgerEntryEdge:
    cursor: str
    node: LedgerEntry


@strawberry.type
class LedgerEntryConnection:
    edges: list[LedgerEntryEdge]
    page_info: relay.PageInfo


MAX_SEQ = 2**63 - 1  # entries are numbered in a bigint: a cursor past it names no entry


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def decode_cursor(cursor: str) -> int:
    try:
        prefix, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if prefix != "seq" or not 0 <= int(seq) <= MAX_SEQ:
            raise ValueError(prefix)
        return int(seq)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError("after is not a cursor of this connection", field="after") from exc


@strawberry.type
class Reservation(relay.Node):
    id: relay.NodeID[str]
    amount: BigInt
    captured: BigInt
    status: ReservationStatus
    reason: str | None
    expires_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: models.Reservation) -> Self:
        return cls(
            id=str(row.id),
            amount=BigInt(row.amount),
            captured=BigInt(row.captured),
            status=ReservationStatus(row.status),
            reason=row.reason,
            expires_at=row.expires_at,
            created_at=row.created_at,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await _visible_nodes(info, node_ids, models.Reservation, cls.of)


@strawberry.type
class Wallet(relay.Node):
    id: relay.NodeID[str]
    status: WalletStatus
    balance: BigInt = strawberry.field(description="Tokens that can be spent now (reserved excluded).")
    reserved: BigInt = strawberry.field(description="Tokens held by open reservations.")
    lifetime_purchased: BigInt
    lifetime_granted: BigInt
    lifetime_consumed: BigInt
    lifetime_expired: BigInt
    _organization_id: strawberry.Private[uuid.UUID]

    @classmethod
    def of(cls, row: models.Wallet | ledger.WalletState) -> Self:
        """From the row, or from a ledger posting's wallet (no second read under the lock)."""
        return cls(
            id=str(row.id),
            status=WalletStatus(row.status),
            balance=BigInt(row.balance),
            reserved=BigInt(row.reserved),
            lifetime_purchased=BigInt(row.lifetime_purchased),
            lifetime_granted=BigInt(row.lifetime_granted),
            lifetime_consumed=BigInt(row.lifetime_consumed),
            lifetime_expired=BigInt(row.lifetime_expired),
            _organization_id=row.organization_id,
        )

    @property
    def pk(self) -> uuid.UUID:
        return uuid.UUID(self.id)

    @strawberry.field
    async def organization(
        self, info: Info
    ) -> Annotated[Organization, strawberry.lazy("orgwallet.schema.types")]:
        from orgwallet.schema.types import Organization

        return await Organization.load(info, self._organization_id)

    @strawberry.field(description="Lots with tokens remaining, in draw-down order.")
    async def grants(self, info: Info) -> list[CreditGrant]:
        async with info.context.reading() as session:
            return [CreditGrant.of(lot) for lot in await wallet_service.grants(session, self.pk)]

    @strawberry.field(description="Tokens whose lots expire within the next `days` days.")
    async def expiring_soon(self, info: Info, days: int | None = 7) -> BigInt:
        async with info.context.reading() as session:
            return BigInt(await wallet_service.expiring_soon(session, self.pk, 7 if days is None else days))

    @strawberry.field(description="Entries, newest first.")
    async def ledger(
        self,
        info: Info,
        first: int | None = 50,
        after: str | None = None,
        kinds: list[ledger.EntryKind] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> LedgerEntryConnection:
        async with info.context.connection() as connection:
            page = await wallet_service.ledger_page(
                connection,
                self.pk,
                first=50 if first is None else first,
                after_seq=decode_cursor(after) if after else None,
                kinds=kinds,
                since=since,
                until=until,
            )
        edges = [LedgerEntryEdge(cursor=encode_cursor(e.seq), node=LedgerEntry.of(e)) for e in page.entries]
        return LedgerEntryConnection(
            edges=edges,
            page_info=page_info([e.cursor for e in edges], has_next=page.has_next, after=after),
        )

    @strawberry.field(description="Daily consumption and where the balance is heading.")
    async def forecast(
        self, info: Info
    ) -> Annotated[UsageForecast, strawberry.lazy("orgwallet.schema.insights")]:
        from orgwallet.schema.insights import UsageForecast

        return await UsageForecast.load(info, self.pk)

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        return await _visible_nodes(info, node_ids, models.Wallet, cls.of)


# ---------------------------------------------------------------- inputs


@strawberry.input
class ConsumeTokensInput:
    organization_id: strawberry.ID
    amount: BigInt
    idempotency_key: str
    reason: str | None = None
    metadata: JSON | None = None


@strawberry.input
class ReserveTokensInput:
    organization_id: strawberry.ID
    amount: BigInt
    idempotency_key: str
    ttl_seconds: int | None = 900
    reason: str | None = None


@strawberry.input
class CaptureReservationInput:
    reservation_id: strawberry.ID
    amount: BigInt | None = None
    idempotency_key: str | None = None


@strawberry.input
class ReleaseReservationInput:
    reservation_id: strawberry.ID


@strawberry.input
class RefundConsumptionInput:
    entry_id: strawberry.ID
    amount: BigInt | None = None
    reason: str | None = None
    idempotency_key: str | None = None


@strawberry.input
class GrantTokensInput:
    organization_id: strawberry.ID
    amount: BigInt
    reason: str
    expires_at: datetime | None = None
    priority: int | None = None
    idempotency_key: str | None = None


@strawberry.input
class SetWalletStatusInput:
    organization_id: strawberry.ID
    reason: str


# ---------------------------------------------------------------- payloads


@strawberry.type
class TokensConsumed:
    entry: LedgerEntry
    wallet: Wallet
    replayed: bool


@strawberry.type
class TokensReserved:
    reservation: Reservation
    wallet: Wallet
    replayed: bool


@strawberry.type
class ReservationCaptured:
    reservation: Reservation
    entry: LedgerEntry
    wallet: Wallet


@strawberry.type
class ReservationReleased:
    reservation: Reservation
    wallet: Wallet


@strawberry.type
class ConsumptionRefunded:
    entry: LedgerEntry
    wallet: Wallet


@strawberry.type
class TokensGranted:
    entry: LedgerEntry
    wallet: Wallet


@strawberry.type
class WalletStatusChanged:
    wallet: Wallet


ConsumeTokensResult = Annotated[
    TokensConsumed | InsufficientTokens | WalletSuspended | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("ConsumeTokensResult"),
]
ReserveTokensResult = Annotated[
    TokensReserved | InsufficientTokens | WalletSuspended | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("ReserveTokensResult"),
]
CaptureReservationResult = Annotated[
    ReservationCaptured | ReservationNotOpen | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("CaptureReservationResult"),
]
ReleaseReservationResult = Annotated[
    ReservationReleased | ReservationNotOpen | InvalidInput | NotFound,
    strawberry.union("ReleaseReservationResult"),
]
RefundConsumptionResult = Annotated[
    ConsumptionRefunded | NotRefundable | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("RefundConsumptionResult"),
]
GrantTokensResult = Annotated[
    TokensGranted | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("GrantTokensResult"),
]
SetWalletStatusResult = Annotated[
    WalletStatusChanged | InvalidInput | NotFound,
    strawberry.union("SetWalletStatusResult"),
]
