"""A dispute closed in the merchant's favour gives back what its opening took back.

- ``ledger_reinstate``: gives back what one clawback entry (found by its idempotency key) took
  from its lot, once, never more than it took: an ADJUSTMENT entry (positive) that references
  the clawback entry. The tokens return to the lot they were taken from, so its expiry,
  priority and cost basis hold; a lot that expired meanwhile is swept again at once (a won
  dispute does not extend a token's life). No lifetime counter moves, as the clawback moved none.
- ``purchases.dispute_*``: the dispute's amount, the tokens its opening took back and the part
  already spent (its shortfall), the tokens given back when it was won, and when it opened and
  closed. Rows disputed before this migration are filled from their audit rows.
- The notification kind ``purchase_dispute_won``.

Revision ID: 0009
Revises: 0008
"""

from orgwallet.db.migrate import execute_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UP = r"""
CREATE FUNCTION ledger_reinstate(p_lot uuid, p_clawback_key text, p_key text, p_reason text, p_actor text,
                                 p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_wallet uuid;
  w wallets;
  src ledger_entries;
  e ledger_entries;
  given bigint;
  give bigint;
  fp uuid := ledger_fingerprint('adjustment', NULL, p_reason, NULL, concat_ws('|', p_lot, p_clawback_key));
  replay ledger_outcome;
BEGIN
  SELECT wallet_id INTO v_wallet FROM credit_lots WHERE id = p_lot;
  IF v_wallet IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, NULL);
  END IF;
  w := ledger_open(v_wallet, p_now);
  replay := ledger_replay(w.id, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  SELECT * INTO src FROM ledger_entries
  WHERE wallet_id = w.id AND idempotency_key = p_clawback_key AND kind = 'clawback';
  IF NOT FOUND THEN
    RETURN ledger_result('ok', NULL::ledger_entries, w.id);  -- nothing was taken back
  END IF;
  SELECT coalesce(sum(amount), 0) INTO given FROM ledger_entries
  WHERE reference_id = src.id AND wallet_id = w.id AND kind = 'adjustment' AND amount > 0;
  give := -src.amount - given;
  IF give <= 0 THEN
    RETURN ledger_result('ok', NULL::ledger_entries, w.id);
  END IF;
  e := ledger_append(w.id, 'adjustment', give, 0, p_key, fp, p_reason, NULL, p_actor, src.id, p_now);
  PERFORM ledger_give_back(w.id, e.id, src.id, ARRAY[src.id], give, false, p_now);
  PERFORM ledger_sweep_lots(w.id, p_now);
  RETURN ledger_result('ok', e, w.id);
END $$;

ALTER TABLE purchases
  ADD COLUMN dispute_amount_minor bigint CHECK (dispute_amount_minor >= 0),
  ADD COLUMN dispute_tokens_taken bigint NOT NULL DEFAULT 0 CHECK (dispute_tokens_taken >= 0),
  ADD COLUMN dispute_shortfall bigint NOT NULL DEFAULT 0 CHECK (dispute_shortfall >= 0),
  ADD COLUMN dispute_tokens_returned bigint NOT NULL DEFAULT 0,
  ADD COLUMN dispute_opened_at timestamptz,
  ADD COLUMN dispute_closed_at timestamptz,
  ADD CONSTRAINT purchases_dispute_returned CHECK (dispute_tokens_returned BETWEEN 0 AND dispute_tokens_taken);

UPDATE purchases p SET
  dispute_amount_minor = p.amount_minor - p.refunded_minor,
  dispute_tokens_taken = coalesce((opened.after->>'clawed_back')::bigint, 0),
  dispute_shortfall = coalesce((opened.after->>'shortfall')::bigint, 0),
  dispute_opened_at = coalesce(opened.at, p.updated_at),
  dispute_closed_at = CASE WHEN p.dispute_status IN ('won', 'lost', 'warning_closed')
                           THEN coalesce(closed.at, p.updated_at) END
FROM purchases q
LEFT JOIN LATERAL (
  SELECT a.at, a.after FROM audit_log a
  WHERE a.target_type = 'purchase' AND a.target_id = q.id::text AND a.action = 'purchase.disputed'
    AND a.after->>'dispute' = q.dispute_id
  ORDER BY a.at LIMIT 1
) opened ON true
LEFT JOIN LATERAL (
  SELECT a.at FROM audit_log a
  WHERE a.target_type = 'purchase' AND a.target_id = q.id::text AND a.action = 'purchase.dispute_closed'
    AND a.after->>'dispute_id' = q.dispute_id
  ORDER BY a.at DESC LIMIT 1
) closed ON true
WHERE q.id = p.id AND q.dispute_id IS NOT NULL;

ALTER TABLE purchases ADD CONSTRAINT purchases_dispute_known CHECK (
  dispute_id IS NULL OR (dispute_amount_minor IS NOT NULL AND dispute_opened_at IS NOT NULL));

ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN (
  'low_balance', 'balance_depleted', 'tokens_expiring', 'purchase_paid', 'purchase_failed',
  'purchase_refunded', 'wallet_suspended', 'wallet_reactivated', 'auto_top_up_succeeded',
  'auto_top_up_failed', 'auto_top_up_disabled', 'spend_cap_reached', 'payment_action_required',
  'purchase_dispute_won'));
"""

DOWN = r"""
DELETE FROM notifications WHERE kind = 'purchase_dispute_won';
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN (
  'low_balance', 'balance_depleted', 'tokens_expiring', 'purchase_paid', 'purchase_failed',
  'purchase_refunded', 'wallet_suspended', 'wallet_reactivated', 'auto_top_up_succeeded',
  'auto_top_up_failed', 'auto_top_up_disabled', 'spend_cap_reached', 'payment_action_required'));
ALTER TABLE purchases
  DROP CONSTRAINT purchases_dispute_known,
  DROP COLUMN dispute_closed_at,
  DROP COLUMN dispute_opened_at,
  DROP COLUMN dispute_tokens_returned,
  DROP COLUMN dispute_shortfall,
  DROP COLUMN dispute_tokens_taken,
  DROP COLUMN dispute_amount_minor;
DROP FUNCTION ledger_reinstate(uuid, text, text, text, text, timestamptz);
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
