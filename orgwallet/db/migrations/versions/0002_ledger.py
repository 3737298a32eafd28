"""The ledger: wallets, credit lots, entries, allocations, reservations, and the functions
that are the only writers of balances.

Every ledger operation is one PL/pgSQL function, called in one round trip, that locks the
wallet row, settles what is due (expired reservations, then expired lots), checks the
idempotency key, and appends entries. See orgwallet/ledger/__init__.py for the invariants.

Revision ID: 0002
Revises: 0001
"""

from orgwallet.db.migrate import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UP = r"""
CREATE TABLE wallets (
  id                 uuid PRIMARY KEY DEFAULT uuid_v7(),
  organization_id    uuid NOT NULL UNIQUE REFERENCES organizations(id),
  status             text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
  balance            bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
  reserved           bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
  lifetime_purchased bigint NOT NULL DEFAULT 0 CHECK (lifetime_purchased >= 0),
  lifetime_granted   bigint NOT NULL DEFAULT 0 CHECK (lifetime_granted >= 0),
  lifetime_consumed  bigint NOT NULL DEFAULT 0 CHECK (lifetime_consumed >= 0),
  lifetime_expired   bigint NOT NULL DEFAULT 0 CHECK (lifetime_expired >= 0),
  entry_seq          bigint NOT NULL DEFAULT 0 CHECK (entry_seq >= 0),
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
  id              uuid PRIMARY KEY DEFAULT uuid_v7(),
  wallet_id       uuid NOT NULL REFERENCES wallets(id),
  seq             bigint NOT NULL CHECK (seq > 0),
  kind            text NOT NULL,
  amount          bigint NOT NULL,            -- signed change of the available balance
  held_change     bigint NOT NULL DEFAULT 0,  -- signed change of the reserved tokens
  balance_after   bigint NOT NULL CHECK (balance_after >= 0),
  reserved_after  bigint NOT NULL CHECK (reserved_after >= 0),
  idempotency_key text CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
  fingerprint     uuid,                       -- of the arguments, to tell a replay from a conflict
  reason          text CHECK (char_length(reason) <= 1000),
  metadata        jsonb,
  actor           text,
  reference_id    uuid,                       -- reservation, refunded entry, purchase, ...
  created_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (wallet_id, seq),
  UNIQUE (wallet_id, idempotency_key),
  -- Amounts carry their direction; the kind fixes which direction is allowed.
  CONSTRAINT ledger_entries_direction CHECK (CASE kind
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
    ELSE false END)
);
CREATE INDEX ledger_entries_reference ON ledger_entries (reference_id) WHERE reference_id IS NOT NULL;

CREATE TABLE credit_lots (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  wallet_id   uuid NOT NULL REFERENCES wallets(id),
  entry_id    uuid NOT NULL REFERENCES ledger_entries(id),
  -- Creation order. Writers of one wallet are serialized by its lock, so within a wallet
  -- this orders lots by age without ties.
  seq         bigint GENERATED ALWAYS AS IDENTITY,
  -- For a lot made by a refund whose tokens came from a lot that has since expired.
  origin_lot_id uuid REFERENCES credit_lots(id),
  source      text NOT NULL CHECK (source IN ('purchase', 'subscription', 'trial', 'admin', 'refund')),
  amount      bigint NOT NULL CHECK (amount > 0),
  remaining   bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
  priority    smallint NOT NULL,
  expires_at  timestamptz,
  cost_minor  bigint CHECK (cost_minor >= 0),   -- what the lot cost, for the cost basis
  currency    char(3),
  created_at  timestamptz NOT NULL DEFAULT now(),
  CHECK ((cost_minor IS NULL) = (currency IS NULL))
);
-- Draw-down order: priority, then soonest expiry (no expiry last), then oldest.
CREATE INDEX credit_lots_drawable ON credit_lots (wallet_id, priority, expires_at, seq)
  WHERE remaining > 0;

CREATE TABLE ledger_allocations (
  entry_id  uuid NOT NULL REFERENCES ledger_entries(id),
  lot_id    uuid NOT NULL REFERENCES credit_lots(id),
  amount    bigint NOT NULL CHECK (amount <> 0),   -- signed change of the lot's remaining
  PRIMARY KEY (entry_id, lot_id)
);

CREATE TABLE reservations (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  wallet_id   uuid NOT NULL REFERENCES wallets(id),
  entry_id    uuid NOT NULL REFERENCES ledger_entries(id),
  amount      bigint NOT NULL CHECK (amount > 0),
  captured    bigint NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
  status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'captured', 'released', 'expired')),
  expires_at  timestamptz NOT NULL,
  reason      text,
  settled_at  timestamptz,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CHECK ((status = 'open') = (settled_at IS NULL)),
  CHECK (status = 'captured' OR captured = 0)
);
CREATE INDEX reservations_open ON reservations (wallet_id, expires_at) WHERE status = 'open';
CREATE INDEX reservations_due ON reservations (expires_at) WHERE status = 'open';
CREATE INDEX credit_lots_due ON credit_lots (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
  FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
  FOR EACH STATEMENT EXECUTE FUNCTION reject_change();
CREATE TRIGGER ledger_allocations_append_only BEFORE UPDATE OR DELETE ON ledger_allocations
  FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER ledger_allocations_no_truncate BEFORE TRUNCATE ON ledger_allocations
  FOR EACH STATEMENT EXECUTE FUNCTION reject_change();

-- What every ledger function returns: the outcome, the entry it wrote (or replayed), the
-- reservation it touched, and the wallet afterwards.
CREATE TYPE ledger_outcome AS (
  outcome          text,     -- ok | replayed | not_found | suspended | insufficient | conflict
                             -- | not_open | too_much | not_refundable
  entry_id         uuid,
  entry_seq        bigint,
  entry_kind       text,
  entry_amount     bigint,
  entry_held       bigint,
  balance_after    bigint,
  reserved_after   bigint,
  entry_key        text,
  entry_reason     text,
  entry_metadata   jsonb,
  entry_created_at timestamptz,
  reservation_id   uuid,
  reservation_status text,
  wallet_id        uuid,
  organization_id  uuid,
  wallet_status    text,
  wallet_balance   bigint,
  wallet_reserved  bigint,
  lifetime_purchased bigint,
  lifetime_granted   bigint,
  lifetime_consumed  bigint,
  lifetime_expired   bigint,
  detail           bigint    -- insufficient: available; too_much: the limit; clawback: shortfall
);

CREATE FUNCTION ledger_fingerprint(p_kind text, p_amount bigint, p_reason text, p_metadata jsonb,
                                   p_extra text DEFAULT NULL)
RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
  SELECT md5(concat_ws(E'\x1f', p_kind, p_amount::text, coalesce(p_reason, E'\x1e'),
                       coalesce(p_metadata::text, E'\x1e'), coalesce(p_extra, E'\x1e')))::uuid
$$;

-- Appends one entry and applies it to the wallet's cached balances and counters.
-- The wallet CHECKs (balance >= 0, reserved >= 0) are the last word on overdraft.
CREATE FUNCTION ledger_append(p_wallet uuid, p_kind text, p_amount bigint, p_held bigint,
                              p_key text, p_fingerprint uuid, p_reason text, p_metadata jsonb,
                              p_actor text, p_reference uuid, p_now timestamptz)
RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
BEGIN
  UPDATE wallets SET
    balance = balance + p_amount,
    reserved = reserved + p_held,
    entry_seq = entry_seq + 1,
    lifetime_purchased = lifetime_purchased + CASE WHEN p_kind = 'purchase' THEN p_amount ELSE 0 END,
    lifetime_granted = lifetime_granted
      + CASE WHEN p_kind IN ('subscription_grant', 'trial_grant', 'admin_grant') THEN p_amount ELSE 0 END,
    lifetime_consumed = lifetime_consumed + CASE p_kind
      WHEN 'consumption' THEN -p_amount
      WHEN 'capture' THEN -p_held
      WHEN 'refund' THEN -p_amount
      ELSE 0 END,
    lifetime_expired = lifetime_expired + CASE WHEN p_kind = 'expiration' THEN -p_amount ELSE 0 END,
    updated_at = p_now
  WHERE id = p_wallet
  RETURNING * INTO w;
  INSERT INTO ledger_entries (wallet_id, seq, kind, amount, held_change, balance_after, reserved_after,
                              idempotency_key, fingerprint, reason, metadata, actor, reference_id, created_at)
  VALUES (p_wallet, w.entry_seq, p_kind, p_amount, p_held, w.balance, w.reserved,
          p_key, p_fingerprint, p_reason, p_metadata, p_actor, p_reference, p_now)
  RETURNING * INTO e;
  RETURN e;
END $$;

-- Draws p_amount from the wallet's unexpired lots in draw-down order, for entry p_entry.
CREATE FUNCTION ledger_draw(p_wallet uuid, p_entry uuid, p_amount bigint, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  need bigint := p_amount;
  take bigint;
  lot record;
BEGIN
  FOR lot IN
    SELECT id, remaining FROM credit_lots
    WHERE wallet_id = p_wallet AND remaining > 0 AND (expires_at IS NULL OR expires_at > p_now)
    ORDER BY priority, expires_at, seq
    FOR UPDATE
  LOOP
    take := least(lot.remaining, need);
    UPDATE credit_lots SET remaining = remaining - take WHERE id = lot.id;
    INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (p_entry, lot.id, -take);
    need := need - take;
    EXIT WHEN need = 0;
  END LOOP;
  IF need > 0 THEN
    RAISE EXCEPTION 'ledger invariant broken: wallet % lots hold % tokens fewer than its balance', p_wallet, need
      USING ERRCODE = 'data_exception';
  END IF;
END $$;

-- Creates a lot holding p_amount for entry p_entry.
CREATE FUNCTION ledger_new_lot(p_wallet uuid, p_entry uuid, p_source text, p_amount bigint,
                               p_priority smallint, p_expires_at timestamptz, p_cost_minor bigint,
                               p_currency text, p_origin_lot uuid, p_now timestamptz)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
  lot_id uuid;
BEGIN
  INSERT INTO credit_lots (wallet_id, entry_id, origin_lot_id, source, amount, remaining, priority,
                           expires_at, cost_minor, currency, created_at)
  VALUES (p_wallet, p_entry, p_origin_lot, p_source, p_amount, p_amount, p_priority, p_expires_at,
          p_cost_minor, p_currency, p_now)
  RETURNING id INTO lot_id;
  INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (p_entry, lot_id, p_amount);
  RETURN lot_id;
END $$;

-- Gives p_amount back to the lots that p_origin drew from (net of what entries referencing
-- p_refs already gave back), last drawn first. Tokens whose lot has expired go to a new lot
-- (one per expired lot, remembering it as its origin) when p_new_lot_if_expired (refunds),
-- or back to the expired lot, to be swept (releases: a hold never extends a token's life).
CREATE FUNCTION ledger_give_back(p_wallet uuid, p_entry uuid, p_origin uuid, p_refs uuid[],
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
      -- What went back to a refund lot counts as given back to the lot it stands in for.
      SELECT coalesce(src.origin_lot_id, src.id) AS lot_id, -sum(a.amount) AS drawn
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

-- Expires the wallet's lots that are due. The wallet must be locked.
CREATE FUNCTION ledger_sweep_lots(p_wallet uuid, p_now timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  lot record;
  e ledger_entries;
  n integer := 0;
BEGIN
  FOR lot IN
    SELECT id, remaining FROM credit_lots
    WHERE wallet_id = p_wallet AND remaining > 0 AND expires_at <= p_now
    ORDER BY priority, expires_at, seq
    FOR UPDATE
  LOOP
    e := ledger_append(p_wallet, 'expiration', -lot.remaining, 0, NULL, NULL, 'credit expired', NULL,
                       'system', lot.id, p_now);
    UPDATE credit_lots SET remaining = 0 WHERE id = lot.id;
    INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (e.id, lot.id, -lot.remaining);
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;

-- Releases a held reservation's tokens back to its lots. The wallet must be locked.
CREATE FUNCTION ledger_unhold(p_wallet uuid, r reservations, p_amount bigint, p_reason text,
                              p_actor text, p_now timestamptz)
RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
  e ledger_entries;
BEGIN
  e := ledger_append(p_wallet, 'release', p_amount, -p_amount, NULL, NULL, p_reason, NULL,
                     p_actor, r.id, p_now);
  PERFORM ledger_give_back(p_wallet, e.id, r.entry_id, ARRAY[r.id], p_amount, false, p_now);
  RETURN e;
END $$;

-- Locks the wallet and settles what is due: expired reservations return their tokens, then
-- expired lots are swept. Returns the wallet row afterwards (NULL when there is none).
CREATE FUNCTION ledger_open(p_wallet uuid, p_now timestamptz)
RETURNS wallets LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  r reservations;
  swept integer := 0;
BEGIN
  SELECT * INTO w FROM wallets WHERE id = p_wallet FOR UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  FOR r IN
    SELECT * FROM reservations
    WHERE wallet_id = p_wallet AND status = 'open' AND expires_at <= p_now
    ORDER BY expires_at, id
    FOR UPDATE
  LOOP
    PERFORM ledger_unhold(p_wallet, r, r.amount, 'reservation expired', 'system', p_now);
    UPDATE reservations SET status = 'expired', settled_at = p_now WHERE id = r.id;
    swept := swept + 1;
  END LOOP;
  swept := swept + ledger_sweep_lots(p_wallet, p_now);
  IF swept > 0 THEN
    SELECT * INTO w FROM wallets WHERE id = p_wallet;
  END IF;
  RETURN w;
END $$;

CREATE FUNCTION ledger_result(p_outcome text, e ledger_entries, p_wallet uuid,
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
             w.lifetime_granted, w.lifetime_consumed, w.lifetime_expired, p_detail)::ledger_outcome;
  RETURN res;
END $$;

-- The replay or conflict answer for a key already used on this wallet, or NULL when unused.
CREATE FUNCTION ledger_replay(p_wallet uuid, p_key text, p_fingerprint uuid)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  e ledger_entries;
  r_id uuid;
BEGIN
  IF p_key IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT * INTO e FROM ledger_entries WHERE wallet_id = p_wallet AND idempotency_key = p_key;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF e.fingerprint IS DISTINCT FROM p_fingerprint THEN
    RETURN ledger_result('conflict', NULL::ledger_entries, p_wallet);
  END IF;
  IF e.kind IN ('reservation', 'capture') THEN
    r_id := e.reference_id;
  END IF;
  RETURN ledger_result('replayed', e, p_wallet, r_id);
END $$;

CREATE FUNCTION ledger_credit(p_wallet uuid, p_kind text, p_source text, p_amount bigint, p_priority smallint,
                              p_expires_at timestamptz, p_cost_minor bigint, p_currency text, p_key text,
                              p_reason text, p_metadata jsonb, p_actor text, p_reference uuid,
                              p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
  fp uuid := ledger_fingerprint(p_kind, p_amount, p_reason, p_metadata,
                                concat_ws('|', p_priority, extract(epoch FROM p_expires_at), p_reference));
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
  e := ledger_append(p_wallet, p_kind, p_amount, 0, p_key, fp, p_reason, p_metadata, p_actor, p_reference, p_now);
  PERFORM ledger_new_lot(p_wallet, e.id, p_source, p_amount, p_priority, p_expires_at, p_cost_minor,
                         p_currency, NULL, p_now);
  IF p_expires_at IS NOT NULL AND p_expires_at <= p_now THEN
    PERFORM ledger_sweep_lots(p_wallet, p_now);
  END IF;
  RETURN ledger_result('ok', e, p_wallet);
END $$;

CREATE FUNCTION ledger_consume(p_wallet uuid, p_amount bigint, p_key text, p_reason text,
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
  IF w.balance < p_amount THEN
    RETURN ledger_result('insufficient', NULL::ledger_entries, p_wallet, NULL, w.balance);
  END IF;
  e := ledger_append(p_wallet, 'consumption', -p_amount, 0, p_key, fp, p_reason, p_metadata, p_actor, NULL, p_now);
  PERFORM ledger_draw(p_wallet, e.id, p_amount, p_now);
  RETURN ledger_result('ok', e, p_wallet);
END $$;

CREATE FUNCTION ledger_reserve(p_wallet uuid, p_amount bigint, p_key text, p_ttl_seconds integer,
                               p_reason text, p_actor text, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  e ledger_entries;
  r_id uuid := uuid_v7();
  fp uuid := ledger_fingerprint('reservation', p_amount, p_reason, NULL, p_ttl_seconds::text);
  replay ledger_outcome;
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
  IF w.balance < p_amount THEN
    RETURN ledger_result('insufficient', NULL::ledger_entries, p_wallet, NULL, w.balance);
  END IF;
  e := ledger_append(p_wallet, 'reservation', -p_amount, p_amount, p_key, fp, p_reason, NULL, p_actor, r_id, p_now);
  PERFORM ledger_draw(p_wallet, e.id, p_amount, p_now);
  INSERT INTO reservations (id, wallet_id, entry_id, amount, expires_at, reason, created_at)
  VALUES (r_id, p_wallet, e.id, p_amount, p_now + make_interval(secs => p_ttl_seconds), p_reason, p_now);
  RETURN ledger_result('ok', e, p_wallet, r_id);
END $$;

-- Captures p_amount (NULL: all) of an open reservation; the rest returns to the lots.
CREATE FUNCTION ledger_capture(p_reservation uuid, p_amount bigint, p_key text, p_actor text,
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
  e := ledger_append(w.id, 'capture', 0, -take, p_key, fp, r.reason, NULL, p_actor, r.id, p_now);
  IF take < r.amount THEN
    PERFORM ledger_unhold(w.id, r, r.amount - take, 'reservation partly captured', p_actor, p_now);
    PERFORM ledger_sweep_lots(w.id, p_now);
  END IF;
  UPDATE reservations SET status = 'captured', captured = take, settled_at = p_now WHERE id = r.id;
  RETURN ledger_result('ok', e, w.id, r.id);
END $$;

CREATE FUNCTION ledger_release(p_reservation uuid, p_actor text, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_wallet uuid;
  w wallets;
  r reservations;
  e ledger_entries;
BEGIN
  SELECT wallet_id INTO v_wallet FROM reservations WHERE id = p_reservation;
  IF v_wallet IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, NULL);
  END IF;
  w := ledger_open(v_wallet, p_now);
  SELECT * INTO r FROM reservations WHERE id = p_reservation FOR UPDATE;
  IF r.status IN ('released', 'expired') THEN
    SELECT * INTO e FROM ledger_entries
    WHERE reference_id = r.id AND wallet_id = w.id AND kind = 'release';
    RETURN ledger_result('replayed', e, w.id, r.id);
  END IF;
  IF r.status <> 'open' THEN
    RETURN ledger_result('not_open', NULL::ledger_entries, w.id, r.id);
  END IF;
  e := ledger_unhold(w.id, r, r.amount, coalesce(r.reason, 'reservation released'), p_actor, p_now);
  UPDATE reservations SET status = 'released', settled_at = p_now WHERE id = r.id;
  PERFORM ledger_sweep_lots(w.id, p_now);
  RETURN ledger_result('ok', e, w.id, r.id);
END $$;

-- Gives back p_amount (NULL: all that is left) of a consumption or capture entry.
CREATE FUNCTION ledger_refund(p_entry uuid, p_amount bigint, p_key text, p_reason text, p_actor text,
                              p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
  src ledger_entries;
  e ledger_entries;
  consumed bigint;
  refunded bigint;
  give bigint;
  origin uuid;
  refs uuid[];
  fp uuid;
  replay ledger_outcome;
BEGIN
  SELECT * INTO src FROM ledger_entries WHERE id = p_entry;
  IF NOT FOUND THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, NULL);
  END IF;
  w := ledger_open(src.wallet_id, p_now);
  IF src.kind NOT IN ('consumption', 'capture') THEN
    RETURN ledger_result('not_refundable', NULL::ledger_entries, w.id);
  END IF;
  consumed := CASE src.kind WHEN 'consumption' THEN -src.amount ELSE -src.held_change END;
  SELECT coalesce(sum(amount), 0) INTO refunded FROM ledger_entries
  WHERE reference_id = src.id AND wallet_id = w.id AND kind = 'refund';
  give := coalesce(p_amount, consumed - refunded);
  fp := ledger_fingerprint('refund', give, p_reason, NULL, src.id::text);
  replay := ledger_replay(w.id, p_key, fp);
  IF replay.outcome IS NOT NULL THEN
    RETURN replay;
  END IF;
  IF consumed - refunded <= 0 THEN
    RETURN ledger_result('not_refundable', NULL::ledger_entries, w.id, NULL, 0);
  END IF;
  IF give > consumed - refunded THEN
    RETURN ledger_result('too_much', NULL::ledger_entries, w.id, NULL, consumed - refunded);
  END IF;
  IF src.kind = 'consumption' THEN
    origin := src.id;
    refs := ARRAY[src.id];
  ELSE
    SELECT r.entry_id INTO origin FROM reservations r WHERE r.id = src.reference_id;
    refs := ARRAY[src.reference_id, src.id];
  END IF;
  e := ledger_append(w.id, 'refund', give, 0, p_key, fp, p_reason, NULL, p_actor, src.id, p_now);
  PERFORM ledger_give_back(w.id, e.id, origin, refs, give, true, p_now);
  RETURN ledger_result('ok', e, w.id);
END $$;

-- Takes back up to p_amount of what is left in lot p_lot (a refunded or disputed purchase).
-- detail = the shortfall: what had already been spent and could not be taken back.
CREATE FUNCTION ledger_clawback(p_lot uuid, p_amount bigint, p_key text, p_reason text, p_actor text,
                                p_reference uuid, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_wallet uuid;
  w wallets;
  lot credit_lots;
  e ledger_entries;
  take bigint;
  fp uuid := ledger_fingerprint('clawback', p_amount, p_reason, NULL, p_lot::text);
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
  SELECT * INTO lot FROM credit_lots WHERE id = p_lot FOR UPDATE;
  take := least(lot.remaining, p_amount);
  IF take = 0 THEN
    RETURN ledger_result('ok', NULL::ledger_entries, w.id, NULL, p_amount);
  END IF;
  e := ledger_append(w.id, 'clawback', -take, 0, p_key, fp, p_reason, NULL, p_actor, p_reference, p_now);
  UPDATE credit_lots SET remaining = remaining - take WHERE id = p_lot;
  INSERT INTO ledger_allocations (entry_id, lot_id, amount) VALUES (e.id, p_lot, -take);
  RETURN ledger_result('ok', e, w.id, NULL, p_amount - take);
END $$;

CREATE FUNCTION ledger_settle(p_wallet uuid, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
BEGIN
  w := ledger_open(p_wallet, p_now);
  IF w.id IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, p_wallet);
  END IF;
  RETURN ledger_result('ok', NULL::ledger_entries, p_wallet);
END $$;

CREATE FUNCTION ledger_set_status(p_wallet uuid, p_status text, p_now timestamptz)
RETURNS ledger_outcome LANGUAGE plpgsql AS $$
DECLARE
  w wallets;
BEGIN
  w := ledger_open(p_wallet, p_now);
  IF w.id IS NULL THEN
    RETURN ledger_result('not_found', NULL::ledger_entries, p_wallet);
  END IF;
  UPDATE wallets SET status = p_status, updated_at = p_now WHERE id = p_wallet;
  RETURN ledger_result('ok', NULL::ledger_entries, p_wallet);
END $$;

-- Every broken invariant of one wallet, as text; none when it is sound.
CREATE FUNCTION ledger_violations(p_wallet uuid)
RETURNS SETOF text LANGUAGE plpgsql STABLE AS $$
DECLARE
  w wallets;
  v bigint;
  v2 bigint;
  last ledger_entries;
  lot record;
BEGIN
  SELECT * INTO w FROM wallets WHERE id = p_wallet;
  SELECT coalesce(sum(amount), 0), coalesce(sum(held_change), 0) INTO v, v2
  FROM ledger_entries WHERE wallet_id = p_wallet;
  IF v <> w.balance THEN
    RETURN NEXT format('balance %s <> sum of entry amounts %s', w.balance, v);
  END IF;
  IF v2 <> w.reserved THEN
    RETURN NEXT format('reserved %s <> sum of entry held changes %s', w.reserved, v2);
  END IF;
  SELECT coalesce(sum(remaining), 0) INTO v FROM credit_lots WHERE wallet_id = p_wallet;
  IF v <> w.balance THEN
    RETURN NEXT format('balance %s <> sum of lots remaining %s', w.balance, v);
  END IF;
  SELECT coalesce(sum(amount), 0) INTO v FROM reservations WHERE wallet_id = p_wallet AND status = 'open';
  IF v <> w.reserved THEN
    RETURN NEXT format('reserved %s <> sum of open reservations %s', w.reserved, v);
  END IF;
  SELECT count(*), coalesce(max(seq), 0) INTO v, v2 FROM ledger_entries WHERE wallet_id = p_wallet;
  IF v <> w.entry_seq OR v2 <> w.entry_seq THEN
    RETURN NEXT format('entry_seq %s but %s entries up to seq %s', w.entry_seq, v, v2);
  END IF;
  SELECT * INTO last FROM ledger_entries WHERE wallet_id = p_wallet ORDER BY seq DESC LIMIT 1;
  IF FOUND AND (last.balance_after <> w.balance OR last.reserved_after <> w.reserved) THEN
    RETURN NEXT format('last entry says %s/%s, wallet %s/%s', last.balance_after, last.reserved_after,
                       w.balance, w.reserved);
  END IF;
  SELECT count(*) INTO v FROM (
    SELECT seq, balance_after, sum(amount) OVER (ORDER BY seq) AS running
    FROM ledger_entries WHERE wallet_id = p_wallet
  ) s WHERE s.balance_after <> s.running;
  IF v > 0 THEN
    RETURN NEXT format('%s entries whose balance_after is not the running sum', v);
  END IF;
  FOR lot IN
    SELECT l.id, l.remaining, coalesce(sum(a.amount), 0) AS allocated
    FROM credit_lots l LEFT JOIN ledger_allocations a ON a.lot_id = l.id
    WHERE l.wallet_id = p_wallet
    GROUP BY l.id, l.remaining
    HAVING l.remaining <> coalesce(sum(a.amount), 0)
  LOOP
    RETURN NEXT format('lot %s remaining %s <> sum of its allocations %s', lot.id, lot.remaining, lot.allocated);
  END LOOP;
END $$;
"""

DOWN = r"""
DROP FUNCTION ledger_violations(uuid), ledger_set_status(uuid, text, timestamptz),
  ledger_settle(uuid, timestamptz),
  ledger_clawback(uuid, bigint, text, text, text, uuid, timestamptz),
  ledger_refund(uuid, bigint, text, text, text, timestamptz),
  ledger_release(uuid, text, timestamptz), ledger_capture(uuid, bigint, text, text, timestamptz),
  ledger_reserve(uuid, bigint, text, integer, text, text, timestamptz),
  ledger_consume(uuid, bigint, text, text, jsonb, text, timestamptz),
  ledger_credit(uuid, text, text, bigint, smallint, timestamptz, bigint, text, text, text, jsonb, text, uuid,
                timestamptz),
  ledger_replay(uuid, text, uuid), ledger_result(text, ledger_entries, uuid, uuid, bigint),
  ledger_open(uuid, timestamptz), ledger_unhold(uuid, reservations, bigint, text, text, timestamptz),
  ledger_sweep_lots(uuid, timestamptz),
  ledger_give_back(uuid, uuid, uuid, uuid[], bigint, boolean, timestamptz),
  ledger_new_lot(uuid, uuid, text, bigint, smallint, timestamptz, bigint, text, uuid, timestamptz),
  ledger_draw(uuid, uuid, bigint, timestamptz),
  ledger_append(uuid, text, bigint, bigint, text, uuid, text, jsonb, text, uuid, timestamptz),
  ledger_fingerprint(text, bigint, text, jsonb, text);
DROP TYPE ledger_outcome;
DROP TABLE reservations, ledger_allocations, credit_lots, ledger_entries, wallets;
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
