"""Subscription plans: the catalogue that Stripe Billing charges for.

- ``subscription_plans``: one row per plan, each a Stripe Product with a recurring Price.
  ``stripe_product_id`` and ``stripe_price_id`` are NULL between the plan's insert and
  Stripe's answer (``services.plans.create_plan``): such a plan is not shown nor sold.
  A price change makes a new Stripe Price (Stripe's are immutable): ``stripe_price_id`` is
  always the one new subscriptions get.
- The invariants are the table's: tokens per period 0 exactly for an unlimited plan; a period
  of at most one year (Stripe allows three; a longer plan here is a mistake more often than
  not); a rollover cap exactly when unused tokens roll over and the plan is not unlimited,
  and never below one period's allowance.

Revision ID: 0013
Revises: 0012
"""

from orgwallet.db.migrate import execute_script

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE subscription_plans (
  id                uuid PRIMARY KEY DEFAULT uuid_v7(),
  code              text NOT NULL UNIQUE CHECK (code ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  name              text NOT NULL CHECK (char_length(btrim(name)) BETWEEN 1 AND 200),
  tokens_per_period bigint NOT NULL CHECK (tokens_per_period BETWEEN 0 AND 9007199254740991),
  unlimited         boolean NOT NULL DEFAULT false,
  "interval"        text NOT NULL CHECK ("interval" IN ('day', 'week', 'month', 'year')),
  interval_count    integer NOT NULL DEFAULT 1,
  -- Stripe's largest charge is 99,999,999 minor units; GraphQL's Int holds it.
  price_minor       bigint NOT NULL CHECK (price_minor BETWEEN 1 AND 99999999),
  currency          char(3) NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
  rollover          text NOT NULL DEFAULT 'expire' CHECK (rollover IN ('expire', 'rollover')),
  rollover_cap      bigint CHECK (rollover_cap BETWEEN 1 AND 9007199254740991),
  active            boolean NOT NULL DEFAULT true,
  sort              integer NOT NULL DEFAULT 0,
  stripe_product_id text UNIQUE CHECK (stripe_product_id ~ '^prod_'),
  stripe_price_id   text UNIQUE CHECK (stripe_price_id ~ '^price_'),
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT subscription_plans_unlimited CHECK ((tokens_per_period = 0) = unlimited),
  CONSTRAINT subscription_plans_interval_count CHECK (interval_count BETWEEN 1 AND CASE "interval"
    WHEN 'day' THEN 365 WHEN 'week' THEN 52 WHEN 'month' THEN 12 ELSE 1 END),
  CONSTRAINT subscription_plans_rollover_cap CHECK (
    (rollover_cap IS NOT NULL) = (rollover = 'rollover' AND NOT unlimited)),
  CONSTRAINT subscription_plans_cap_holds_a_period CHECK (rollover_cap >= tokens_per_period),
  CONSTRAINT subscription_plans_price_of_product CHECK (
    stripe_price_id IS NULL OR stripe_product_id IS NOT NULL)
);
"""

DOWN = r"""
DROP TABLE subscription_plans;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
