"""Organizations, users, memberships, API keys and the append-only audit log.

Revision ID: 0001
Revises:
"""

from orgwallet.db.migrate import execute_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UP = r"""

-- UUID v7 (time-ordered) for keys created inside SQL functions: index locality.
CREATE FUNCTION uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
              FROM 1 FOR 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;

-- Shared by every append-only table.
CREATE FUNCTION reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % rejected', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'restrict_violation';
END $$;

CREATE TABLE organizations (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  name        text NOT NULL CHECK (char_length(btrim(name)) BETWEEN 1 AND 200),
  slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$'),
  created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
  id          uuid PRIMARY KEY DEFAULT uuid_v7(),
  subject     text NOT NULL UNIQUE CHECK (char_length(subject) BETWEEN 1 AND 255),
  email       text CHECK (char_length(email) <= 320),
  name        text,
  created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
  organization_id uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  user_id         uuid NOT NULL REFERENCES users(id),
  role            text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'member', 'viewer')),
  created_at      timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE api_keys (
  id              uuid PRIMARY KEY DEFAULT uuid_v7(),
  organization_id uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  name            text NOT NULL CHECK (char_length(btrim(name)) BETWEEN 1 AND 200),
  prefix          text NOT NULL UNIQUE,
  secret_hash     text NOT NULL,
  scopes          text[] NOT NULL CHECK (scopes <@ ARRAY['tokens.view', 'tokens.consume',
                                         'tokens.purchase', 'tokens.configure']::text[]),
  created_by      text NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now(),
  last_used_at    timestamptz,
  revoked_at      timestamptz
);
CREATE INDEX api_keys_organization ON api_keys (organization_id);

CREATE TABLE audit_log (
  id              uuid PRIMARY KEY DEFAULT uuid_v7(),
  at              timestamptz NOT NULL DEFAULT now(),
  actor           text NOT NULL,
  action          text NOT NULL,
  organization_id uuid,
  target_type     text NOT NULL,
  target_id       text,
  before          jsonb,
  after           jsonb,
  request_id      text
);
CREATE INDEX audit_log_organization ON audit_log (organization_id, at DESC);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION reject_change();
"""

DOWN = r"""
DROP TABLE audit_log, api_keys, memberships, users, organizations;
DROP FUNCTION reject_change();
DROP FUNCTION uuid_v7();
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script(DOWN)
