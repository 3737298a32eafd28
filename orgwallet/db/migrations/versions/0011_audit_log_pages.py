"""The audit log read as pages (``Organization.auditLog``, its CSV export).

Pages are newest first, keyed on the time-ordered ids (UUID v7), like the other lists:
``(organization_id, id DESC)`` serves a page, ``(organization_id, action, id DESC)`` a page of
some actions. The index on ``(organization_id, at DESC)`` stays for a window of time far back.

Revision ID: 0011
Revises: 0010
"""

from orgwallet.db.migrate import execute_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UP = """
CREATE INDEX audit_log_organization_id ON audit_log (organization_id, id DESC);
CREATE INDEX audit_log_organization_action ON audit_log (organization_id, action, id DESC);
"""


def upgrade() -> None:
    execute_script(UP)


def downgrade() -> None:
    execute_script("DROP INDEX audit_log_organization_action; DROP INDEX audit_log_organization_id;")
