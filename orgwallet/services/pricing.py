"""Prices: the package catalogue as one organization pays it, volume tiers for custom amounts,
and the platform admins' management of both.

Money is integer minor units. An organization's price for a package is its fixed price for
that package, else its discount on that package, else its discount on everything, else the
list price; a discount rounds half up to a whole minor unit. Custom amounts are priced by the
volume tier with the largest ``min_tokens`` not above the amount: every token at that tier's
unit price, less the organization's discount on everything.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from uuid6 import uuid7

from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import Principal
from orgwallet.config import Settings
from orgwallet.db.models import Organization, OrganizationPrice, PriceTier, TokenPackage
from orgwallet.errors import Conflict, InvalidInput, NotFound
from orgwallet.services import access, audit, validation

MAX_AMOUNT_MINOR = validation.MAX_AMOUNT_MINOR  # Stripe's largest charge, in minor units
MAX_TIERS = 20
CODE_PATTERN = validation.CODE_PATTERN


@dataclass(frozen=True, slots=True)
class PricedPackage:
    """A package at the price one organization pays (the list price when none is asked)."""

    package: TokenPackage
    price_minor: int
    savings_percent: int = 0

    @property
    def unit_price_minor(self) -> float:
        return self.price_minor / self.package.tokens


@dataclass(frozen=True, slots=True)
class Quote:
    tokens: int
    price_minor: int
    currency: str

    @property
    def unit_price_minor(self) -> float:
        return self.price_minor / self.tokens


def discounted(price_minor: int, percent: int) -> int:
    """``price_minor`` less ``percent`` per cent, rounded half up, never below one minor unit."""
    return max(1, (price_minor * (100 - percent) + 50) // 100)


def savings_percent(price_minor: int, tokens: int, reference_price: int, reference_tokens: int) -> int:
    """How much cheaper per token than the reference, in whole per cent (rounded half up):
    100 * (1 - (price/tokens) / (reference_price/reference_tokens)), in integers."""
    numerator = 100 * (reference_price * tokens - price_minor * reference_tokens)
    denominator = reference_price * tokens
    if numerator <= 0:
        return 0
    return (2 * numerator + denominator) // (2 * denominator)


# ---------------------------------------------------------------- what an organization pays


async def _overrides(
    session: AsyncSession, organization_id: uuid.UUID | None
) -> dict[uuid.UUID | None, OrganizationPrice]:
    if organization_id is None:
        return {}
    rows = await session.execute(
        select(OrganizationPrice).where(col(OrganizationPrice.organization_id) == organization_id)
    )
    return {row.package_id: row for row in rows.scalars()}


def _effective(package: TokenPackage, overrides: dict[uuid.UUID | None, OrganizationPrice]) -> int:
    own = overrides.get(package.id)
    if own is not None:
        if own.price_minor is not None:
            return own.price_minor
        assert own.discount_percent is not None
        return discounted(package.price_minor, own.discount_percent)
    everything = overrides.get(None)
    if everything is not None and everything.discount_percent is not None:
        return discounted(package.price_minor, everything.discount_percent)
    return package.price_minor


def _with_savings(priced: list[PricedPackage], active: list[PricedPackage]) -> list[PricedPackage]:
    """Savings against the most expensive unit price among the active packages, per currency."""
    dearest: dict[str, PricedPackage] = {}
    for item in active:
        best = dearest.get(item.package.currency)
        # a/b > c/d  <=>  a*d > c*b: no floats.
        if best is None or item.price_minor * best.package.tokens > best.price_minor * item.package.tokens:
            dearest[item.package.currency] = item
    out = []
    for item in priced:
        reference = dearest.get(item.package.currency)
        saving = (
            savings_percent(
                item.price_minor, item.package.tokens, reference.price_minor, reference.package.tokens
            )
            if reference is not None
            else 0
        )
        out.append(PricedPackage(item.package, item.price_minor, saving))
    return out


async def catalogue(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID | None,
    *,
    include_archived: bool = False,
) -> list[PricedPackage]:
    """The packages on sale, in display order, at the organization's prices (list prices when
    no organization is given). Archived packages are shown to platform admins only."""
    access.require_authenticated(principal)
    if include_archived:
        access.require_platform_admin(principal)
    if organization_id is not None:
        await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    return await priced_packages(session, organization_id, include_archived=include_archived)


async def priced_packages(
    session: AsyncSession, organization_id: uuid.UUID | None, *, include_archived: bool
) -> list[PricedPackage]:
    """The catalogue at the organization's prices, with savings (no authorization: for callers
    that checked it, and for the public list prices)."""
    statement = select(TokenPackage).order_by(col(TokenPackage.sort), col(TokenPackage.tokens))
    if not include_archived:
        statement = statement.where(col(TokenPackage.active).is_(True))
    packages = list((await session.execute(statement.execution_options(populate_existing=True))).scalars())
    overrides = await _overrides(session, organization_id)
    priced = [PricedPackage(p, _effective(p, overrides)) for p in packages]
    return _with_savings(priced, [item for item in priced if item.package.active])


async def price_package(
    session: AsyncSession, organization_id: uuid.UUID | None, package_id: uuid.UUID, *, on_sale: bool = True
) -> PricedPackage:
    """One package at the organization's price (no savings). ``on_sale``: an archived package
    is refused (it cannot be bought any more)."""
    package = await session.get(TokenPackage, package_id)
    if package is None:
        raise NotFound("package not found")
    if on_sale and not package.active:
        raise InvalidInput("this package is no longer sold", field="packageId")
    return PricedPackage(package, _effective(package, await _overrides(session, organization_id)))


def custom_tokens(settings: Settings, value: object, field: str = "tokens") -> int:
    """A custom token count within the configured minimum and maximum."""
    lowest, highest = settings.min_custom_tokens, settings.max_custom_tokens
    message = f"{field} must be a whole number between {lowest} and {highest}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(message, field=field)
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidInput(message, field=field)
        value = int(value)
    if not lowest <= value <= highest:
        raise InvalidInput(message, field=field)
    return value


async def price_tokens(
    session: AsyncSession,
    settings: Settings,
    organization_id: uuid.UUID | None,
    tokens: object,
    *,
    field: str = "tokens",
) -> Quote:
    """The price of a custom amount (no authorization: callers check it)."""
    count = custom_tokens(settings, tokens, field)
    tier = (
        await session.execute(
            select(PriceTier)
            .where(col(PriceTier.currency) == settings.currency, col(PriceTier.min_tokens) <= count)
            .order_by(col(PriceTier.min_tokens).desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if tier is None:
        raise InvalidInput(f"there is no price for {count} tokens", field=field)
    price = count * tier.unit_price_minor
    everything = (await _overrides(session, organization_id)).get(None)
    if everything is not None and everything.discount_percent is not None:
        price = discounted(price, everything.discount_percent)
    if price > MAX_AMOUNT_MINOR:
        raise InvalidInput(f"{count} tokens cost more than one payment can take", field=field)
    return Quote(tokens=count, price_minor=price, currency=tier.currency)


async def quote(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    organization_id: uuid.UUID,
    tokens: object,
) -> Quote:
    await access.authorize(session, principal, organization_id, Permission.TOKENS_VIEW)
    return await price_tokens(session, settings, organization_id, tokens)


async def list_tiers(session: AsyncSession, principal: Principal, currency: str) -> list[PriceTier]:
    access.require_authenticated(principal)
    return await tiers_of(session, validation.currency_code(currency))


# ---------------------------------------------------------------- management (platform admins)


def _badge(value: str | None) -> str | None:
    cleaned = validation.text(value, "badge", max_length=40, required=False)
    return cleaned or None


def _snapshot(package: TokenPackage) -> dict[str, Any]:
    return {
        "code": package.code,
        "name": package.name,
        "tokens": package.tokens,
        "price_minor": package.price_minor,
        "currency": package.currency,
        "badge": package.badge,
        "active": package.active,
        "sort": package.sort,
    }


async def create_package(
    session: AsyncSession,
    principal: Principal,
    *,
    code: str,
    name: str,
    tokens: object,
    price_minor: object,
    currency: str | None,
    badge: str | None,
    sort: int,
    active: bool,
) -> TokenPackage:
    access.require_platform_admin(principal)
    values = {
        "id": uuid7(),
        "code": validation.catalogue_code(code),
        "name": validation.text(name, "name"),
        "tokens": validation.token_amount(tokens, "tokens"),
        "price_minor": validation.amount_minor(price_minor, "priceMinor"),
        "currency": validation.currency_code(currency),
        "badge": _badge(badge),
        "sort": sort,
        "active": active,
    }
    inserted = await session.execute(
        insert(TokenPackage)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["code"])
        .returning(TokenPackage)
    )
    package = inserted.scalar_one_or_none()
    if package is None:
        raise Conflict(f"a package with code {values['code']!r} exists", code="PACKAGE_CODE_TAKEN")
    await audit.record(
        session,
        principal,
        action="package.create",
        organization_id=None,
        target_type="token_package",
        target_id=package.id,
        after=_snapshot(package),
    )
    return package


async def _package_for_update(session: AsyncSession, package_id: uuid.UUID) -> TokenPackage:
    package = await session.get(TokenPackage, package_id, with_for_update=True, populate_existing=True)
    if package is None:
        raise NotFound("package not found")
    return package


async def update_package(
    session: AsyncSession,
    principal: Principal,
    package_id: uuid.UUID,
    *,
    name: str | None = None,
    tokens: object | None = None,
    price_minor: object | None = None,
    badge: str | None = None,
    sort: int | None = None,
    active: bool | None = None,
    action: str = "package.update",
) -> TokenPackage:
    """Changes what is given (None: unchanged; ``badge=""`` removes the badge). Purchases keep
    the tokens and amount they were started with. Audited even when nothing changes: the
    log records what staff asked for."""
    access.require_platform_admin(principal)
    package = await _package_for_update(session, package_id)
    before = _snapshot(package)
    if name is not None:
        package.name = validation.text(name, "name")
    if tokens is not None:
        package.tokens = validation.token_amount(tokens, "tokens")
    if price_minor is not None:
        package.price_minor = validation.amount_minor(price_minor, "priceMinor")
    if badge is not None:
        package.badge = _badge(badge)
    if sort is not None:
        package.sort = sort
    if active is not None:
        package.active = active
    after = _snapshot(package)
    if after != before:
        package.updated_at = datetime.now(UTC)
        await session.flush()
    await audit.record(
        session,
        principal,
        action=action,
        organization_id=None,
        target_type="token_package",
        target_id=package.id,
        before=before,
        after=after,
    )
    return package


async def archive_package(session: AsyncSession, principal: Principal, package_id: uuid.UUID) -> TokenPackage:
    """Takes a package off sale; purchases and organization prices that name it stay."""
    return await update_package(session, principal, package_id, active=False, action="package.archive")


async def set_tiers(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    *,
    currency: str | None,
    tiers: list[tuple[object, object]],
) -> list[PriceTier]:
    """Replaces the currency's tiers with ``(min_tokens, unit_price_minor)`` pairs. The lowest
    must start at or below the smallest custom amount, so every amount has a price."""
    access.require_platform_admin(principal)
    code = validation.currency_code(currency)
    if not 1 <= len(tiers) <= MAX_TIERS:
        raise InvalidInput(f"give 1 to {MAX_TIERS} tiers", field="tiers")
    parsed = sorted(
        (validation.token_amount(minimum, "minTokens"), validation.amount_minor(unit, "unitPriceMinor"))
        for minimum, unit in tiers
    )
    if len({minimum for minimum, _ in parsed}) != len(parsed):
        raise InvalidInput("two tiers start at the same amount", field="tiers")
    if parsed[0][0] > settings.min_custom_tokens:
        raise InvalidInput(
            f"the lowest tier must start at {settings.min_custom_tokens} token(s) or below", field="tiers"
        )
    before = [
        {"min_tokens": t.min_tokens, "unit_price_minor": t.unit_price_minor}
        for t in await tiers_of(session, code)
    ]
    await session.execute(delete(PriceTier).where(col(PriceTier.currency) == code))
    for minimum, unit in parsed:
        session.add(PriceTier(currency=code, min_tokens=minimum, unit_price_minor=unit))
    await session.flush()
    await audit.record(
        session,
        principal,
        action="price_tiers.set",
        organization_id=None,
        target_type="price_tiers",
        target_id=code,
        before={"tiers": before},
        after={"tiers": [{"min_tokens": m, "unit_price_minor": u} for m, u in parsed]},
    )
    return await tiers_of(session, code)


async def tiers_of(session: AsyncSession, currency: str) -> list[PriceTier]:
    rows = await session.execute(
        select(PriceTier)
        .where(col(PriceTier.currency) == currency)
        .order_by(col(PriceTier.min_tokens))
        .execution_options(populate_existing=True)
    )
    return list(rows.scalars())


async def _require_organization(session: AsyncSession, organization_id: uuid.UUID) -> None:
    if await session.get(Organization, organization_id) is None:
        raise NotFound("organization not found")


def _price_snapshot(row: OrganizationPrice | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "package_id": str(row.package_id) if row.package_id else None,
        "price_minor": row.price_minor,
        "discount_percent": row.discount_percent,
    }


async def set_organization_price(
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    *,
    package_id: uuid.UUID | None,
    price_minor: object | None,
    discount_percent: object | None,
) -> OrganizationPrice:
    """A fixed price for one package, or a discount on one package (or, with no package, on
    everything the organization buys). Replaces what was set for the same package."""
    access.require_platform_admin(principal)
    if (price_minor is None) == (discount_percent is None):
        raise InvalidInput("give exactly one of priceMinor and discountPercent", field="priceMinor")
    price = None if price_minor is None else validation.amount_minor(price_minor, "priceMinor")
    percent: int | None = None
    if discount_percent is not None:
        if (
            isinstance(discount_percent, bool)
            or not isinstance(discount_percent, int)
            or not (1 <= discount_percent <= 99)
        ):
            raise InvalidInput("discountPercent must be a whole number from 1 to 99", field="discountPercent")
        percent = discount_percent
    if price is not None and package_id is None:
        raise InvalidInput("a fixed price is for one package: give packageId", field="packageId")
    await _require_organization(session, organization_id)
    if package_id is not None and await session.get(TokenPackage, package_id) is None:
        raise NotFound("package not found")
    before = (await _overrides(session, organization_id)).get(package_id)
    before_snapshot = _price_snapshot(before)
    now = datetime.now(UTC)
    statement = insert(OrganizationPrice).values(
        id=uuid7(),
        organization_id=organization_id,
        package_id=package_id,
        price_minor=price,
        discount_percent=percent,
        created_by=principal.actor,
    )
    row = (
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["organization_id", "package_id"],
                set_={"price_minor": price, "discount_percent": percent, "updated_at": now},
            )
            .returning(OrganizationPrice)
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    await audit.record(
        session,
        principal,
        action="organization_price.set",
        organization_id=organization_id,
        target_type="organization_price",
        target_id=row.id,
        before=before_snapshot,
        after=_price_snapshot(row),
    )
    return row


async def clear_organization_price(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID, *, package_id: uuid.UUID | None
) -> None:
    access.require_platform_admin(principal)
    await _require_organization(session, organization_id)
    before = (await _overrides(session, organization_id)).get(package_id)
    if before is None:
        raise NotFound("no price is set for this organization and package")
    snapshot = _price_snapshot(before)
    await session.execute(delete(OrganizationPrice).where(col(OrganizationPrice.id) == before.id))
    await audit.record(
        session,
        principal,
        action="organization_price.clear",
        organization_id=organization_id,
        target_type="organization_price",
        target_id=before.id,
        before=snapshot,
    )


async def organization_prices(
    session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> list[OrganizationPrice]:
    access.require_platform_admin(principal)
    return list((await _overrides(session, organization_id)).values())
