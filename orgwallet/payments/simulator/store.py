"""The simulator's state in PostgreSQL: a restart loses nothing, and several processes
(uvicorn workers, or servers on one database) share one simulated Stripe account.

It is Stripe's side, not the app's: its tables live in a schema of their own,
``stripe_simulator``, created here when a process first uses it (the app's migrations do not
know it):

- ``records``: the account's state (see ``core``), a JSON value per (kind, key), with the
  version it was last written at and the one it was created at (one sequence gives both).
- ``deliveries``: a webhook delivery per row, from the commit that emitted its event; the
  process that emitted it (``owner``) sends it and records each attempt there.

A section is one short transaction holding the account's advisory lock (one account is
serial, as is fine for an offline stand-in): the records written since this process last
looked are loaded into the account's cache, the operation runs, the records it changed are
written back with new versions and the deliveries it queued are inserted; only after the
commit are they handed out for sending. A section that fails drops the cache, loaded whole
again by the next one.

Each process holds an advisory lock of its own (its number) on a connection kept while it
runs: a pending delivery whose owner's lock is free was left by a process that died. The
first section of a process claims those (``FOR UPDATE SKIP LOCKED``; the claimer becomes the
owner) and sends them. Deliveries stay at least once (the app is idempotent on event ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from orgwallet.db.engine import DriverPool
from orgwallet.payments.simulator.core import Account
from orgwallet.payments.simulator.delivery import DeliveryAttempt
from orgwallet.payments.simulator.objects import JsonObject

log = logging.getLogger(__name__)

#: The simulator's advisory locks: (LOCK_CLASS, 0) is the account, (LOCK_CLASS, n) process n.
LOCK_CLASS = 0x53545250  # "STRP"
POOL_SIZE = 4  # one section at a time per process, and the deliveries' records beside it

_SCHEMA = f"""
SELECT pg_advisory_xact_lock({LOCK_CLASS}, 0);
CREATE SCHEMA IF NOT EXISTS stripe_simulator;
CREATE SEQUENCE IF NOT EXISTS stripe_simulator.versions;
CREATE SEQUENCE IF NOT EXISTS stripe_simulator.processes AS integer CYCLE;
CREATE TABLE IF NOT EXISTS stripe_simulator.records (
    kind text NOT NULL,
    key text NOT NULL,
    data json NOT NULL,
    created bigint NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS records_by_version ON stripe_simulator.records (version);
CREATE TABLE IF NOT EXISTS stripe_simulator.deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    secret text,
    signed_at bigint,
    owner integer NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON stripe_simulator.deliveries (owner)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_event ON stripe_simulator.deliveries (event_id);
"""

# No wait for the disk at commit: the app's next commit (it records what Stripe answered)
# flushes the simulator's too, and an offline Stripe may lose its last instant in a crash.
_BEGIN = f"BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock({LOCK_CLASS}, 0)"

_CHANGED = """
SELECT kind, key, data, version FROM stripe_simulator.records WHERE version > $1 ORDER BY created
"""

# Versions in the order the records were touched (volatile functions run after ORDER BY).
_WRITE = """
WITH written AS (
    INSERT INTO stripe_simulator.records AS r (kind, key, data, created, version)
    SELECT kind, key, data::json, version, version FROM (
        SELECT t.kind, t.key, t.data, nextval('stripe_simulator.versions') AS version
        FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t (kind, key, data, n)
        ORDER BY t.n
    ) AS numbered
    ON CONFLICT (kind, key) DO UPDATE SET data = excluded.data, version = excluded.version
    RETURNING r.version
)
SELECT max(version) FROM written
"""

_QUEUE = """
INSERT INTO stripe_simulator.deliveries (event_id, secret, signed_at, owner)
SELECT t.event_id, t.secret, t.signed_at, $4
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t (event_id, secret, signed_at)
RETURNING id, event_id, secret, signed_at, 0 AS attempts
"""

# Pending deliveries of processes that are gone (their lock is free), and this process's own
# that it is not sending (a section whose commit was interrupted).
_CLAIM = """
UPDATE stripe_simulator.deliveries AS d SET owner = $1
WHERE d.id IN (
    SELECT p.id FROM stripe_simulator.deliveries AS p
    WHERE p.state = 'pending'
      AND CASE WHEN p.owner = $1 THEN NOT p.id = ANY($2::bigint[])
          ELSE NOT EXISTS (
              SELECT FROM pg_locks AS l
              WHERE l.locktype = 'advisory' AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = $3::oid AND l.objid = p.owner::oid AND l.objsubid = 2)
          END
    ORDER BY p.id
    FOR UPDATE SKIP LOCKED
)
RETURNING d.id, d.event_id, d.secret, d.signed_at, jsonb_array_length(d.attempts) AS attempts
"""

_ATTEMPT = """
UPDATE stripe_simulator.deliveries SET attempts = attempts || $2::jsonb, state = $3 WHERE id = $1
"""

_ATTEMPTS = """
SELECT event_id, attempts FROM stripe_simulator.deliveries WHERE event_id = ANY($1::text[]) ORDER BY id
"""

#: Whether the running task is inside a section (a nested one would wait for itself).
_inside: ContextVar[bool] = ContextVar("stripe_simulator_section", default=False)


@dataclass(frozen=True)
class Send:
    """A committed delivery, to send now."""

    delivery_id: int
    event: JsonObject
    secret: str | None
    timestamp: int | None
    attempts_made: int


@dataclass
class Section:
    connection: Any  # the section's asyncpg connection, in its transaction
    sends: list[Send] = field(default_factory=list)  # filled when it has committed


class Store:
    """The PostgreSQL side of one process's simulator: its own small asyncpg pool (never a
    connection of the app's), opened at the first section."""

    def __init__(self, database_url: str) -> None:
        self.pool = DriverPool(database_url, POOL_SIZE)
        self.process: int | None = None  # this process's number, the owner of its deliveries
        self._alive: asyncpg.Connection | None = None  # holds the process's lock
        self._lock: asyncio.Lock | None = None
        self._seen = 0  # the highest record version loaded into the cache
        self._claim = True  # the next section claims deliveries left pending
        self._sending: set[int] = set()

    @asynccontextmanager
    async def section(self, account: Account) -> AsyncIterator[Section]:
        """One section of ``account`` (see the module's docstring); ``sends`` is filled when
        the block has ended and the transaction committed."""
        if _inside.get():
            raise RuntimeError("a section of the simulated account is already open in this task")
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            inside = _inside.set(True)
            try:
                if self.process is None:
                    await self._start()
                async with (
                    self.pool.acquire() as connection,
                    self._transaction(connection, account) as section,
                ):
                    yield section
            finally:
                _inside.reset(inside)

    @asynccontextmanager
    async def _transaction(self, connection: Any, account: Account) -> AsyncIterator[Section]:
        section = Section(connection)
        try:
            await connection.execute(_BEGIN)
            for kind, key, data, version in await connection.fetch(_CHANGED, self._seen):
                account.load(kind, key, data)
                self._seen = max(self._seen, version)
            account.begin()
            claimed = (
                await connection.fetch(_CLAIM, self.process, list(self._sending), LOCK_CLASS)
                if self._claim
                else []
            )
            yield section
            changes = account.changes()
            if changes:
                kinds, keys, texts = zip(*changes, strict=True)
                self._seen = await connection.fetchval(_WRITE, kinds, keys, texts)
            queued = account.outbox()
            rows = list(claimed)
            if queued:
                rows += await connection.fetch(
                    _QUEUE,
                    [d.event_id for d in queued],
                    [d.secret for d in queued],
                    [d.timestamp for d in queued],
                    self.process,
                )
            sends = self._sends(account, rows)
            await connection.execute("COMMIT")
        except BaseException:
            account.forget()
            self._seen, self._claim = 0, True
            with contextlib.suppress(Exception):
                await connection.execute("ROLLBACK")
            raise
        finally:
            account.end()
        self._claim = False
        self._sending.update(send.delivery_id for send in sends)
        section.sends = sends

    @staticmethod
    def _sends(account: Account, rows: list[Any]) -> list[Send]:
        sends = []
        for row in rows:
            event = account.event(row["event_id"])
            if event is None:  # not expected: events are never removed
                log.warning("delivery %s: no event %s", row["id"], row["event_id"])
                continue
            sends.append(Send(row["id"], event, row["secret"], row["signed_at"], row["attempts"]))
        return sends

    async def _start(self) -> None:
        """Creates the schema if missing (under the account's lock: several processes start at
        once) and takes this process's number and lock."""
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(_SCHEMA)
            process = int(await connection.fetchval("SELECT nextval('stripe_simulator.processes')"))
        alive = await asyncpg.connect(self.pool.dsn)
        try:
            await alive.execute("SELECT pg_advisory_lock($1, $2)", LOCK_CLASS, process)
        except BaseException:
            await alive.close()
            raise
        self._alive, self.process = alive, process

    async def record_attempt(self, delivery_id: int, attempt: DeliveryAttempt, last: bool) -> None:
        """The delivery's attempt, and its state: delivered, failed for good, or pending."""
        state = "delivered" if attempt.succeeded else "failed" if last else "pending"
        # jsonb refuses NUL, which an error message could carry
        entry = orjson.dumps([attempt.as_json()]).decode().replace("\\u0000", "")
        async with self.pool.acquire() as connection:
            await connection.execute(_ATTEMPT, delivery_id, entry, state)
        if state != "pending":
            self._sending.discard(delivery_id)

    async def attempts(self, event_ids: Collection[str]) -> dict[str, list[JsonObject]]:
        """The delivery attempts of these events, by any process, by event id."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(_ATTEMPTS, list(event_ids))
        found: dict[str, list[JsonObject]] = {}
        for row in rows:
            found.setdefault(row["event_id"], []).extend(row["attempts"])
        return found

    async def close(self) -> None:
        """Gives the process's lock up (what it left pending is then another's to send)."""
        if self._alive is not None:
            alive, self._alive = self._alive, None
            await alive.close()
        self.process = None
        self._claim = True
        self._sending.clear()
        await self.pool.close()
