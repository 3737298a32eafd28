"""Indexes for two lookups that scanned their whole table.

- ``credit_lots (entry_id)``: crediting a purchase marks it paid with the lot its credit entry
  made (``SELECT id FROM credit_lots WHERE entry_id = ...``), once per paid purchase. Without
  an index that read every lot of every wallet: a webhook's cost grew with the ledger.
- ``purchases (charge_id)``: a refund or dispute event may name its purchase only by the
  charge (``find_purchase(charge_id=...)``).

Revision ID: 0006
Revises: 0005
"""

from orgwallet.db.migrate import execute_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UP = """
CREATE INDEX credit_lots_entry ON credit_lots (entry_id);
CREATE INDEX purchases_charge ON purchases (charge_id) WHERE charge_id IS NOT NULL;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script("DROP INDEX purchases_charge; DROP INDEX credit_lots_entry;")
