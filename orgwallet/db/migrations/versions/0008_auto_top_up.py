"""Automatic top-ups: one policy per organization, at most one top-up in flight per wallet.

- ``auto_top_up_policies``: triggers (a threshold on the available balance, a weekly or monthly
  schedule, or both), what to buy (FIXED tokens or a package, or up to a TARGET balance), a
  monthly spend cap, the run of consecutive failures, why it turned itself off, the schedule
  slot handled last, and the month the cap was told.
- A top-up is a purchase (method 'auto_top_up'). ``purchases_auto_top_up_in_flight``: at most
  one PENDING top-up per organization (so per wallet), whatever the job engine does.
- ``purchases.action_url``: where the customer completes a payment that needs them (a card
  asking for authentication).

Revision ID: 0008
Revises: 0007
"""

from orgwallet.db.migrate import execute_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE auto_top_up_policies (
  organization_id         uuid PRIMARY KEY REFERENCES organizations(id) ON DELETE CASCADE,
  enabled                 boolean NOT NULL,
  threshold               bigint CHECK (threshold BETWEEN 1 AND 9007199254740991),
  schedule_interval       text CHECK (schedule_interval IN ('weekly', 'monthly')),
  schedule_day_of_week    smallint CHECK (schedule_day_of_week BETWEEN 1 AND 7),
  schedule_day_of_month   smallint CHECK (schedule_day_of_month BETWEEN 1 AND 28),
  schedule_hour           smallint CHECK (schedule_hour BETWEEN 0 AND 23),
  schedule_done_slot      timestamptz,  -- the last schedule slot handled (bought, or skipped)
  method                  text NOT NULL CHECK (method IN ('fixed', 'target')),
  tokens                  bigint CHECK (tokens BETWEEN 1 AND 9007199254740991),
  package_id              uuid REFERENCES token_packages(id),
  target_balance          bigint CHECK (target_balance BETWEEN 1 AND 9007199254740991),
  monthly_spend_cap_minor bigint CHECK (monthly_spend_cap_minor BETWEEN 1 AND 9999999999),
  currency                char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  consecutive_failures    integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
  last_failure_at         timestamptz,
  disabled_reason         text,
  cap_told_month          date,
  updated_by              text NOT NULL,
  created_at              timestamptz NOT NULL DEFAULT now(),
  updated_at              timestamptz NOT NULL DEFAULT now(),
  CHECK (threshold IS NOT NULL OR schedule_interval IS NOT NULL),
  CHECK (schedule_interval IS NULL OR schedule_hour IS NOT NULL),
  CHECK (schedule_interval IS DISTINCT FROM 'weekly' OR schedule_day_of_week IS NOT NULL),
  CHECK (schedule_interval IS DISTINCT FROM 'monthly' OR schedule_day_of_month IS NOT NULL),
  CHECK (CASE method
    WHEN 'fixed' THEN (tokens IS NULL) <> (package_id IS NULL) AND target_balance IS NULL
    WHEN 'target' THEN target_balance IS NOT NULL AND tokens IS NULL AND package_id IS NULL
  END),
  CHECK (threshold IS NULL OR target_balance IS NULL OR target_balance > threshold)
);

CREATE UNIQUE INDEX purchases_auto_top_up_in_flight ON purchases (organization_id)
  WHERE method = 'auto_top_up' AND status = 'pending';
CREATE INDEX purchases_auto_top_ups ON purchases (organization_id, created_at)
  WHERE method = 'auto_top_up';

ALTER TABLE purchases ADD COLUMN action_url text CHECK (char_length(action_url) <= 2048);

ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN (
  'low_balance', 'balance_depleted', 'tokens_expiring', 'purchase_paid', 'purchase_failed',
  'purchase_refunded', 'wallet_suspended', 'wallet_reactivated', 'auto_top_up_succeeded',
  'auto_top_up_failed', 'auto_top_up_disabled', 'spend_cap_reached', 'payment_action_required'));
"""

DOWN = r"""
DELETE FROM notifications WHERE kind IN ('auto_top_up_succeeded', 'auto_top_up_failed',
  'auto_top_up_disabled', 'spend_cap_reached', 'payment_action_required');
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN (
  'low_balance', 'balance_depleted', 'tokens_expiring', 'purchase_paid', 'purchase_failed',
  'purchase_refunded', 'wallet_suspended', 'wallet_reactivated'));
ALTER TABLE purchases DROP COLUMN action_url;
DROP INDEX purchases_auto_top_ups;
DROP INDEX purchases_auto_top_up_in_flight;
DROP TABLE auto_top_up_policies;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
