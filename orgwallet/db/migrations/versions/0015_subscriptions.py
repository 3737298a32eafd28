"""Subscriptions: an organization's Stripe subscription to a plan, and its invoices.

- ``subscriptions``: one row per subscription, made INCOMPLETE by ``subscribe`` before its
  Checkout Session exists (so a second ``subscribe`` meets it). At most one per organization is
  not CANCELED (a partial unique index). Its state is Stripe's object as last read:
  ``sync_seq`` is the ``subscription_sync_seq`` value taken just before that read, and a read
  taken earlier is never applied over a later one (webhooks arrive in any order).
  ``plan_id`` is the plan in force for the current period (what was paid for); Stripe's item
  may already be on ``scheduled_plan_id`` (a downgrade at the next renewal).
  ``wallet_suspended_at``: when this subscription's unpaid grace period suspended the wallet;
  cleared when a payment reactivates it, or when platform staff take the wallet's status
  over (their suspension is not undone by a payment).
- ``subscription_invoices``: Stripe's invoices of each subscription as last seen (a status
  never goes back: draft < open < uncollectible < paid | void), with the tokens each granted.
- Five notification kinds.
- ``ledger_grant_subscription`` applies the rollover cap at the start of the wallet's latest
  subscription period, not only at the new grant's: a renewal whose ``invoice.paid`` arrives
  after the next one's (webhooks come in any order) is capped as if it had come in order. The
  carried remainder is cut oldest period first, and it includes that late grant when a later
  period already began.

Revision ID: 0015
Revises: 0014
"""

import importlib.util
import re
from pathlib import Path

from orgwallet.db.migrate import execute_script

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_KINDS = """
  'low_balance', 'balance_depleted', 'tokens_expiring', 'purchase_paid', 'purchase_failed',
  'purchase_refunded', 'wallet_suspended', 'wallet_reactivated', 'auto_top_up_succeeded',
  'auto_top_up_failed', 'auto_top_up_disabled', 'spend_cap_reached', 'payment_action_required',
  'purchase_dispute_won'"""

UP = rf"""
-- Cuts the subscription remainder carried into the period starting at p_boundary to p_cap: the
-- lots of periods that ended by then, oldest period first. Returns the tokens cut.
CREATE FUNCTION ledger_cap_carried(p_wallet uuid, p_boundary timestamptz, p_cap bigint, p_actor text,
                                   p_now timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  carried bigint;
  excess bigint;
  cut bigint := 0;
  take bigint;
  lot record;
  cut_entry ledger_entries;
BEGIN
  SELECT coalesce(sum(remaining), 0) INTO carried FROM credit_lots
  WHERE wallet_id = p_wallet AND source = 'subscription' AND remaining > 0
    AND period_end <= p_boundary AND (expires_at IS NULL OR expires_at > p_boundary);
  excess := carried - p_cap;
  IF excess <= 0 THEN
    RETURN 0;
  END IF;
  FOR lot IN
    SELECT id, remaining FROM credit_lots
    WHERE wallet_id = p_wallet AND source = 'subscription' AND remaining > 0
      AND period_end <= p_boundary AND (expires_at IS NULL OR expires_at > p_boundary)
    ORDER BY period_start, seq
    FOR UPDATE
  LOOP
    take := least(lot.remaining, excess - cut);
    cut_entry := ledger_append(p_wallet, 'expiration', -take, 0, NULL, NULL,
                               'subscription allowance rolled over beyond the cap', NULL, p_actor, lot.id, p_now);
    UPDATE credit_lots SET remaining = remaining - take WHERE id = lot.id;
    INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (cut_entry.id, lot.id, -take);
    cut := cut + take;
    EXIT WHEN cut = excess;
  END LOOP;
  RETURN cut;
END $$;

-- Credits one subscription period's allowance (a lot for [p_period_start, p_period_end),
-- expiring at p_expires_at) and caps the carried remainder (p_cap; NULL: no cap) at the start of
-- the latest period granted: this one's (the cut made before the grant), or a later one's that
-- came first (the cut made after it, this grant counted). detail = the tokens cut.
CREATE OR REPLACE FUNCTION ledger_grant_subscription(p_wallet uuid, p_amount bigint, p_priority smallint,
                                          p_period_start timestamptz, p_period_end timestamptz,
                                          p_expires_at timestamptz, p_cap bigint, p_cost_minor bigint,
                                          p_currency text, p_key text, p_reason text, p_metadata jsonb,
                                          p_actor text, p_reference uuid, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  e ledger_entries;
  w wallets;
  fp uuid := ledger_fingerprint('subscription_grant', p_amount, p_reason, p_metadata,
                                concat_ws('|', p_priority, extract(epoch FROM p_period_start),
                                          extract(epoch FROM p_period_end), extract(epoch FROM p_expires_at),
                                          coalesce(p_cap::text, 'uncapped'), p_cost_minor, p_currency,
                                          p_reference));
  replay ledger_outcome;
  boundary timestamptz;
  cut bigint := 0;
  lot_id uuid;
BEGIN
  w := ledger_open(p_wallet, p_now);
  IF w.id IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, p_wallet);
  END IF;
  replay := ledger_replay(p_wallet, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  SELECT greatest(p_period_start, max(period_start)) INTO boundary FROM credit_lots
  WHERE wallet_id = p_wallet AND source = 'subscription';
  IF p_cap IS NOT NULL AND boundary = p_period_start THEN
    cut := ledger_cap_carried(p_wallet, boundary, p_cap, p_actor, p_now);
  END IF;
  e := ledger_append(p_wallet, 'subscription_grant', p_amount, 0, p_key, fp, p_reason, p_metadata, p_actor,
                     p_reference, p_now);
  lot_id := ledger_new_lot(p_wallet, e.id, 'subscription', p_amount, p_priority, p_expires_at, p_cost_minor,
                           p_currency, NULL, p_now);
  UPDATE credit_lots SET period_start = p_period_start, period_end = p_period_end WHERE id = lot_id;
  IF p_cap IS NOT NULL AND boundary > p_period_start THEN
    cut := ledger_cap_carried(p_wallet, boundary, p_cap, p_actor, p_now);
  END IF;
  IF p_expires_at IS NOT NULL AND p_expires_at <= p_now THEN
    PERFORM ledger_sweep_lots(p_wallet, p_now);
  END IF;
  RETURN ledger_result('ok', e, p_wallet, NULL, cut);
END $$;

CREATE SEQUENCE subscription_sync_seq;

CREATE TABLE subscriptions (
  id                         uuid PRIMARY KEY DEFAULT uuid_v7(),
  organization_id            uuid NOT NULL REFERENCES organizations(id),
  plan_id                    uuid NOT NULL REFERENCES subscription_plans(id),
  scheduled_plan_id          uuid REFERENCES subscription_plans(id),
  status                     text NOT NULL DEFAULT 'incomplete' CHECK (status IN (
                               'incomplete', 'trialing', 'active', 'past_due', 'paused', 'canceled')),
  idempotency_key            text CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
  checkout_session_id        text UNIQUE,
  checkout_url               text,
  stripe_subscription_id     text UNIQUE CHECK (stripe_subscription_id ~ '^sub_'),
  stripe_item_id             text,
  stripe_price_id            text,
  renewal_amount_minor       bigint CHECK (renewal_amount_minor >= 0),
  currency                   char(3) NOT NULL,
  current_period_start       timestamptz,
  current_period_end         timestamptz,
  plan_since                 timestamptz,
  cancel_at_period_end       boolean NOT NULL DEFAULT false,
  canceled_at                timestamptz,
  paused_at                  timestamptz,
  grace_ends_at              timestamptz,
  grace_expired_at           timestamptz,
  wallet_suspended_at        timestamptz,
  reminded_period_end        timestamptz,
  changing_until             timestamptz,  -- a member's change is with Stripe (one at a time)
  sync_seq                   bigint NOT NULL DEFAULT 0,
  created_at                 timestamptz NOT NULL DEFAULT now(),
  updated_at                 timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT subscriptions_period CHECK (current_period_end > current_period_start),
  -- A grace runs while PAST_DUE, and goes on after the subscription ends unpaid.
  CONSTRAINT subscriptions_grace_when_unpaid CHECK (grace_ends_at IS NULL OR status IN ('past_due', 'canceled')),
  CONSTRAINT subscriptions_scheduled_differs CHECK (scheduled_plan_id <> plan_id)
);
CREATE UNIQUE INDEX subscriptions_one_live ON subscriptions (organization_id) WHERE status <> 'canceled';
CREATE UNIQUE INDEX subscriptions_key ON subscriptions (organization_id, idempotency_key);
CREATE INDEX subscriptions_grace_due ON subscriptions (grace_ends_at)
  WHERE status = 'past_due' AND grace_expired_at IS NULL;
CREATE INDEX subscriptions_renewing ON subscriptions (current_period_end)
  WHERE status IN ('active', 'trialing') AND NOT cancel_at_period_end;

CREATE TABLE subscription_invoices (
  id                 uuid PRIMARY KEY DEFAULT uuid_v7(),
  subscription_id    uuid NOT NULL REFERENCES subscriptions(id),
  stripe_invoice_id  text NOT NULL UNIQUE CHECK (stripe_invoice_id ~ '^in_'),
  status             text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'void', 'uncollectible')),
  billing_reason     text,
  amount_minor       bigint NOT NULL CHECK (amount_minor >= 0),
  currency           char(3) NOT NULL,
  period_start       timestamptz NOT NULL,
  period_end         timestamptz NOT NULL,
  tokens_granted     bigint NOT NULL DEFAULT 0 CHECK (tokens_granted >= 0),
  hosted_invoice_url text,
  paid_at            timestamptz,
  attempt_count      integer NOT NULL DEFAULT 0,
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT subscription_invoices_period CHECK (period_end >= period_start)
);
CREATE INDEX subscription_invoices_newest ON subscription_invoices
  (subscription_id, period_start DESC, id DESC);

ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN ({_KINDS},
  'subscription_started', 'subscription_renewed', 'subscription_payment_failed',
  'subscription_renewal_upcoming', 'subscription_canceled'));
"""  # noqa: S608 (constants only)

DOWN = rf"""
DELETE FROM notifications WHERE kind LIKE 'subscription\_%';
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN ({_KINDS}));
DROP TABLE subscription_invoices;
DROP TABLE subscriptions;
DROP SEQUENCE subscription_sync_seq;
"""  # noqa: S608 (constants only)


def _grant_of_0014() -> str:
    """0014's ledger_grant_subscription, as CREATE OR REPLACE: one source of the old text."""
    spec = importlib.util.spec_from_file_location(
        "_ledger_0014", Path(__file__).with_name("0014_subscription_ledger.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    match = re.search(r"CREATE FUNCTION ledger_grant_subscription\(.*?END \$\$;", module.UP, re.S)
    assert match is not None
    return match.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(
        DOWN
        + _grant_of_0014()
        + "\nDROP FUNCTION ledger_cap_carried(uuid, timestamptz, bigint, text, timestamptz);"
    )
