"""Live updates: the database NOTIFYs the changes GraphQL subscriptions push.

- ``live_wallets``: the wallets some process watches (one row per wallet and listening
  process, ``hub``), each under a lease that the process renews while it has subscribers, so
  the rows of a process that died expire on their own.
- ``wallets.live_until``: the latest lease of the wallet's watches, on the wallet's row (as
  the wallet-change signal's watch band is), written only by ``live_watch``.
- ``wallets_live``: a change of a wallet's balance, reserved tokens or status NOTIFYs
  ``live_wallet`` with the wallet's new state, in the changing transaction (delivered after
  its commit, never for a rolled-back change), but only while the wallet is watched. NOTIFY
  takes a global lock at commit, so one on every balance write would serialize every commit;
  and the trigger's WHEN clause reads only the row being written, so a wallet nobody watches
  pays one comparison, not a function call nor a lookup (bench/live.py measures both). The
  payload's keys are the columns of ``services.wallets.WALLET_STATE`` (one reader of both).
- ``live_watch``: starts, renews or ends a process's watch of a wallet. It locks the wallet
  first: it waits for the writer in flight, and every later writer (which locks the wallet
  before it writes) sees the new ``live_until``; concurrent watches of one wallet take turns.
- ``notifications_live``: each new notification NOTIFYs ``live_notification`` with its id
  and organization (notifications are few: no watch needed).

Revision ID: 0012
Revises: 0011
"""

from orgwallet.db.migrate import execute_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE live_wallets (
  wallet_id  uuid NOT NULL REFERENCES wallets(id) ON DELETE CASCADE,
  hub        uuid NOT NULL,  -- the listening process (orgwallet.live.LiveHub)
  expires_at timestamptz NOT NULL,
  PRIMARY KEY (wallet_id, hub)
);
CREATE INDEX live_wallets_expired ON live_wallets (expires_at);

ALTER TABLE wallets ADD COLUMN live_until timestamptz;

-- The hub's watch of the wallet until p_until; NULL ends it. Leases that have run out go too.
CREATE FUNCTION live_watch(p_wallet uuid, p_hub uuid, p_until timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM wallets WHERE id = p_wallet FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  DELETE FROM live_wallets WHERE wallet_id = p_wallet AND (hub = p_hub OR expires_at <= now());
  IF p_until IS NOT NULL THEN
    INSERT INTO live_wallets (wallet_id, hub, expires_at) VALUES (p_wallet, p_hub, p_until);
  END IF;
  UPDATE wallets SET live_until = (SELECT max(expires_at) FROM live_wallets WHERE wallet_id = p_wallet)
  WHERE id = p_wallet;
END $$;

CREATE FUNCTION live_wallet_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('live_wallet', json_build_object(
    'wallet_id', NEW.id, 'wallet_organization_id', NEW.organization_id,
    'wallet_status', NEW.status, 'balance', NEW.balance, 'reserved', NEW.reserved,
    'lifetime_purchased', NEW.lifetime_purchased, 'lifetime_granted', NEW.lifetime_granted,
    'lifetime_consumed', NEW.lifetime_consumed, 'lifetime_expired', NEW.lifetime_expired,
    'entry_seq', NEW.entry_seq)::text);
  RETURN NEW;
END $$;

CREATE TRIGGER wallets_live BEFORE UPDATE OF balance, reserved, status ON wallets FOR EACH ROW
  WHEN (NEW.live_until > now()
        AND (NEW.balance <> OLD.balance OR NEW.reserved <> OLD.reserved OR NEW.status <> OLD.status))
  EXECUTE FUNCTION live_wallet_changed();

CREATE FUNCTION live_notification_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('live_notification', json_build_object(
    'id', NEW.id, 'organization_id', NEW.organization_id)::text);
  RETURN NULL;
END $$;

CREATE TRIGGER notifications_live AFTER INSERT ON notifications FOR EACH ROW
  EXECUTE FUNCTION live_notification_added();
"""

DOWN = r"""
DROP TRIGGER notifications_live ON notifications;
DROP FUNCTION live_notification_added();
DROP TRIGGER wallets_live ON wallets;
DROP FUNCTION live_wallet_changed();
DROP FUNCTION live_watch(uuid, uuid, timestamptz);
ALTER TABLE wallets DROP COLUMN live_until;
DROP TABLE live_wallets;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
