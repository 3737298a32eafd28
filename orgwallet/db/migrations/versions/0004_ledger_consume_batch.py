"""Group commit: many consumptions of one wallet in one transaction.

``ledger_consume_batch`` runs ``ledger_consume`` for each element of its arrays, in order, in
the caller's one transaction: the wallet row is locked once and the commit (the WAL flush) is
paid once for the whole batch, which is what limits one-transaction-per-request on a hot
wallet. Each consumption is still itself: its own key, entry, allocations and answer, exactly
as the same calls one after the other would give (a key used twice in a batch replays or
conflicts; an insufficient balance is that consumption's outcome, the next ones go on).
The functions of 0002 are unchanged.

Revision ID: 0004
Revises: 0003
"""

from orgwallet.db.migrate import execute_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UP = r"""
CREATE FUNCTION ledger_consume_batch(p_wallet uuid, p_amounts bigint[], p_keys text[], p_reasons text[],
                                     p_metadata jsonb[], p_actors text[], p_now timestamptz)
RETURNS TABLE (ord integer, result ledger_outcome) LANGUAGE plpgsql AS $$
DECLARE
  n integer := coalesce(cardinality(p_amounts), 0);
BEGIN
  IF coalesce(cardinality(p_keys), 0) <> n OR coalesce(cardinality(p_reasons), 0) <> n
     OR coalesce(cardinality(p_metadata), 0) <> n OR coalesce(cardinality(p_actors), 0) <> n THEN
    RAISE EXCEPTION 'ledger_consume_batch: arrays of different lengths' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR i IN 1 .. n LOOP
    ord := i;
    result := ledger_consume(p_wallet, p_amounts[i], p_keys[i], p_reasons[i], p_metadata[i], p_actors[i], p_now);
    RETURN NEXT;
  END LOOP;
END $$;
"""

DOWN = r"""
DROP FUNCTION ledger_consume_batch(uuid, bigint[], text[], text[], jsonb[], text[], timestamptz);
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
