"""The benchmark's PostgreSQL: started (embedded) or borrowed (ORGWALLET_DATABASE_URL), migrated,
seeded, checked after every workload, and measured for bytes per ledger entry."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from strawberry.relay import to_base64

from orgwallet.auth import api_keys as key_secrets
from orgwallet.db.engine import asyncpg_url, pgserver_module
from orgwallet.db.migrate import upgrade

#: Wallets and organizations get predictable ids, so that pgbench (which only has integer
#: variables) can name wallet ``n`` as ``WALLET_PREFIX || lpad(to_hex(n), 12, '0')``.
ORG_PREFIX = "00000000-0000-7000-8000-"
WALLET_PREFIX = "00000000-0000-7000-9000-"

#: Every wallet holds more than any run can spend; the hot one more still.
WALLET_BALANCE = 1_000_000_000
HOT_BALANCE = 1_000_000_000_000_000
TRIAL_TOKENS = 3
HISTORY_ENTRIES = 150
HANDLED_EVENTS = 5_000

#: The wallet-change signal (migration 0007): the trigger on every write of a balance, and the
#: low-balance alert that every other organization (odd n) and the hot wallet's have, at this
#: many tokens (the alert listener's watch band is then [LOW_ALERT_TOKENS, none); the other
#: wallets keep a new wallet's band, [1, none), the built-in watch for depletion).
SIGNAL_TRIGGER = "wallets_signal"
SIGNAL_JOB = "wallet.signal"
LOW_ALERT_TOKENS = 1_000


def org_id(n: int) -> uuid.UUID:
    return uuid.UUID(f"{ORG_PREFIX}{n:012x}")


def wallet_id(n: int) -> uuid.UUID:
    return uuid.UUID(f"{WALLET_PREFIX}{n:012x}")


@dataclass(frozen=True)
class Org:
    n: int
    id: uuid.UUID
    wallet_id: uuid.UUID
    global_id: str
    api_key: str
    api_key_id: uuid.UUID

    @property
    def actor(self) -> str:
        return f"apikey:{self.api_key_id}"


@dataclass
class Seeded:
    many: list[Org]
    hot: Org
    history: Org

    def write_lua_data(self, directory: Path) -> dict[str, Path]:
        """One ``<global id> <api key>`` line per organization, for the Lua scripts."""
        files = {"many": self.many, "hot": [self.hot], "history": [self.history]}
        paths = {}
        for name, orgs in files.items():
            path = directory / f"orgs-{name}.txt"
            path.write_text("".join(f"{o.global_id} {o.api_key}\n" for o in orgs))
            paths[name] = path
        return paths


@dataclass
class Database:
    """Where the benchmark's database lives and how each tool reaches it."""

    url: str  # SQLAlchemy URL (postgresql+asyncpg://...), what the server gets
    name: str
    postmaster_pid: int | None
    _server: Any = None
    _admin_dsn: str | None = None  # to drop a database we created on a borrowed server
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        """The asyncpg DSN."""
        return self.url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def libpq_env(self) -> dict[str, str]:
        """PGHOST & co. for pgbench and psql (a unix socket directory for the embedded one)."""
        parsed = make_url(self.url)
        host = parsed.host or parsed.query.get("host")
        env = {"PGDATABASE": self.name, "PGUSER": parsed.username or "postgres"}
        if host:
            env["PGHOST"] = str(host if isinstance(host, str) else host[0])
        if parsed.port:
            env["PGPORT"] = str(parsed.port)
        if parsed.password:
            env["PGPASSWORD"] = parsed.password
        return env

    def stop(self) -> None:
        if self._admin_dsn is not None:
            asyncio.run(_drop_database(self._admin_dsn, self.name))
        if self._server is not None:
            self._server.cleanup()


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def start(workdir: Path, url: str | None) -> Database:
    """A fresh, migrated database: on a new embedded PostgreSQL in ``workdir``, or a new
    database on the server of ``url`` (which is left as it was, but for the load)."""
    name = f"orgwallet_bench_{secrets.token_hex(4)}"
    if url:
        parsed = make_url(url)
        admin = parsed.set(drivername="postgresql")
        admin_dsn = admin.render_as_string(hide_password=False)
        asyncio.run(_create_database(admin_dsn, name))
        bench_url = parsed.set(database=name).render_as_string(hide_password=False)
        db = Database(url=bench_url, name=name, postmaster_pid=None, _admin_dsn=admin_dsn)
    else:
        server = pgserver_module().get_server(workdir / "pg", cleanup_mode="delete")
        server.psql(f"CREATE DATABASE {name};")
        db = Database(
            url=asyncpg_url(server.get_uri(), name),
            name=name,
            postmaster_pid=server.get_pid(),
            _server=server,
        )
    upgrade(db.url)
    db.settings = asyncio.run(_settings(db.dsn))
    if db.postmaster_pid is None:
        db.postmaster_pid = _local_postmaster(db.settings.get("data_directory"))
    return db


def _local_postmaster(data_directory: str | None) -> int | None:
    """The postmaster's pid when the borrowed server runs on this machine (for its CPU time)."""
    if not data_directory:
        return None
    try:
        pid = int(Path(data_directory, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


SHOWN_SETTINGS = (
    "server_version",
    "data_directory",
    "max_connections",
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "commit_delay",
    "work_mem",
)


async def _settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1)", list(SHOWN_SETTINGS)
        )
        out = {r["name"]: r["setting"] for r in rows}
        out["version"] = await conn.fetchval("SELECT version()")
        return out
    finally:
        await conn.close()


# ---------------------------------------------------------------- seed


async def seed(dsn: str, organizations: int) -> Seeded:
    """``organizations`` organizations (n = 1..N) with a wallet of two lots (a trial grant
    expiring in 30 days, drawn first, and a large purchase) and an API key with tokens.view and
    tokens.consume; plus the hot wallet (N+1, a huge balance) and the history wallet (N+2,
    HISTORY_ENTRIES consumptions). Written through the ledger's own SQL functions. The watch
    bands of the wallet-change signal are those of a live system (``_watch``)."""
    hot_n, history_n = organizations + 1, organizations + 2
    total = organizations + 2
    keys = [key_secrets.issue() for _ in range(total)]
    key_ids = [uuid.uuid4() for _ in range(total)]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO organizations (id, name, slug)
                SELECT ($1 || lpad(to_hex(n), 12, '0'))::uuid, 'Bench ' || n, 'bench-' || n
                FROM generate_series(1, $2::int) n
                """,
                ORG_PREFIX,
                total,
            )
            await conn.execute(
                """
                INSERT INTO wallets (id, organization_id)
                SELECT ($1 || lpad(to_hex(n), 12, '0'))::uuid, ($2 || lpad(to_hex(n), 12, '0'))::uuid
                FROM generate_series(1, $3::int) n
                """,
                WALLET_PREFIX,
                ORG_PREFIX,
                total,
            )
            await conn.executemany(
                """
                INSERT INTO api_keys (id, organization_id, name, prefix, secret_hash, scopes, created_by)
                VALUES ($1, $2, 'bench', $3, $4, ARRAY['tokens.view', 'tokens.consume'], 'bench')
                """,
                [(key_ids[i], org_id(i + 1), keys[i].prefix, keys[i].secret_hash) for i in range(total)],
            )
            outcomes = await conn.fetch(
                """
                SELECT (ledger_credit(w, 'trial_grant', 'trial', $1::bigint, 10::smallint,
                                      now() + interval '30 days', NULL, NULL, 'seed-trial', 'trial grant',
                                      NULL, 'bench', NULL, now())).outcome,
                       (ledger_credit(w, 'purchase', 'purchase',
                                      CASE WHEN n = $3::int THEN $4::bigint ELSE $2::bigint END, 30::smallint,
                                      NULL, 0::bigint, 'USD', 'seed-purchase', 'bench purchase', NULL,
                                      'bench', NULL, now())).outcome
                FROM generate_series(1, $5::int) n,
                     LATERAL (SELECT ($6 || lpad(to_hex(n), 12, '0'))::uuid) AS x(w)
                """,
                TRIAL_TOKENS,
                WALLET_BALANCE,
                hot_n,
                HOT_BALANCE,
                total,
                WALLET_PREFIX,
            )
            bad = [tuple(r) for r in outcomes if tuple(r) != ("ok", "ok")]
            assert not bad, f"seeding credits failed: {bad[:3]}"
            history = await conn.fetch(
                """
                SELECT (ledger_consume($1::uuid, 1 + g % 7::bigint, 'history-' || g, 'seeded history', NULL,
                                       'bench', now())).outcome
                FROM generate_series(1, $2::int) g
                """,
                wallet_id(history_n),
                HISTORY_ENTRIES,
            )
            assert all(r[0] == "ok" for r in history), "seeding the history wallet failed"
            await _watch(conn, organizations)
            # Stripe events handled before (a server that has been up a while has them): the
            # planner then knows stripe_events is not empty, as it does on a live system, and the
            # webhook burst's statements are planned for a table of that size (on an empty
            # table a cached plan would scan it whole for the whole burst).
            await conn.execute(
                """
                INSERT INTO stripe_events (event_id, type, payload, received_at, handled_at, outcome)
                SELECT 'evt_seed_' || g, 'checkout.session.completed',
                       jsonb_build_object('id', 'evt_seed_' || g, 'object', 'event',
                                          'data', jsonb_build_object('object', jsonb_build_object(
                                              'id', 'cs_seed_' || g, 'padding', repeat('x', 2500)))),
                       now() - interval '1 day', now() - interval '1 day', 'ignored'
                FROM generate_series(1, $1::int) g
                """,
                HANDLED_EVENTS,
            )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()

    def org(n: int) -> Org:
        return Org(
            n=n,
            id=org_id(n),
            wallet_id=wallet_id(n),
            global_id=to_base64("Organization", str(org_id(n))),
            api_key=keys[n - 1].secret,
            api_key_id=key_ids[n - 1],
        )

    return Seeded(many=[org(n) for n in range(1, organizations + 1)], hot=org(hot_n), history=org(history_n))


async def _has_signal(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'wallets'::regclass AND tgname = $1)",
            SIGNAL_TRIGGER,
        )
    )


async def _watch(conn: asyncpg.Connection, organizations: int) -> None:
    """The wallet-change signal's watch bands as a live system has them: every other
    organization (odd n) and the hot wallet's have a low-balance alert at LOW_ALERT_TOKENS,
    armed, with the built-in depletion watch (the rows and the band that the alert listener,
    ``alerts.evaluate``, writes); the others keep a new wallet's band. Every balance is far
    inside its band, so the trigger's WHEN clause is evaluated on every write and never fires
    (the common case). Nothing to do before migration 0007."""
    if not await _has_signal(conn):
        return
    hot_n = organizations + 1
    await conn.execute(
        """
        WITH watched AS (
          SELECT w.id, w.organization_id, w.entry_seq
          FROM generate_series(1, $2::int) n
          JOIN wallets w ON w.id = ($3 || lpad(to_hex(n), 12, '0'))::uuid
          WHERE n % 2 = 1 OR n = $2
        ), alerts AS (
          INSERT INTO balance_alerts (organization_id, kind, threshold, checked_seq, created_by)
          SELECT organization_id, a.kind, a.threshold, entry_seq, a.created_by
          FROM watched,
               (VALUES ('low', $1::bigint, 'bench'), ('depleted', 1, NULL)) AS a(kind, threshold, created_by)
        )
        UPDATE wallets w SET watch_below = $1 FROM watched WHERE w.id = watched.id
        """,
        LOW_ALERT_TOKENS,
        hot_n,
        WALLET_PREFIX,
    )
    outside = await conn.fetchval(
        "SELECT count(*) FROM wallets WHERE balance < watch_below OR balance >= watch_at_or_above"
    )
    assert outside == 0, f"seeding: {outside} wallets outside their watch band"


async def signal_status(dsn: str) -> dict[str, Any]:
    """The wallet-change signal's state: the trigger (``enabled``: True, False, or None when it
    is not installed), the ``wallet.signal`` jobs enqueued so far (PgQueuer's log keeps one
    'queued' line per job) and the wallets per watch band, with those outside their band."""
    conn = await asyncpg.connect(dsn)
    try:
        state = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = 'wallets'::regclass AND tgname = $1",
            SIGNAL_TRIGGER,
        )
        if state is None:
            return {"enabled": None, "enqueued": None, "bands": []}
        enqueued = await conn.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE entrypoint = $1 AND status = 'queued'", SIGNAL_JOB
        )
        bands = await conn.fetch(
            """
            SELECT watch_below, watch_at_or_above, count(*) AS wallets, min(balance) AS min_balance,
                   count(*) FILTER (WHERE balance < watch_below OR balance >= watch_at_or_above) AS outside
            FROM wallets GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
            """
        )
    finally:
        await conn.close()
    return {
        "enabled": state != "D",
        "enqueued": int(enqueued),
        "bands": [
            {
                "watch_below": b["watch_below"],
                "watch_at_or_above": b["watch_at_or_above"],
                "wallets": int(b["wallets"]),
                "min_balance": b["min_balance"],
                "outside": int(b["outside"]),
            }
            for b in bands
        ],
    }


async def set_signal(dsn: str, *, enabled: bool) -> None:
    """``ALTER TABLE wallets ENABLE|DISABLE TRIGGER wallets_signal`` on the bench's own
    connection, the database's owner (it created and migrated the database), then reads the
    trigger's state back. Waits at most 30 s for the table's lock (the server is idle between
    workloads, but for its job worker)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET lock_timeout = '30s'")
        verb = "ENABLE" if enabled else "DISABLE"
        await conn.execute(f"ALTER TABLE wallets {verb} TRIGGER {SIGNAL_TRIGGER}")
        state = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = 'wallets'::regclass AND tgname = $1",
            SIGNAL_TRIGGER,
        )
    finally:
        await conn.close()
    if (state != "D") != enabled:
        raise RuntimeError(f"{SIGNAL_TRIGGER}: tgenabled is {state!r} after {verb}")


# ---------------------------------------------------------------- checks


@dataclass
class Check:
    after: str
    scope: str  # all wallets, or those written since the previous check
    wallets: int
    violations: dict[str, list[str]]
    duplicate_credits: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.violations and self.duplicate_credits == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "after": self.after,
            "scope": self.scope,
            "wallets": self.wallets,
            "violations": self.violations,
            "duplicate_credits": self.duplicate_credits,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
        }


async def check(dsn: str, after: str, since: Any = None) -> tuple[Check, Any]:
    """The ledger invariants (``ledger_violations``, what ``orgwallet check`` runs) on every
    wallet, or on those written since ``since`` (every ledger write stamps its wallet's
    ``updated_at``), and the credits recorded twice for one reference (a purchase, an event).
    Returns the check and the database clock when it began (the next ``since``)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        began = await conn.fetchval("SELECT clock_timestamp()")
        rows = await conn.fetch(
            "SELECT w.id, v.problem FROM wallets w, LATERAL ledger_violations(w.id) AS v(problem)"
            " WHERE $1::timestamptz IS NULL OR w.updated_at >= $1 ORDER BY w.id",
            since,
        )
        wallets = await conn.fetchval(
            "SELECT count(*) FROM wallets WHERE $1::timestamptz IS NULL OR updated_at >= $1", since
        )
        duplicates = await conn.fetchval(
            """
            SELECT coalesce(sum(n - 1), 0) FROM (
              SELECT count(*) AS n FROM ledger_entries
              WHERE kind IN ('purchase', 'subscription_grant') AND reference_id IS NOT NULL
              GROUP BY wallet_id, kind, reference_id HAVING count(*) > 1
            ) d
            """
        )
    finally:
        await conn.close()
    found: dict[str, list[str]] = {}
    for wid, problem in rows:
        found.setdefault(str(wid), []).append(problem)
    scope = "all wallets" if since is None else "wallets written since the previous check"
    return Check(after, scope, int(wallets), found, int(duplicates), time.perf_counter() - started), began


async def count_entries(dsn: str, kind: str = "consumption") -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = $1", kind))
    finally:
        await conn.close()


# ---------------------------------------------------------------- storage


async def bytes_per_entry(dsn: str, wallets: list[Org], entries: int) -> dict[str, Any]:
    """As pgledger measures it: VACUUM FULL, pg_database_size, write ``entries`` consumptions
    (each an entry and its allocation, keys and actors as the API writes them), VACUUM FULL,
    pg_database_size again; the difference per entry, indexes included."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM FULL")
        before = await conn.fetchval("SELECT pg_database_size(current_database())")
        tables_before = await _table_sizes(conn)
        nonce = secrets.token_hex(4)
        owners = [wallets[i % len(wallets)] for i in range(entries)]
        rows = [(w.wallet_id, f"st-{nonce}-{i:08d}", w.actor) for i, w in enumerate(owners)]
        async with conn.transaction():
            await conn.executemany(
                "SELECT ledger_consume($1, 1, $2, NULL, NULL, $3, now())",
                rows,
            )
        await conn.execute("VACUUM FULL")
        after = await conn.fetchval("SELECT pg_database_size(current_database())")
        tables_after = await _table_sizes(conn)
    finally:
        await conn.close()
    per_table = {
        name: round((tables_after.get(name, 0) - tables_before.get(name, 0)) / entries, 1)
        for name in tables_after
    }
    return {
        "entries": entries,
        "database_bytes_before": before,
        "database_bytes_after": after,
        "bytes_per_entry": round((after - before) / entries, 1),
        "per_table_bytes_per_entry": per_table,
    }


async def _table_sizes(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT relname, pg_total_relation_size(oid) FROM pg_class
        WHERE relname IN ('ledger_entries', 'ledger_allocations', 'credit_lots', 'wallets') AND relkind = 'r'
        """
    )
    return {r[0]: int(r[1]) for r in rows}
