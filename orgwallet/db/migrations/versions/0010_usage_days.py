"""Daily consumption per wallet, for the usage forecast (``services.forecast``).

- ``wallet_usage_days``: tokens consumed per wallet and UTC day (consumptions and captures
  less refunds of them, by the day each entry was written), for completed days only, one row
  per day that had any such entry: a day without a row consumed nothing. Kept for 400 days.
- ``wallet_usage_marks``: per wallet, the entries counted so far (every entry up to
  ``through_seq``) and the tokens they consumed (``consumed_through``): what is not counted yet
  is ``wallets.lifetime_consumed - consumed_through``, today's part, read without any scan.
- ``wallet_usage_closed``: the last UTC day the ``usage.days`` duty closed for every wallet
  (NULL before its first run).

The duty (``forecast.record_usage_days``) writes these once a day; the consumption path does
no extra work for them (no trigger, no index on ``ledger_entries``).

Revision ID: 0010
Revises: 0009
"""

from orgwallet.db.migrate import execute_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE wallet_usage_days (
  wallet_id uuid NOT NULL REFERENCES wallets(id),
  day       date NOT NULL,
  consumed  bigint NOT NULL,  -- net of refunds: below zero on a day whose refunds outweigh its use
  PRIMARY KEY (wallet_id, day)
);

CREATE TABLE wallet_usage_marks (
  wallet_id        uuid PRIMARY KEY REFERENCES wallets(id),
  through_seq      bigint NOT NULL CHECK (through_seq >= 0),
  consumed_through bigint NOT NULL CHECK (consumed_through >= 0),
  updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One row; each run of the duty locks it, so runs never overlap.
CREATE TABLE wallet_usage_closed (
  singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  through_day date
);
INSERT INTO wallet_usage_closed (through_day) VALUES (NULL);
"""

DOWN = r"""
DROP TABLE wallet_usage_closed;
DROP TABLE wallet_usage_marks;
DROP TABLE wallet_usage_days;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
