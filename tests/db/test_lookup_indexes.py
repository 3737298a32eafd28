"""Every lookup on a request's path has an index that starts with the column it looks up by:
a scan there makes each request's cost grow with the table (the credit of a paid purchase
once read every credit lot to find the one its entry made)."""

from __future__ import annotations

import asyncpg
import pytest

#: (table, column): the lookups of the request paths, and where they are.
LOOKUPS = [
    ("credit_lots", "entry_id"),  # services.purchases._MARK_PAID: the lot of a purchase's credit
    ("purchases", "checkout_session_id"),  # services.purchases.find_purchase
    ("purchases", "payment_intent_id"),  # find_purchase
    ("purchases", "charge_id"),  # find_purchase (refunds, disputes)
    ("purchases", "id"),  # find_purchase by metadata
    ("stripe_events", "event_id"),  # webhooks.stripe: the claim and the duplicate check
    ("wallets", "organization_id"),  # every wallet read and consumption by organization
    ("api_keys", "prefix"),  # services.api_keys.authenticate
    ("ledger_entries", "wallet_id"),  # the history page (wallet_id, seq)
    ("ledger_allocations", "entry_id"),  # refunds of a consumption
    ("memberships", "organization_id"),  # access.role_in
    ("users", "subject"),  # access.role_in
]


@pytest.mark.parametrize(("table", "column"), LOOKUPS)
async def test_the_lookup_has_an_index(database_url: str, table: str, column: str) -> None:
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        leading = await connection.fetch(
            """
            SELECT c.relname FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = $1::regclass AND a.attname = $2
            """,
            table,
            column,
        )
    finally:
        await connection.close()
    assert leading, f"no index on {table} starts with {column}"
