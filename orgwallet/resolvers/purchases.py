"""Queries and mutations of packages, prices and purchases."""

from __future__ import annotations

from typing import Any

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession

from orgwallet.errors import OrgWalletError
from orgwallet.resolvers.common import mutate
from orgwallet.schema.context import Info
from orgwallet.schema.errors import user_error
from orgwallet.schema.permissions import IsAuthenticated, IsPlatformAdmin
from orgwallet.schema.purchases import (
    ArchiveTokenPackageInput,
    CheckoutStarted,
    ClearOrganizationPriceInput,
    ClearOrganizationPriceResult,
    CreateTokenPackageInput,
    OrganizationPrice,
    OrganizationPriceCleared,
    OrganizationPriceSet,
    PaymentDeclined,
    PaymentMethodRequired,
    PaymentMethodSetupStarted,
    PaymentProviderError,
    PriceQuote,
    PriceTier,
    PriceTiersSet,
    Purchase,
    PurchaseStarted,
    PurchaseWithSavedCardInput,
    PurchaseWithSavedCardResult,
    SetOrganizationPriceInput,
    SetOrganizationPriceResult,
    SetPriceTiersInput,
    SetPriceTiersResult,
    SetupPaymentMethodInput,
    SetupPaymentMethodResult,
    StartCheckoutInput,
    StartCheckoutResult,
    TokenPackage,
    TokenPackageResult,
    TokenPackageSaved,
    UpdateTokenPackageInput,
)
from orgwallet.schema.scalars import BigInt
from orgwallet.services import pricing
from orgwallet.services import purchases as purchase_service
from orgwallet.services.validation import global_id


def _package_id(value: strawberry.ID | None) -> Any:
    return None if value is None else global_id(value, "TokenPackage", "packageId")


async def _catalogue(session: AsyncSession, organization_id: Any) -> list[TokenPackage]:
    return [
        TokenPackage.of(item)
        for item in await pricing.priced_packages(session, organization_id, include_archived=False)
    ]


@strawberry.type
class PurchaseQueries:
    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="Packages on sale, at the organization's prices (list prices without one). "
        "`includeArchived`: platform admins only.",
    )
    async def packages(
        self,
        info: Info,
        organization_id: strawberry.ID | None = None,
        # Nullable with a default: clients written against the contract may omit it or send null.
        include_archived: bool | None = False,
    ) -> list[TokenPackage]:
        organization = (
            None if organization_id is None else global_id(organization_id, "Organization", "organizationId")
        )
        async with info.context.reading() as session:
            items = await pricing.catalogue(
                session, info.context.principal, organization, include_archived=bool(include_archived)
            )
        return [TokenPackage.of(item) for item in items]

    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="The price of a custom number of tokens for the organization, by volume tiers.",
    )
    async def quote(self, info: Info, organization_id: strawberry.ID, tokens: BigInt) -> PriceQuote:
        organization = global_id(organization_id, "Organization", "organizationId")
        async with info.context.reading() as session:
            quote = await pricing.quote(
                session, info.context.principal, info.context.settings, organization, tokens
            )
        return PriceQuote.of(quote)

    @strawberry.field(permission_classes=[IsAuthenticated], description="The volume tiers of custom amounts.")
    async def price_tiers(self, info: Info, currency: str | None = None) -> list[PriceTier]:
        async with info.context.reading() as session:
            rows = await pricing.list_tiers(
                session, info.context.principal, currency or info.context.settings.currency
            )
        return [PriceTier.of(row) for row in rows]

    @strawberry.field(
        permission_classes=[IsAuthenticated],
        description="Null when it does not exist or belongs to another organization.",
    )
    async def purchase(self, info: Info, id: strawberry.ID) -> Purchase | None:
        try:
            purchase_id = global_id(id, "Purchase", "id")
        except OrgWalletError:
            return None
        async with info.context.reading() as session:
            row = await purchase_service.get_purchase(session, info.context.principal, purchase_id)
        return Purchase.of(row) if row is not None else None

    @strawberry.field(
        permission_classes=[IsPlatformAdmin], description="Prices set for one organization (platform admins)."
    )
    async def organization_prices(
        self, info: Info, organization_id: strawberry.ID
    ) -> list[OrganizationPrice]:
        organization = global_id(organization_id, "Organization", "organizationId")
        async with info.context.reading() as session:
            rows = await pricing.organization_prices(session, info.context.principal, organization)
        return [OrganizationPrice.of(row) for row in rows]


@strawberry.type
class PurchaseMutations:
    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Starts a purchase (a package or a custom number of tokens) and its Stripe Checkout. "
        "Tokens are credited when Stripe confirms the payment.",
    )
    async def start_checkout(self, info: Info, input: StartCheckoutInput) -> StartCheckoutResult:
        # Not in a unit of work: the service commits the purchase before it calls Stripe.
        try:
            started = await purchase_service.start_checkout(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                info.context.settings,
                global_id(input.organization_id, "Organization", "organizationId"),
                package_id=_package_id(input.package_id),
                tokens=input.tokens,
                success_url=input.success_url,
                cancel_url=input.cancel_url,
                idempotency_key=input.idempotency_key,
            )
        except purchase_service.PaymentProviderError as error:
            return _provider_error(error)
        except OrgWalletError as error:
            return user_error(error)
        return CheckoutStarted(purchase=Purchase.of(started.purchase), checkout_url=started.checkout_url)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Charges the organization's saved card now. The purchase is PAID, with the tokens, "
        "when Stripe's webhook confirms the payment (within a second).",
    )
    async def purchase_with_saved_card(
        self, info: Info, input: PurchaseWithSavedCardInput
    ) -> PurchaseWithSavedCardResult:
        try:
            outcome = await purchase_service.purchase_with_saved_card(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                info.context.settings,
                global_id(input.organization_id, "Organization", "organizationId"),
                package_id=_package_id(input.package_id),
                tokens=input.tokens,
                idempotency_key=input.idempotency_key,
            )
        except purchase_service.PaymentMethodRequired as error:
            return PaymentMethodRequired(message=error.message, code=error.code)
        except purchase_service.PaymentProviderError as error:
            return _provider_error(error)
        except OrgWalletError as error:
            return user_error(error)
        if outcome.provider_error is not None:
            return _provider_error(outcome.provider_error)
        purchase = outcome.purchase
        if outcome.declined is not None or purchase.status == "failed":
            declined = outcome.declined
            return PaymentDeclined(
                message=declined.message if declined else purchase.failure_reason or "The card was declined.",
                code="PAYMENT_DECLINED",
                decline_code=(declined.decline_code or declined.stripe_code) if declined else None,
                purchase=Purchase.of(purchase),
            )
        return PurchaseStarted(purchase=Purchase.of(purchase))

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="A Stripe Checkout page that saves a card as the organization's default payment method.",
    )
    async def setup_payment_method(
        self, info: Info, input: SetupPaymentMethodInput
    ) -> SetupPaymentMethodResult:
        # Not in a unit of work: Stripe is called between the service's own transactions.
        try:
            link = await purchase_service.setup_payment_method(
                info.context.sessions,
                info.context.principal,
                info.context.runtime.gateway,
                global_id(input.organization_id, "Organization", "organizationId"),
                success_url=input.success_url,
                cancel_url=input.cancel_url,
            )
        except purchase_service.PaymentProviderError as error:
            return _provider_error(error)
        except OrgWalletError as error:
            return user_error(error)
        return PaymentMethodSetupStarted(checkout_url=link.url)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def create_token_package(self, info: Info, input: CreateTokenPackageInput) -> TokenPackageResult:
        async def run(session: AsyncSession) -> TokenPackageSaved:
            package = await pricing.create_package(
                session,
                info.context.principal,
                code=input.code,
                name=input.name,
                tokens=input.tokens,
                price_minor=input.price_minor,
                currency=input.currency,
                badge=input.badge,
                sort=input.sort or 0,
                active=True if input.active is None else input.active,
            )
            return await _saved(session, package.id)

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def update_token_package(self, info: Info, input: UpdateTokenPackageInput) -> TokenPackageResult:
        async def run(session: AsyncSession) -> TokenPackageSaved:
            package = await pricing.update_package(
                session,
                info.context.principal,
                global_id(input.package_id, "TokenPackage", "packageId"),
                name=input.name,
                tokens=input.tokens,
                price_minor=input.price_minor,
                badge=input.badge,
                sort=input.sort,
                active=input.active,
            )
            return await _saved(session, package.id)

        return await mutate(info, run)

    @strawberry.mutation(
        permission_classes=[IsPlatformAdmin], description="Takes a package off sale. Platform admins only."
    )
    async def archive_token_package(self, info: Info, input: ArchiveTokenPackageInput) -> TokenPackageResult:
        async def run(session: AsyncSession) -> TokenPackageSaved:
            package = await pricing.archive_package(
                session, info.context.principal, global_id(input.package_id, "TokenPackage", "packageId")
            )
            return await _saved(session, package.id)

        return await mutate(info, run)

    @strawberry.mutation(
        permission_classes=[IsPlatformAdmin],
        description="Replaces the volume tiers of custom amounts. Platform admins only.",
    )
    async def set_price_tiers(self, info: Info, input: SetPriceTiersInput) -> SetPriceTiersResult:
        async def run(session: AsyncSession) -> PriceTiersSet:
            rows = await pricing.set_tiers(
                session,
                info.context.principal,
                info.context.settings,
                currency=input.currency,
                tiers=[(tier.min_tokens, tier.unit_price_minor) for tier in input.tiers],
            )
            return PriceTiersSet(tiers=[PriceTier.of(row) for row in rows])

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def set_organization_price(
        self, info: Info, input: SetOrganizationPriceInput
    ) -> SetOrganizationPriceResult:
        async def run(session: AsyncSession) -> OrganizationPriceSet:
            organization = global_id(input.organization_id, "Organization", "organizationId")
            row = await pricing.set_organization_price(
                session,
                info.context.principal,
                organization,
                package_id=_package_id(input.package_id),
                price_minor=input.price_minor,
                discount_percent=input.discount_percent,
            )
            return OrganizationPriceSet(
                price=OrganizationPrice.of(row), packages=await _catalogue(session, organization)
            )

        return await mutate(info, run)

    @strawberry.mutation(permission_classes=[IsPlatformAdmin], description="Platform admins only.")
    async def clear_organization_price(
        self, info: Info, input: ClearOrganizationPriceInput
    ) -> ClearOrganizationPriceResult:
        async def run(session: AsyncSession) -> OrganizationPriceCleared:
            organization = global_id(input.organization_id, "Organization", "organizationId")
            await pricing.clear_organization_price(
                session, info.context.principal, organization, package_id=_package_id(input.package_id)
            )
            return OrganizationPriceCleared(packages=await _catalogue(session, organization))

        return await mutate(info, run)


async def _saved(session: AsyncSession, package_id: Any) -> TokenPackageSaved:
    for item in await pricing.priced_packages(session, None, include_archived=True):
        if item.package.id == package_id:
            return TokenPackageSaved(package=TokenPackage.of(item))
    raise AssertionError("a saved package is in the catalogue")


__all__ = ["PurchaseMutations", "PurchaseQueries"]


def _provider_error(error: purchase_service.PaymentProviderError) -> PaymentProviderError:
    purchase = None if error.purchase is None else Purchase.of(error.purchase)
    return PaymentProviderError(message=error.message, code=error.code, purchase=purchase)
