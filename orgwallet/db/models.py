"""SQLModel tables. The DDL, with every CHECK, trigger and function, lives in the migrations;
these classes mirror it for typed reads and simple writes outside the ledger."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, SmallInteger, Text, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PgUUID
from sqlmodel import Field, SQLModel
from uuid6 import uuid7


def utcnow() -> datetime:
    return datetime.now(UTC)


def _id() -> Any:
    return Field(default_factory=uuid7, sa_column=Column(PgUUID(as_uuid=True), primary_key=True))


def _ts(nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    return Field(
        default_factory=utcnow,
        sa_column=Column(DateTime(timezone=True), nullable=False, server_default=text("now()")),
    )


def _ref(nullable: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(PgUUID(as_uuid=True), nullable=nullable),
    )


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    BILLING = "billing"
    MEMBER = "member"
    VIEWER = "viewer"


class Organization(SQLModel, table=True):
    __tablename__ = "organizations"
    id: uuid.UUID = _id()
    name: str
    slug: str
    created_at: datetime = _ts()


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: uuid.UUID = _id()
    subject: str
    email: str | None = None
    name: str | None = None
    created_at: datetime = _ts()


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"
    organization_id: uuid.UUID = Field(sa_column=Column(PgUUID(as_uuid=True), primary_key=True))
    user_id: uuid.UUID = Field(sa_column=Column(PgUUID(as_uuid=True), primary_key=True))
    role: Role = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ts()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: uuid.UUID = _id()
    organization_id: uuid.UUID = _ref()
    name: str
    prefix: str
    secret_hash: str
    scopes: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    created_by: str
    created_at: datetime = _ts()
    last_used_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"
    id: uuid.UUID = _id()
    at: datetime = _ts()
    actor: str
    action: str
    organization_id: uuid.UUID | None = _ref(nullable=True)
    target_type: str
    target_id: str | None = None
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    request_id: str | None = None


class WalletStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class Wallet(SQLModel, table=True):
    __tablename__ = "wallets"
    id: uuid.UUID = _id()
    organization_id: uuid.UUID = _ref()
    status: WalletStatus = Field(sa_column=Column(Text, nullable=False))
    balance: int = Field(sa_column=Column(BigInteger, nullable=False))
    reserved: int = Field(sa_column=Column(BigInteger, nullable=False))
    lifetime_purchased: int = Field(sa_column=Column(BigInteger, nullable=False))
    lifetime_granted: int = Field(sa_column=Column(BigInteger, nullable=False))
    lifetime_consumed: int = Field(sa_column=Column(BigInteger, nullable=False))
    lifetime_expired: int = Field(sa_column=Column(BigInteger, nullable=False))
    entry_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class CreditLot(SQLModel, table=True):
    __tablename__ = "credit_lots"
    id: uuid.UUID = _id()
    wallet_id: uuid.UUID = _ref()
    source: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    remaining: int = Field(sa_column=Column(BigInteger, nullable=False))
    priority: int = Field(sa_column=Column(SmallInteger, nullable=False))
    expires_at: datetime | None = _ts(nullable=True)
    cost_minor: int | None = Field(default=None, sa_column=Column(BigInteger))
    currency: str | None = None
    entry_id: uuid.UUID = _ref()
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    origin_lot_id: uuid.UUID | None = _ref(nullable=True)
    created_at: datetime = _ts()


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger_entries"
    id: uuid.UUID = _id()
    wallet_id: uuid.UUID = _ref()
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    held_change: int = Field(sa_column=Column(BigInteger, nullable=False))
    balance_after: int = Field(sa_column=Column(BigInteger, nullable=False))
    reserved_after: int = Field(sa_column=Column(BigInteger, nullable=False))
    idempotency_key: str | None = None
    fingerprint: uuid.UUID | None = _ref(nullable=True)
    reason: str | None = None
    metadata_: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSONB, nullable=True))
    actor: str | None = None
    reference_id: uuid.UUID | None = _ref(nullable=True)
    created_at: datetime = _ts()


class Reservation(SQLModel, table=True):
    __tablename__ = "reservations"
    id: uuid.UUID = _id()
    wallet_id: uuid.UUID = _ref()
    entry_id: uuid.UUID = _ref()
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    captured: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    reason: str | None = None
    settled_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts()


# ---------------------------------------------------------------- buying tokens (migration 0003)


class TokenPackage(SQLModel, table=True):
    __tablename__ = "token_packages"
    id: uuid.UUID = _id()
    code: str
    name: str
    tokens: int = Field(sa_column=Column(BigInteger, nullable=False))
    price_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str
    badge: str | None = None
    active: bool = True
    sort: int = 0
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class PriceTier(SQLModel, table=True):
    __tablename__ = "price_tiers"
    id: uuid.UUID = _id()
    currency: str
    min_tokens: int = Field(sa_column=Column(BigInteger, nullable=False))
    unit_price_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = _ts()


class OrganizationPrice(SQLModel, table=True):
    __tablename__ = "organization_prices"
    id: uuid.UUID = _id()
    organization_id: uuid.UUID = _ref()
    package_id: uuid.UUID | None = _ref(nullable=True)
    price_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    discount_percent: int | None = Field(default=None, sa_column=Column(SmallInteger, nullable=True))
    created_by: str
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class StripeCustomer(SQLModel, table=True):
    __tablename__ = "stripe_customers"
    organization_id: uuid.UUID = Field(sa_column=Column(PgUUID(as_uuid=True), primary_key=True))
    customer_id: str
    default_payment_method: str | None = None
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class PurchaseStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"
    DISPUTED = "disputed"


class PurchaseMethod(enum.StrEnum):
    CHECKOUT = "checkout"
    SAVED_CARD = "saved_card"
    AUTO_TOP_UP = "auto_top_up"


class Purchase(SQLModel, table=True):
    __tablename__ = "purchases"
    id: uuid.UUID = _id()
    reference: str = Field(
        default=None, sa_column=Column(Text, nullable=False, server_default=text("purchase_reference()"))
    )
    organization_id: uuid.UUID = _ref()
    package_id: uuid.UUID | None = _ref(nullable=True)
    tokens: int = Field(sa_column=Column(BigInteger, nullable=False))
    amount_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str
    status: PurchaseStatus = Field(sa_column=Column(Text, nullable=False))
    method: PurchaseMethod = Field(sa_column=Column(Text, nullable=False))
    idempotency_key: str | None = None
    checkout_session_id: str | None = None
    checkout_url: str | None = None
    action_url: str | None = None  # where the customer completes a payment that needs them
    payment_intent_id: str | None = None
    charge_id: str | None = None
    receipt_url: str | None = None
    failure_reason: str | None = None
    lot_id: uuid.UUID | None = _ref(nullable=True)
    refunded_minor: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    tokens_clawed_back: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    shortfall: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    dispute_id: str | None = None
    dispute_status: str | None = None  # Stripe's
    dispute_amount_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    dispute_tokens_taken: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    dispute_shortfall: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    dispute_tokens_returned: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    dispute_opened_at: datetime | None = _ts(nullable=True)
    dispute_closed_at: datetime | None = _ts(nullable=True)
    created_by: str
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    paid_at: datetime | None = _ts(nullable=True)


class StripeEvent(SQLModel, table=True):
    __tablename__ = "stripe_events"
    id: uuid.UUID = _id()
    event_id: str
    type: str
    livemode: bool = False
    payload: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    received_at: datetime = _ts()
    handled_at: datetime | None = _ts(nullable=True)
    outcome: str | None = None
    error: str | None = None
    attempts: int = 1


class PaymentAlert(SQLModel, table=True):
    __tablename__ = "payment_alerts"
    id: uuid.UUID = _id()
    kind: str
    organization_id: uuid.UUID | None = _ref(nullable=True)
    purchase_id: uuid.UUID | None = _ref(nullable=True)
    stripe_event_id: str | None = None
    stripe_object_id: str | None = None
    expected_amount_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    expected_currency: str | None = None
    received_amount_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    received_currency: str | None = None
    created_at: datetime = _ts()
    resolved_at: datetime | None = _ts(nullable=True)


class SubscriptionPlan(SQLModel, table=True):
    """A plan (migration 0013): ``interval`` and ``rollover`` hold the values of
    ``services.plans.PlanInterval`` and ``RolloverPolicy``."""

    __tablename__ = "subscription_plans"
    id: uuid.UUID = _id()
    code: str
    name: str
    tokens_per_period: int = Field(sa_column=Column(BigInteger, nullable=False))
    unlimited: bool = False
    interval: str
    interval_count: int = 1
    price_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str
    rollover: str
    rollover_cap: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    active: bool = True
    sort: int = 0
    stripe_product_id: str | None = None
    stripe_price_id: str | None = None
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class SubscriptionStatus(enum.StrEnum):
    INCOMPLETE = "incomplete"  # made by subscribe; its Checkout not paid yet
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    PAUSED = "paused"  # collection paused: renewals are voided and grant nothing
    CANCELED = "canceled"


class Subscription(SQLModel, table=True):
    """An organization's Stripe subscription (migration 0015): Stripe's object as last read."""

    __tablename__ = "subscriptions"
    id: uuid.UUID = _id()
    organization_id: uuid.UUID = _ref()
    plan_id: uuid.UUID = _ref()
    scheduled_plan_id: uuid.UUID | None = _ref(nullable=True)
    status: str = SubscriptionStatus.INCOMPLETE.value
    idempotency_key: str | None = None
    checkout_session_id: str | None = None
    checkout_url: str | None = None
    stripe_subscription_id: str | None = None
    stripe_item_id: str | None = None
    stripe_price_id: str | None = None
    renewal_amount_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    currency: str
    current_period_start: datetime | None = _ts(nullable=True)
    current_period_end: datetime | None = _ts(nullable=True)
    plan_since: datetime | None = _ts(nullable=True)
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = _ts(nullable=True)
    paused_at: datetime | None = _ts(nullable=True)
    grace_ends_at: datetime | None = _ts(nullable=True)
    grace_expired_at: datetime | None = _ts(nullable=True)
    wallet_suspended_at: datetime | None = _ts(nullable=True)
    reminded_period_end: datetime | None = _ts(nullable=True)
    changing_until: datetime | None = _ts(nullable=True)
    sync_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class SubscriptionInvoice(SQLModel, table=True):
    """A Stripe invoice of a subscription as last seen, with the tokens it granted."""

    __tablename__ = "subscription_invoices"
    id: uuid.UUID = _id()
    subscription_id: uuid.UUID = _ref()
    stripe_invoice_id: str
    status: str
    billing_reason: str | None = None
    amount_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str
    period_start: datetime = _ts()
    period_end: datetime = _ts()
    tokens_granted: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    hosted_invoice_url: str | None = None
    paid_at: datetime | None = _ts(nullable=True)
    attempt_count: int = 0
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
