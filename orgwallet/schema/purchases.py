"""GraphQL types of packages, prices and purchases, their inputs, payloads and result unions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Self

import strawberry
from strawberry import relay

from orgwallet.db import models
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Info
from orgwallet.schema.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound, UserError
from orgwallet.schema.scalars import BigInt
from orgwallet.schema.types import page_info
from orgwallet.services import pricing
from orgwallet.services import purchases as purchase_service

if TYPE_CHECKING:
    from orgwallet.schema.types import Organization


@strawberry.enum
class PurchaseStatus(Enum):
    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"
    DISPUTED = "disputed"

    def model(self) -> models.PurchaseStatus:
        return models.PurchaseStatus(self.value)


@strawberry.enum
class PurchaseMethod(Enum):
    CHECKOUT = "checkout"
    SAVED_CARD = "saved_card"
    AUTO_TOP_UP = "auto_top_up"


def _uuid(node_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(node_id)
    except ValueError:
        return None


@strawberry.type
class TokenPackage(relay.Node):
    id: relay.NodeID[str]
    code: str
    name: str
    tokens: BigInt
    price_minor: int = strawberry.field(description="The price for the organization asked about.")
    list_price_minor: int = strawberry.field(
        description="The catalogue price, before any organization's price."
    )
    currency: str
    unit_price_minor: float = strawberry.field(description="Price per token, in minor units.")
    savings_percent: int = strawberry.field(
        description="Saving per token against the most expensive unit price in the catalogue."
    )
    badge: str | None
    active: bool
    sort: int

    @classmethod
    def of(cls, priced: pricing.PricedPackage) -> Self:
        package = priced.package
        return cls(
            id=str(package.id),
            code=package.code,
            name=package.name,
            tokens=BigInt(package.tokens),
            price_minor=priced.price_minor,
            list_price_minor=package.price_minor,
            currency=package.currency,
            unit_price_minor=priced.unit_price_minor,
            savings_percent=priced.savings_percent,
            badge=package.badge,
            active=package.active,
            sort=package.sort,
        )

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        """At list prices (``packages(organizationId)`` gives an organization's); what
        ``packages`` shows the caller: none to anonymous callers, archived ones to staff only."""
        ids = [_uuid(node_id) for node_id in node_ids]
        principal = info.context.principal
        async with info.context.reading() as session:
            try:
                catalogue = await pricing.catalogue(
                    session, principal, None, include_archived=principal.is_platform_admin
                )
            except OrgWalletError:
                catalogue = []
        found = {item.package.id: cls.of(item) for item in catalogue}
        return [found.get(i) if i is not None else None for i in ids]


@strawberry.type
class PriceQuote:
    tokens: BigInt
    price_minor: int
    currency: str
    unit_price_minor: float

    @classmethod
    def of(cls, quote: pricing.Quote) -> Self:
        return cls(
            tokens=BigInt(quote.tokens),
            price_minor=quote.price_minor,
            currency=quote.currency,
            unit_price_minor=quote.unit_price_minor,
        )


@strawberry.type(
    description="Custom amounts from `minTokens` up to the next tier cost `unitPriceMinor` each."
)
class PriceTier:
    min_tokens: BigInt
    unit_price_minor: int
    currency: str

    @classmethod
    def of(cls, row: models.PriceTier) -> Self:
        return cls(
            min_tokens=BigInt(row.min_tokens), unit_price_minor=row.unit_price_minor, currency=row.currency
        )


@strawberry.type(description="What one organization pays: a fixed price or a discount.")
class OrganizationPrice:
    package_id: relay.GlobalID | None = strawberry.field(
        description="The package; null: a discount on every package and on custom amounts."
    )
    price_minor: int | None
    discount_percent: int | None

    @classmethod
    def of(cls, row: models.OrganizationPrice) -> Self:
        return cls(
            package_id=relay.GlobalID("TokenPackage", str(row.package_id)) if row.package_id else None,
            price_minor=row.price_minor,
            discount_percent=row.discount_percent,
        )


async def package_of(
    info: Info, organization_id: uuid.UUID, package_id: uuid.UUID | None
) -> TokenPackage | None:
    """A package (archived ones too) at the price the organization pays today."""
    if package_id is None:
        return None
    async with info.context.reading() as session:
        for item in await pricing.priced_packages(session, organization_id, include_archived=True):
            if item.package.id == package_id:
                return TokenPackage.of(item)
    return None


@strawberry.enum(description="How a dispute of the payment stands, for the wallet.")
class PurchaseDisputeStatus(Enum):
    OPEN = strawberry.enum_value("open", description="With the bank: the tokens are taken back.")
    WON = strawberry.enum_value("won", description="Decided for the merchant: the tokens were given back.")
    LOST = strawberry.enum_value(
        "lost", description="Decided for the card holder (or an inquiry closed): the tokens stay taken back."
    )


@strawberry.type(description="The card holder's dispute of the payment (a chargeback) and its outcome.")
class PurchaseDispute:
    status: PurchaseDisputeStatus
    amount_minor: int = strawberry.field(description="The amount disputed.")
    tokens_taken_back: BigInt = strawberry.field(
        description="Tokens the dispute took back when it opened (what was left of the purchase's)."
    )
    tokens_returned: BigInt = strawberry.field(description="Tokens given back when it was won.")
    opened_at: datetime
    closed_at: datetime | None

    @classmethod
    def of(cls, row: models.Purchase) -> Self | None:
        if row.dispute_id is None or row.dispute_opened_at is None:
            return None
        if row.dispute_status == "won":
            status = PurchaseDisputeStatus.WON
        elif row.dispute_status in purchase_service.CLOSED_DISPUTE_STATES:
            status = PurchaseDisputeStatus.LOST
        else:
            status = PurchaseDisputeStatus.OPEN
        return cls(
            status=status,
            amount_minor=row.dispute_amount_minor or 0,
            tokens_taken_back=BigInt(row.dispute_tokens_taken),
            tokens_returned=BigInt(row.dispute_tokens_returned),
            opened_at=row.dispute_opened_at,
            closed_at=row.dispute_closed_at,
        )


@strawberry.type
class Purchase(relay.Node):
    id: relay.NodeID[str]
    reference: str = strawberry.field(description="Human reference, e.g. PUR-000123.")
    tokens: BigInt
    amount_minor: int
    currency: str
    status: PurchaseStatus
    method: PurchaseMethod
    receipt_url: str | None
    action_url: str | None = strawberry.field(
        description="Where the card holder completes a payment that needs them (an automatic top-up)."
    )
    failure_reason: str | None
    refunded_minor: int
    tokens_clawed_back: BigInt = strawberry.field(description="Tokens taken back by refunds and disputes.")
    shortfall: BigInt = strawberry.field(
        description="Tokens refunded or disputed that had already been spent, so could not be taken back."
    )
    created_at: datetime
    paid_at: datetime | None
    dispute: PurchaseDispute | None = strawberry.field(
        description="The card holder's dispute of the payment, if there is one."
    )
    _organization_id: strawberry.Private[uuid.UUID]
    _package_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def of(cls, row: models.Purchase) -> Self:
        return cls(
            id=str(row.id),
            reference=row.reference,
            tokens=BigInt(row.tokens),
            amount_minor=row.amount_minor,
            currency=row.currency,
            status=PurchaseStatus(row.status),
            method=PurchaseMethod(row.method),
            receipt_url=row.receipt_url,
            action_url=row.action_url,
            failure_reason=row.failure_reason,
            refunded_minor=row.refunded_minor,
            tokens_clawed_back=BigInt(row.tokens_clawed_back),
            shortfall=BigInt(row.shortfall),
            created_at=row.created_at,
            paid_at=row.paid_at,
            dispute=PurchaseDispute.of(row),
            _organization_id=row.organization_id,
            _package_id=row.package_id,
        )

    @strawberry.field
    async def organization(
        self, info: Info
    ) -> Annotated[Organization, strawberry.lazy("orgwallet.schema.types")]:
        from orgwallet.schema.types import Organization

        return await Organization.load(info, self._organization_id)

    @strawberry.field(description="The package bought (null for a custom amount), at today's price.")
    async def package(self, info: Info) -> TokenPackage | None:
        return await package_of(info, self._organization_id, self._package_id)

    @classmethod
    async def resolve_nodes(  # type: ignore[override]
        cls, *, info: Info, node_ids: Iterable[str], required: bool = False
    ) -> list[Self | None]:
        out: list[Self | None] = []
        async with info.context.reading() as session:
            for node_id in node_ids:
                purchase_id = _uuid(node_id)
                row = None
                if purchase_id is not None:
                    try:
                        row = await purchase_service.get_purchase(
                            session, info.context.principal, purchase_id
                        )
                    except OrgWalletError:
                        row = None
                out.append(cls.of(row) if row is not None else None)
        return out


@strawberry.type
class PurchaseEdge:
    cursor: str
    node: Purchase


@strawberry.type
class PurchaseConnection:
    edges: list[PurchaseEdge]
    page_info: relay.PageInfo


async def purchase_connection(
    info: Info,
    organization_id: uuid.UUID,
    *,
    first: int | None,
    after: str | None,
    status: list[PurchaseStatus] | None,
) -> PurchaseConnection:
    async with info.context.reading() as session:
        page = await purchase_service.list_purchases(
            session,
            info.context.principal,
            organization_id,
            first=50 if first is None else first,
            after=after,
            statuses=[s.model() for s in status] if status else None,
        )
    edges = [
        PurchaseEdge(cursor=purchase_service.encode_cursor(row.id), node=Purchase.of(row))
        for row in page.purchases
    ]
    return PurchaseConnection(
        edges=edges,
        page_info=page_info([e.cursor for e in edges], has_next=page.has_next, after=after),
    )


# ---------------------------------------------------------------- inputs


@strawberry.input
class StartCheckoutInput:
    organization_id: strawberry.ID
    package_id: strawberry.ID | None = strawberry.field(
        default=None, description="Exactly one of packageId and tokens."
    )
    tokens: BigInt | None = None
    success_url: str
    cancel_url: str
    idempotency_key: str | None = None


@strawberry.input
class PurchaseWithSavedCardInput:
    organization_id: strawberry.ID
    package_id: strawberry.ID | None = strawberry.field(
        default=None, description="Exactly one of packageId and tokens."
    )
    tokens: BigInt | None = None
    idempotency_key: str


@strawberry.input
class SetupPaymentMethodInput:
    organization_id: strawberry.ID
    success_url: str
    cancel_url: str


@strawberry.input
class CreateTokenPackageInput:
    code: str = strawberry.field(description="Stable identifier: lowercase letters, digits, '-', '_'.")
    name: str
    tokens: BigInt
    price_minor: int
    currency: str | None = "USD"
    badge: str | None = None
    sort: int | None = 0
    active: bool | None = True


@strawberry.input(description='Fields left out (or null) stay as they are; `badge: ""` removes the badge.')
class UpdateTokenPackageInput:
    package_id: strawberry.ID
    name: str | None = None
    tokens: BigInt | None = None
    price_minor: int | None = None
    badge: str | None = None
    sort: int | None = None
    active: bool | None = None


@strawberry.input
class ArchiveTokenPackageInput:
    package_id: strawberry.ID


@strawberry.input
class PriceTierInput:
    min_tokens: BigInt
    unit_price_minor: int


@strawberry.input
class SetPriceTiersInput:
    currency: str | None = "USD"
    tiers: list[PriceTierInput]


@strawberry.input(
    description="A fixed price for one package, or a discount on one package; with no package, a "
    "discount on every package and on custom amounts."
)
class SetOrganizationPriceInput:
    organization_id: strawberry.ID
    package_id: strawberry.ID | None = None
    price_minor: int | None = None
    discount_percent: int | None = None


@strawberry.input
class ClearOrganizationPriceInput:
    organization_id: strawberry.ID
    package_id: strawberry.ID | None = None


# ---------------------------------------------------------------- payloads and errors


@strawberry.type
class CheckoutStarted:
    purchase: Purchase
    checkout_url: str = strawberry.field(description="Stripe's hosted payment page: send the buyer there.")


@strawberry.type
class PurchaseStarted:
    purchase: Purchase = strawberry.field(
        description="PENDING until Stripe's webhook confirms the payment, then PAID with the tokens credited."
    )


@strawberry.type
class PaymentDeclined(UserError):
    decline_code: str | None
    purchase: Purchase = strawberry.field(description="The purchase, now FAILED.")


@strawberry.type
class PaymentMethodRequired(UserError):
    pass


@strawberry.type(
    description="Stripe (or the way to it) failed; not a decline. The purchase, if one was made, is FAILED "
    "with the reason; if the payment went through after all, it is credited when Stripe confirms it."
)
class PaymentProviderError(UserError):
    purchase: Purchase | None


@strawberry.type
class PaymentMethodSetupStarted:
    checkout_url: str = strawberry.field(description="Stripe's hosted page that saves a card.")


@strawberry.type
class TokenPackageSaved:
    package: TokenPackage


@strawberry.type
class PriceTiersSet:
    tiers: list[PriceTier]


@strawberry.type
class OrganizationPriceSet:
    price: OrganizationPrice
    packages: list[TokenPackage] = strawberry.field(
        description="The catalogue as the organization now sees it."
    )


@strawberry.type
class OrganizationPriceCleared:
    packages: list[TokenPackage] = strawberry.field(
        description="The catalogue as the organization now sees it."
    )


StartCheckoutResult = Annotated[
    CheckoutStarted | PaymentProviderError | IdempotencyConflict | InvalidInput | NotFound,
    strawberry.union("StartCheckoutResult"),
]
PurchaseWithSavedCardResult = Annotated[
    PurchaseStarted
    | PaymentDeclined
    | PaymentMethodRequired
    | PaymentProviderError
    | IdempotencyConflict
    | InvalidInput
    | NotFound,
    strawberry.union("PurchaseWithSavedCardResult"),
]
SetupPaymentMethodResult = Annotated[
    PaymentMethodSetupStarted | PaymentProviderError | InvalidInput | NotFound,
    strawberry.union("SetupPaymentMethodResult"),
]
TokenPackageResult = Annotated[
    TokenPackageSaved | InvalidInput | NotFound | Conflict,
    strawberry.union("TokenPackageResult"),
]
SetPriceTiersResult = Annotated[PriceTiersSet | InvalidInput, strawberry.union("SetPriceTiersResult")]
SetOrganizationPriceResult = Annotated[
    OrganizationPriceSet | InvalidInput | NotFound, strawberry.union("SetOrganizationPriceResult")
]
ClearOrganizationPriceResult = Annotated[
    OrganizationPriceCleared | InvalidInput | NotFound, strawberry.union("ClearOrganizationPriceResult")
]
