"""The ledger learns subscriptions: period grants with rollover, and unlimited-plan coverage.

- ``credit_lots.period_start/period_end``: the billing period a subscription lot was granted
  for. ``ledger_grant_subscription`` credits a period's allowance (a SUBSCRIPTION_GRANT entry
  and lot, idempotent on the invoice's key) and, in the same call under the wallet's lock,
  caps what rolls over: the subscription lots of earlier periods still alive in the new one
  (``period_end <= p_period_start``, not expiring by then) keep at most ``p_cap`` tokens in
  all; what is beyond is expired, oldest lot first, as EXPIRATION entries. EXPIRE plans pass
  cap 0 (their lots also expire at ``period_end``); ROLLOVER plans their cap (NULL: no cap).
  The cap bounds the carried remainder, not remainder + new grant. A mid-period upgrade's
  grant (period starting at the upgrade, lots of the same period untouched) cuts nothing new.
- ``wallets.covered_until``: an unlimited plan covers the wallet's consumptions until then
  (``ledger_set_coverage``; NULL: not covered). A covered consumption, reservation, capture or
  release is recorded like any other (key, fingerprint, reason, metadata, actor) but moves no
  tokens: ``amount = 0``, ``held_change = 0``, and ``ledger_entries.covered`` holds the tokens
  asked for. Sums of signed entries still equal the balances; no lot is drawn; no lifetime
  counter moves (``lifetime_consumed`` counts tokens drawn, which a covered use is not). The
  wallet's balance is not written (``ledger_append_covered``), so neither the wallet-change
  signal nor the live trigger fires. Suspension still refuses first; a replay is a replay
  whatever the coverage now. A wallet not covered pays one comparison (``covered_until > now``,
  NULL is false) on the row it has locked.
- ``reservations.covered``: a reservation made while covered is a covered hold: it draws
  nothing and holds nothing (``wallet.reserved`` excludes it), and its capture, partial
  capture's rest, release or expiry are covered entries too, whatever the coverage then. A
  hold made before coverage began is captured as usual (its tokens were drawn when made).
- A covered entry gives nothing to refund (it drew nothing): ``not_refundable``.
- ``ledger_outcome.entry_covered``: the covered tokens of the entry answered.

Revision ID: 0014
Revises: 0013
"""

import importlib.util
import re
from pathlib import Path

from orgwallet.db.migrate import execute_script

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UP = r"""
ALTER TABLE wallets ADD COLUMN covered_until timestamptz;

ALTER TABLE reservations ADD COLUMN covered boolean NOT NULL DEFAULT false;

ALTER TABLE credit_lots
  ADD COLUMN period_start timestamptz,
  ADD COLUMN period_end timestamptz,
  ADD CONSTRAINT credit_lots_period CHECK ((period_start IS NULL) = (period_end IS NULL)
                                           AND period_start < period_end);

ALTER TABLE ledger_entries ADD COLUMN covered bigint CHECK (covered > 0);
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_direction;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_direction CHECK (CASE
  WHEN covered IS NOT NULL THEN
    kind IN ('consumption', 'reservation', 'capture', 'release') AND amount = 0 AND held_change = 0
  ELSE CASE kind
    WHEN 'purchase'           THEN amount > 0 AND held_change = 0
    WHEN 'subscription_grant' THEN amount > 0 AND held_change = 0
    WHEN 'trial_grant'        THEN amount > 0 AND held_change = 0
    WHEN 'admin_grant'        THEN amount > 0 AND held_change = 0
    WHEN 'refund'             THEN amount > 0 AND held_change = 0
    WHEN 'consumption'        THEN amount < 0 AND held_change = 0
    WHEN 'expiration'         THEN amount < 0 AND held_change = 0
    WHEN 'clawback'           THEN amount < 0 AND held_change = 0
    WHEN 'reservation'        THEN amount < 0 AND held_change = -amount
    WHEN 'capture'            THEN amount = 0 AND held_change < 0
    WHEN 'release'            THEN amount > 0 AND held_change = -amount
    WHEN 'adjustment'         THEN amount <> 0 AND held_change = 0
    ELSE false END
  END);

ALTER TYPE ledger_outcome ADD ATTRIBUTE entry_covered bigint;

CREATE OR REPLACE FUNCTION ledger_result(p_outcome text, e ledger_entries, p_wallet uuid,
                                         p_reservation uuid DEFAULT NULL, p_detail bigint DEFAULT NULL)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  res ledger_outcome;
  r_status text;
BEGIN
  SELECT * INTO w FROM wallets WHERE id = p_wallet;
  IF p_reservation IS NOT NULL THEN
    SELECT status INTO r_status FROM reservations WHERE id = p_reservation;
  END IF;
  res := ROW(p_outcome, e.id, e.seq, e.kind, e.amount, e.held_change, e.balance_after, e.reserved_after,
             e.idempotency_key, e.reason, e.metadata, e.created_at, p_reservation, r_status,
             w.id, w.organization_id, w.status, w.balance, w.reserved, w.lifetime_purchased,
             w.lifetime_granted, w.lifetime_consumed, w.lifetime_expired, p_detail, e.covered)::ledger_outcome;
  RETURN res;
END $$;

-- Appends an entry that moves no tokens: p_covered tokens used under an unlimited plan. Only
-- the entry sequence is written on the wallet (no balance: no signal, no live update).
CREATE FUNCTION ledger_append_covered(p_wallet uuid, p_kind text, p_covered bigint, p_key text,
                                      p_fingerprint uuid, p_reason text, p_metadata jsonb, p_actor text,
                                      p_reference uuid, p_now timestamptz)
RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
BEGIN
  UPDATE wallets SET entry_seq = entry_seq + 1, updated_at = p_now WHERE id = p_wallet RETURNING * INTO w;
  INSERT INTO ledger_entries (wallet_id, seq, kind, amount, held_change, balance_after, reserved_after,
                              idempotency_key, fingerprint, reason, metadata, actor, reference_id, created_at,
                              covered)
  VALUES (p_wallet, w.entry_seq, p_kind, 0, 0, w.balance, w.reserved, p_key, p_fingerprint, p_reason,
          p_metadata, p_actor, p_reference, p_now, p_covered)
  RETURNING * INTO e;
  RETURN e;
END $$;

CREATE OR REPLACE FUNCTION ledger_consume(p_wallet uuid, p_amount bigint, p_key text, p_reason text,
                                          p_metadata jsonb, p_actor text, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
  fp uuid := ledger_fingerprint('consumption', p_amount, p_reason, p_metadata);
  replay ledger_outcome;
BEGIN
  w := ledger_open(p_wallet, p_now);
  IF w.id IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, p_wallet);
  END IF;
  replay := ledger_replay(p_wallet, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  IF w.status <> 'active' THEN
    RETURN ledger_result('suspended', NULL::ledger_entries, p_wallet);
  END IF;
  IF w.covered_until > p_now THEN
    e := ledger_append_covered(p_wallet, 'consumption', p_amount, p_key, fp, p_reason, p_metadata, p_actor,
                               NULL, p_now);
    RETURN ledger_result('ok', e, p_wallet);
  END IF;
  IF w.balance < p_amount THEN
    RETURN ledger_result('insufficient', NULL::ledger_entries, p_wallet, NULL, w.balance);
  END IF;
  e := ledger_append(p_wallet, 'consumption', -p_amount, 0, p_key, fp, p_reason, p_metadata, p_actor, NULL, p_now);
  PERFORM ledger_draw(p_wallet, e.id, p_amount, p_now);
  RETURN ledger_result('ok', e, p_wallet);
END $$;

CREATE OR REPLACE FUNCTION ledger_reserve(p_wallet uuid, p_amount bigint, p_key text, p_ttl_seconds integer,
                                          p_reason text, p_actor text, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
  r_id uuid := uuid_v7();
  fp uuid := ledger_fingerprint('reservation', p_amount, p_reason, NULL, p_ttl_seconds::text);
  replay ledger_outcome;
  v_covered boolean;
BEGIN
  w := ledger_open(p_wallet, p_now);
  IF w.id IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, p_wallet);
  END IF;
  -- A replay compares the TTL asked for, not the instant, so a retry later still matches.
  replay := ledger_replay(p_wallet, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  IF w.status <> 'active' THEN
    RETURN ledger_result('suspended', NULL::ledger_entries, p_wallet);
  END IF;
  v_covered := coalesce(w.covered_until > p_now, false);
  IF v_covered THEN
    e := ledger_append_covered(p_wallet, 'reservation', p_amount, p_key, fp, p_reason, NULL, p_actor, r_id, p_now);
  ELSIF w.balance < p_amount THEN
    RETURN ledger_result('insufficient', NULL::ledger_entries, p_wallet, NULL, w.balance);
  ELSE
    e := ledger_append(p_wallet, 'reservation', -p_amount, p_amount, p_key, fp, p_reason, NULL, p_actor, r_id,
                       p_now);
    PERFORM ledger_draw(p_wallet, e.id, p_amount, p_now);
  END IF;
  INSERT INTO reservations (id, wallet_id, entry_id, amount, expires_at, reason, created_at, covered)
  VALUES (r_id, p_wallet, e.id, p_amount, p_now + make_interval(secs => p_ttl_seconds), p_reason, p_now, v_covered);
  RETURN ledger_result('ok', e, p_wallet, r_id);
END $$;

-- Releases a held reservation's tokens back to its lots (a covered hold: records its end).
-- The wallet must be locked.
CREATE OR REPLACE FUNCTION ledger_unhold(p_wallet uuid, r reservations, p_amount bigint, p_reason text,
                                         p_actor text, p_now timestamptz)
RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
  e ledger_entries;
BEGIN
  IF r.covered THEN
    RETURN ledger_append_covered(p_wallet, 'release', p_amount, NULL, NULL, p_reason, NULL, p_actor, r.id, p_now);
  END IF;
  e := ledger_append(p_wallet, 'release', p_amount, -p_amount, NULL, NULL, p_reason, NULL,
                     p_actor, r.id, p_now);
  PERFORM ledger_give_back(p_wallet, e.id, r.entry_id, ARRAY[r.id], p_amount, false, p_now);
  RETURN e;
END $$;

-- Captures p_amount (NULL: all) of an open reservation; the rest returns to the lots.
CREATE OR REPLACE FUNCTION ledger_capture(p_reservation uuid, p_amount bigint, p_key text, p_actor text,
                                          p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_wallet uuid;
  w wallets;
  r reservations;
  e ledger_entries;
  take bigint;
  fp uuid;
  replay ledger_outcome;
BEGIN
  SELECT wallet_id INTO v_wallet FROM reservations WHERE id = p_reservation;
  IF v_wallet IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, NULL);
  END IF;
  w := ledger_open(v_wallet, p_now);
  SELECT * INTO r FROM reservations WHERE id = p_reservation FOR UPDATE;
  take := coalesce(p_amount, r.amount);
  fp := ledger_fingerprint('capture', take, NULL, NULL, p_reservation::text);
  replay := ledger_replay(w.id, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  IF r.status = 'captured' AND (p_amount IS NULL OR p_amount = r.captured) THEN
    SELECT * INTO e FROM ledger_entries
    WHERE reference_id = r.id AND wallet_id = w.id AND kind = 'capture';
    RETURN ledger_result('replayed', e, w.id, r.id);
  END IF;
  IF r.status <> 'open' THEN
    RETURN ledger_result('not_open', NULL::ledger_entries, w.id, r.id);
  END IF;
  IF take > r.amount THEN
    RETURN ledger_result('too_much', NULL::ledger_entries, w.id, r.id, r.amount);
  END IF;
  IF r.covered THEN
    e := ledger_append_covered(w.id, 'capture', take, p_key, fp, r.reason, NULL, p_actor, r.id, p_now);
  ELSE
    e := ledger_append(w.id, 'capture', 0, -take, p_key, fp, r.reason, NULL, p_actor, r.id, p_now);
  END IF;
  IF take < r.amount THEN
    PERFORM ledger_unhold(w.id, r, r.amount - take, 'reservation partly captured', p_actor, p_now);
    PERFORM ledger_sweep_lots(w.id, p_now);
  END IF;
  UPDATE reservations SET status = 'captured', captured = take, settled_at = p_now WHERE id = r.id;
  RETURN ledger_result('ok', e, w.id, r.id);
END $$;

-- Starts, moves or ends (NULL) the wallet's coverage by an unlimited plan; the coverage it
-- replaced, for the caller's audit.
CREATE FUNCTION ledger_set_coverage(p_wallet uuid, p_until timestamptz, p_now timestamptz,
                                    OUT wallet_found boolean, OUT covered_before timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
BEGIN
  w := ledger_open(p_wallet, p_now);
  wallet_found := w.id IS NOT NULL;
  IF wallet_found THEN
    covered_before := w.covered_until;
    UPDATE wallets SET covered_until = p_until, updated_at = p_now WHERE id = p_wallet;
  END IF;
END $$;

-- Credits one subscription period's allowance (a lot for [p_period_start, p_period_end),
-- expiring at p_expires_at) after cutting the carried remainder of earlier periods to p_cap
-- (NULL: no cap). detail = the tokens cut.
CREATE FUNCTION ledger_grant_subscription(p_wallet uuid, p_amount bigint, p_priority smallint,
                                          p_period_start timestamptz, p_period_end timestamptz,
                                          p_expires_at timestamptz, p_cap bigint, p_cost_minor bigint,
                                          p_currency text, p_key text, p_reason text, p_metadata jsonb,
                                          p_actor text, p_reference uuid, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
  cut_entry ledger_entries;
  fp uuid := ledger_fingerprint('subscription_grant', p_amount, p_reason, p_metadata,
                                concat_ws('|', p_priority, extract(epoch FROM p_period_start),
                                          extract(epoch FROM p_period_end), extract(epoch FROM p_expires_at),
                                          coalesce(p_cap::text, 'uncapped'), p_cost_minor, p_currency,
                                          p_reference));
  replay ledger_outcome;
  carried bigint;
  excess bigint := 0;
  cut bigint := 0;
  take bigint;
  lot record;
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
  IF p_cap IS NOT NULL THEN
    SELECT coalesce(sum(remaining), 0) INTO carried FROM credit_lots
    WHERE wallet_id = p_wallet AND source = 'subscription' AND remaining > 0
      AND period_end <= p_period_start AND (expires_at IS NULL OR expires_at > p_period_start);
    excess := carried - p_cap;
  END IF;
  IF excess > 0 THEN
    FOR lot IN
      SELECT id, remaining FROM credit_lots
      WHERE wallet_id = p_wallet AND source = 'subscription' AND remaining > 0
        AND period_end <= p_period_start AND (expires_at IS NULL OR expires_at > p_period_start)
      ORDER BY seq
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
  END IF;
  e := ledger_append(p_wallet, 'subscription_grant', p_amount, 0, p_key, fp, p_reason, p_metadata, p_actor,
                     p_reference, p_now);
  lot_id := ledger_new_lot(p_wallet, e.id, 'subscription', p_amount, p_priority, p_expires_at, p_cost_minor,
                           p_currency, NULL, p_now);
  UPDATE credit_lots SET period_start = p_period_start, period_end = p_period_end WHERE id = lot_id;
  IF p_expires_at IS NOT NULL AND p_expires_at <= p_now THEN
    PERFORM ledger_sweep_lots(p_wallet, p_now);
  END IF;
  RETURN ledger_result('ok', e, p_wallet, NULL, cut);
END $$;
"""

# Invariant 4 of ledger_violations: a covered hold holds nothing.
OPEN_HELD = "FROM reservations WHERE wallet_id = p_wallet AND status = 'open'"
OPEN_HELD_COVERED = OPEN_HELD + " AND NOT covered"

DOWN = r"""
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM ledger_entries WHERE covered IS NOT NULL) THEN
    RAISE EXCEPTION 'cannot downgrade below 0014: the ledger holds covered entries (append-only)';
  END IF;
END $$;
DROP FUNCTION ledger_grant_subscription(uuid, bigint, smallint, timestamptz, timestamptz, timestamptz, bigint,
                                        bigint, text, text, text, jsonb, text, uuid, timestamptz);
DROP FUNCTION ledger_set_coverage(uuid, timestamptz, timestamptz);
DROP FUNCTION ledger_append_covered(uuid, text, bigint, text, uuid, text, jsonb, text, uuid, timestamptz);
ALTER TYPE ledger_outcome DROP ATTRIBUTE entry_covered;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_direction;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_direction CHECK (CASE kind
    WHEN 'purchase'           THEN amount > 0 AND held_change = 0
    WHEN 'subscription_grant' THEN amount > 0 AND held_change = 0
    WHEN 'trial_grant'        THEN amount > 0 AND held_change = 0
    WHEN 'admin_grant'        THEN amount > 0 AND held_change = 0
    WHEN 'refund'             THEN amount > 0 AND held_change = 0
    WHEN 'consumption'        THEN amount < 0 AND held_change = 0
    WHEN 'expiration'         THEN amount < 0 AND held_change = 0
    WHEN 'clawback'           THEN amount < 0 AND held_change = 0
    WHEN 'reservation'        THEN amount < 0 AND held_change = -amount
    WHEN 'capture'            THEN amount = 0 AND held_change < 0
    WHEN 'release'            THEN amount > 0 AND held_change = -amount
    WHEN 'adjustment'         THEN amount <> 0 AND held_change = 0
    ELSE false END);
ALTER TABLE ledger_entries DROP COLUMN covered;
ALTER TABLE credit_lots DROP CONSTRAINT credit_lots_period, DROP COLUMN period_end, DROP COLUMN period_start;
ALTER TABLE reservations DROP COLUMN covered;
ALTER TABLE wallets DROP COLUMN covered_until;
"""

#: The functions this migration replaces, restored from 0002 on the way down.
REPLACED = ("ledger_result", "ledger_consume", "ledger_reserve", "ledger_unhold", "ledger_capture")


def _functions_of_0002(names: tuple[str, ...]) -> str:
    """0002's definitions of ``names``, as CREATE OR REPLACE: one source of the old text."""
    spec = importlib.util.spec_from_file_location("_ledger_0002", Path(__file__).with_name("0002_ledger.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = []
    for name in names:
        match = re.search(rf"CREATE FUNCTION {name}\(.*?END \$\$;", module.UP, re.S)
        assert match is not None, name
        parts.append(match.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    return "\n".join(parts)


def _violations() -> str:
    source = _functions_of_0002(("ledger_violations",))
    assert source.count(OPEN_HELD) == 1
    return source.replace(OPEN_HELD, OPEN_HELD_COVERED)


def upgrade() -> None:
    execute_script(UP + _violations())


def downgrade() -> None:
    execute_script(DOWN + _functions_of_0002((*REPLACED, "ledger_violations")))
