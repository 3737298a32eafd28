"""Give-back attributes a refund lot to the expired lot it stands in for only when the
refund entry itself created it.

0002 mapped every allocation of a lot that has an ``origin_lot_id`` to that origin, the
origin entry's own draws included: a hold drawn from a refund lot R (standing in for an
expired lot L) was released back to L, then swept as expired, and the tokens were lost. An
allocation stands for its origin lot only when it is the credit of a lot made by the same
giving-back entry; every other allocation counts for the lot it names.

Revision ID: 0005
Revises: 0004
"""

from orgwallet.db.migrate import execute_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_give_back(p_wallet uuid, p_entry uuid, p_origin uuid, p_refs uuid[],
                                            p_amount bigint, p_new_lot_if_expired boolean, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  need bigint := p_amount;
  give bigint;
  lot record;
BEGIN
  FOR lot IN
    SELECT l.id, l.priority, l.expires_at, net.drawn
    FROM (
      -- A refund lot's credit counts as given back to the expired lot it stands in for.
      SELECT CASE WHEN src.entry_id = a.entry_id AND src.origin_lot_id IS NOT NULL
                  THEN src.origin_lot_id ELSE a.lot_id END AS lot_id,
             -sum(a.amount) AS drawn
      FROM ledger_allocations a
      JOIN credit_lots src ON src.id = a.lot_id
      WHERE a.entry_id = p_origin
         OR a.entry_id IN (SELECT e.id FROM ledger_entries e
                           WHERE e.reference_id = ANY (p_refs) AND e.wallet_id = p_wallet AND e.amount > 0)
      GROUP BY 1
    ) net
    JOIN credit_lots l ON l.id = net.lot_id
    WHERE net.drawn > 0
    ORDER BY l.priority DESC, l.expires_at DESC NULLS FIRST, l.seq DESC
    FOR UPDATE OF l
  LOOP
    give := least(lot.drawn, need);
    IF p_new_lot_if_expired AND lot.expires_at IS NOT NULL AND lot.expires_at <= p_now THEN
      PERFORM ledger_new_lot(p_wallet, p_entry, 'refund', give, lot.priority, NULL, NULL, NULL, lot.id, p_now);
    ELSE
      UPDATE credit_lots SET remaining = remaining + give WHERE id = lot.id;
      INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (p_entry, lot.id, give);
    END IF;
    need := need - give;
    EXIT WHEN need = 0;
  END LOOP;
  IF need > 0 THEN
    RAISE EXCEPTION 'ledger invariant broken: entry % drew % tokens fewer than are given back', p_origin, need
      USING ERRCODE = 'data_exception';
  END IF;
END $$;
"""


def upgrade() -> None:
    execute_script(FUNCTION)


def downgrade() -> None:
    # 0002's version, for a downgrade to 0004 (mapping every allocation of a refund lot).
    execute_script(
        FUNCTION.replace(
            "CASE WHEN src.entry_id = a.entry_id AND src.origin_lot_id IS NOT NULL\n"
            "                  THEN src.origin_lot_id ELSE a.lot_id END",
            "coalesce(src.origin_lot_id, src.id)",
        )
    )
