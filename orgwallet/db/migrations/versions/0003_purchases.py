"""Buying tokens: the package catalogue, volume tiers, per-organization prices, Stripe
customers, purchases, the received Stripe events, and payment alerts.

Seeds the default catalogue (10 / 50 / 100 / 500 tokens) and the default volume tiers
(1-49 at 100, 50-499 at 90, 500 and more at 80 minor units per token, USD).

Revision ID: 0003
Revises: 0002
"""

from orgwallet.db.migrate import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE token_packages (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  code        text NOT NULL UNIQUE CHECK (code ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  name        text NOT NULL CHECK (char_length(btrim(name)) BETWEEN 1 AND 200),
  tokens      bigint NOT NULL CHECK (tokens > 0),
  -- Stripe's largest charge is 99,999,999 minor units; GraphQL's Int holds it.
  price_minor bigint NOT NULL CHECK (price_minor BETWEEN 1 AND 99999999),
  currency    char(3) NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
  badge       text CHECK (char_length(btrim(badge)) BETWEEN 1 AND 40),
  active      boolean NOT NULL DEFAULT true,
  sort        integer NOT NULL DEFAULT 0,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Volume tiers for custom amounts: the tier with the largest min_tokens <= the amount
-- prices every token of it.
CREATE TABLE price_tiers (
  id               uuid PRIMARY KEY DEFAULT uuid_v7(),
  currency         char(3) NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
  min_tokens       bigint NOT NULL CHECK (min_tokens > 0),
  unit_price_minor bigint NOT NULL CHECK (unit_price_minor BETWEEN 1 AND 99999999),
  created_at       timestamptz NOT NULL DEFAULT now(),
  UNIQUE (currency, min_tokens)
);

-- What one organization pays: for one package a fixed price or a discount; with no package,
-- a discount on every package and on custom amounts.
CREATE TABLE organization_prices (
  id               uuid PRIMARY KEY DEFAULT uuid_v7(),
  organization_id  uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  package_id       uuid REFERENCES token_packages(id),
  price_minor      bigint CHECK (price_minor BETWEEN 1 AND 99999999),
  discount_percent smallint CHECK (discount_percent BETWEEN 1 AND 99),
  created_by       text NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  CHECK ((price_minor IS NULL) <> (discount_percent IS NULL)),
  CHECK (package_id IS NOT NULL OR price_minor IS NULL),
  UNIQUE NULLS NOT DISTINCT (organization_id, package_id)
);

CREATE TABLE stripe_customers (
  organization_id        uuid PRIMARY KEY REFERENCES organizations(id) ON DELETE CASCADE,
  customer_id            text NOT NULL UNIQUE CHECK (customer_id ~ '^cus_'),
  default_payment_method text CHECK (default_payment_method ~ '^(pm|card|src)_'),
  created_at             timestamptz NOT NULL DEFAULT now(),
  updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE purchase_reference_seq;

-- PUR-000001 ... PUR-999999, then PUR-1000000: never truncated.
CREATE FUNCTION purchase_reference() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT 'PUR-' || lpad(n::text, greatest(6, length(n::text)), '0')
  FROM nextval('purchase_reference_seq') AS n
$$;

CREATE TABLE purchases (
  id                  uuid PRIMARY KEY DEFAULT uuid_v7(),
  reference           text NOT NULL UNIQUE DEFAULT purchase_reference(),
  organization_id     uuid NOT NULL REFERENCES organizations(id),
  package_id          uuid REFERENCES token_packages(id),
  tokens              bigint NOT NULL CHECK (tokens > 0),
  amount_minor        bigint NOT NULL CHECK (amount_minor BETWEEN 1 AND 99999999),
  currency            char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  status              text NOT NULL DEFAULT 'pending' CHECK (status IN
                        ('pending', 'paid', 'failed', 'expired', 'refunded', 'partially_refunded', 'disputed')),
  method              text NOT NULL CHECK (method IN ('checkout', 'saved_card', 'auto_top_up')),
  idempotency_key     text CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
  checkout_session_id text UNIQUE,
  checkout_url        text,
  payment_intent_id   text UNIQUE,
  charge_id           text,
  receipt_url         text,
  failure_reason      text CHECK (char_length(failure_reason) <= 1000),
  lot_id              uuid UNIQUE REFERENCES credit_lots(id),   -- the lot the purchase credited
  refunded_minor      bigint NOT NULL DEFAULT 0,
  tokens_clawed_back  bigint NOT NULL DEFAULT 0 CHECK (tokens_clawed_back >= 0),
  shortfall           bigint NOT NULL DEFAULT 0 CHECK (shortfall >= 0),  -- spent before it could be taken back
  dispute_id          text,
  dispute_status      text,
  created_by          text NOT NULL,
  created_at          timestamptz NOT NULL DEFAULT now(),
  updated_at          timestamptz NOT NULL DEFAULT now(),
  paid_at             timestamptz,
  UNIQUE (organization_id, idempotency_key),
  CHECK (refunded_minor BETWEEN 0 AND amount_minor),
  CHECK (tokens_clawed_back + shortfall <= tokens),
  -- Tokens were credited exactly when the purchase is in a paid state (refunds and disputes
  -- of a purchase come after its credit).
  CHECK ((lot_id IS NOT NULL) = (status IN ('paid', 'refunded', 'partially_refunded', 'disputed'))),
  CHECK ((lot_id IS NOT NULL) = (paid_at IS NOT NULL)),
  CHECK (status <> 'disputed' OR dispute_id IS NOT NULL),
  CHECK (method <> 'checkout' OR status = 'pending' OR checkout_session_id IS NOT NULL)
);
CREATE INDEX purchases_organization ON purchases (organization_id, id DESC);
CREATE INDEX purchases_organization_status ON purchases (organization_id, status, id DESC);

-- Every verified Stripe event, stored once under its id. handled_at is stamped in the same
-- transaction as the event's effect; a failed attempt leaves the row unhandled with its error.
CREATE TABLE stripe_events (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  event_id    text NOT NULL UNIQUE CHECK (char_length(event_id) BETWEEN 1 AND 255),
  type        text NOT NULL,
  livemode    boolean NOT NULL DEFAULT false,
  payload     jsonb NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  handled_at  timestamptz,
  outcome     text,          -- credited, duplicate, unknown_purchase, mismatch, ignored, ...
  error       text,          -- the last failure, when an attempt failed
  attempts    integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
  CHECK ((handled_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX stripe_events_unhandled ON stripe_events (received_at) WHERE handled_at IS NULL;

-- Payments that must not be credited as they came: a paid amount or currency that is not the
-- purchase's. Someone must look (each also writes an audit row).
CREATE TABLE payment_alerts (
  id                    uuid PRIMARY KEY DEFAULT uuid_v7(),
  kind                  text NOT NULL CHECK (kind IN ('amount_mismatch', 'currency_mismatch')),
  organization_id       uuid REFERENCES organizations(id),
  purchase_id           uuid REFERENCES purchases(id),
  stripe_event_id       text,
  stripe_object_id      text,
  expected_amount_minor bigint,
  expected_currency     char(3),
  received_amount_minor bigint,
  received_currency     text,
  created_at            timestamptz NOT NULL DEFAULT now(),
  resolved_at           timestamptz
);
CREATE INDEX payment_alerts_open ON payment_alerts (created_at) WHERE resolved_at IS NULL;
CREATE INDEX payment_alerts_purchase ON payment_alerts (purchase_id);

INSERT INTO token_packages (code, name, tokens, price_minor, currency, badge, sort) VALUES
  ('tokens-10',  '10 tokens',  10,  1000,  'USD', NULL,         10),
  ('tokens-50',  '50 tokens',  50,  4500,  'USD', NULL,         20),
  ('tokens-100', '100 tokens', 100, 9000,  'USD', NULL,         30),
  ('tokens-500', '500 tokens', 500, 40000, 'USD', 'BEST VALUE', 40);

INSERT INTO price_tiers (currency, min_tokens, unit_price_minor) VALUES
  ('USD', 1, 100),
  ('USD', 50, 90),
  ('USD', 500, 80);
"""

DOWN = r"""
DROP TABLE payment_alerts, stripe_events, purchases, stripe_customers, organization_prices, price_tiers,
  token_packages;
DROP FUNCTION purchase_reference();
DROP SEQUENCE purchase_reference_seq;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
