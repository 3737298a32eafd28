"""Live updates: what GraphQL subscriptions push, fed by PostgreSQL LISTEN on ONE dedicated
connection per process (``LiveHub``, owned by the ``Runtime``) and fanned out in memory.

The database says what changed, from a trigger in the changing transaction (migration 0012),
so a change is pushed once it has committed and never when it rolled back:

- ``live_wallet``: a watched wallet's new state. A wallet is watched while a process has a
  lease on it (``live_watch``: a row in ``live_wallets``, and the latest lease on the wallet's
  row), which the process renews while it has subscribers. A consumption on a wallet nobody
  watches sends no NOTIFY (NOTIFY takes a global lock at commit: one per balance write would
  serialize every commit); it pays one comparison in the trigger's WHEN clause.
- ``live_notification``: a new notification's id and organization.

A subscriber holds at most one wallet state, the latest: a slow client skips states, it never
queues them (``WalletFeed``). When the listening connection drops, the hub reconnects with
back-off, renews its watches and sends every wallet subscriber the current state again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.db.engine import DriverPool, transaction
from orgwallet.errors import NotFound
from orgwallet.services import wallets as wallet_service

log = logging.getLogger(__name__)

WALLET_CHANNEL = "live_wallet"
NOTIFICATION_CHANNEL = "live_notification"
#: Back-off between attempts to listen again: doubled after each failure, up to the maximum.
RECONNECT_FIRST_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 10.0
#: How often the listening connection is checked (a connection gone silently shows only when
#: used). Leases are renewed three times per lease.
CHECK_SECONDS = 10.0
#: Notification ids a subscriber may have waiting; past it, the oldest are dropped (counted).
NOTIFICATION_BUFFER = 100
SEEN_IDS = 1000  # per notification subscriber: ids already offered
#: After a reconnect, notifications made from this long before the last moment the hub was
#: known to listen are searched (a transaction may insert one well before it commits).
RECOVERY_MARGIN_SECONDS = 120.0


def id_floor(at: float) -> uuid.UUID:
    """The smallest UUIDv7 of the millisecond ``at`` (seconds since the epoch): ``uuid_v7()``
    ids made at or after it are not smaller."""
    return uuid.UUID(int=int(at * 1000) << 80)


#: A subscription waits this long at most for the hub to be listening.
START_TIMEOUT_SECONDS = 10.0

# This process's watch of a wallet for the lease's seconds (NULL: the watch ends). It locks the
# wallet: it waits for the writer in flight, and every later writer sees the watch.
_WATCH = "SELECT live_watch($1, $2, now() + make_interval(secs => $3))"
# The leases of processes long gone (a lease that has run out no longer counts).
_FORGET_EXPIRED = "DELETE FROM live_wallets WHERE expires_at < now() - interval '1 hour'"
# The wallets as a query reads them (and whether something is past due), with their entry
# sequence: one snapshot.
_STATES = f"""
    SELECT s.*, x.entry_seq
    FROM ({wallet_service.WALLET_STATE} WHERE w.id = ANY($1::uuid[])) s
    JOIN wallets x ON x.id = s.wallet_id
"""  # noqa: S608 (constant text)


@dataclass(frozen=True, slots=True)
class WalletChange:
    state: ledger.WalletState
    seq: int  # the wallet's entry sequence: a state older than one already offered is dropped


def wallet_change(record: Mapping[str, Any]) -> WalletChange | None:
    """From a row of ``_STATES`` or a ``live_wallet`` payload (same keys); None when due."""
    state = wallet_service.wallet_state(record)
    return None if state is None else WalletChange(state, int(record["entry_seq"]))


@dataclass
class LiveCounters:
    """What the hub has done since it was built (for tests and operators)."""

    notifies: int = 0  # NOTIFY messages received, for any process's wallets
    offered: int = 0  # wallet states handed to subscribers
    coalesced: int = 0  # states replaced before their subscriber took them
    dropped: int = 0  # notification ids dropped from a full buffer
    connects: int = 0  # listening connections established
    refreshes: int = 0  # states sent again to every wallet subscriber after a reconnect
    recovered: int = 0  # notifications made while nobody listened, found after a reconnect


class _Feed:
    def __init__(self, counters: LiveCounters) -> None:
        self._counters = counters
        self._ready = asyncio.Event()

    async def _wait(self, within: float) -> bool:
        if self._ready.is_set():
            return True
        try:
            async with asyncio.timeout(max(within, 0.0)):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True


class WalletFeed(_Feed):
    """One ``walletUpdated`` subscriber's mailbox: the latest state it has not taken yet."""

    def __init__(self, wallet_id: uuid.UUID, counters: LiveCounters) -> None:
        super().__init__(counters)
        self.wallet_id = wallet_id
        self._latest: WalletChange | None = None  # waiting for the subscriber
        self._newest: WalletChange | None = None  # the newest ever offered
        self.delivered = 0
        self.coalesced = 0

    @property
    def pending(self) -> int:
        """States waiting for the subscriber: never more than one."""
        return 0 if self._latest is None else 1

    def offer(self, change: WalletChange, *, again: bool = False) -> None:
        """Keeps ``change`` as the one to deliver, unless an equal or newer one was offered
        (a change that committed before the first read may arrive after it); ``again``
        delivers it whatever was offered before."""
        newest = self._newest
        if not again and newest is not None and (change.seq < newest.seq or change == newest):
            return
        if self._latest is not None:
            self.coalesced += 1
            self._counters.coalesced += 1
        self._latest = self._newest = change
        self._counters.offered += 1
        self._ready.set()

    async def next(self, within: float) -> WalletChange | None:
        """The latest state, as soon as there is one; None when ``within`` seconds pass first."""
        if not await self._wait(within):
            return None
        change, self._latest = self._latest, None
        self._ready.clear()
        self.delivered += 1
        return change


class NotificationFeed(_Feed):
    """One ``notificationAdded`` subscriber's mailbox: ids of new notifications, in order."""

    def __init__(self, organization_id: uuid.UUID, counters: LiveCounters) -> None:
        super().__init__(counters)
        self.organization_id = organization_id
        self._ids: collections.deque[uuid.UUID] = collections.deque(maxlen=NOTIFICATION_BUFFER)
        self.dropped = 0
        # Notifications made before the subscription began are not its (ids are time-ordered);
        # an id is offered once, whether it came by NOTIFY or by the search after a reconnect.
        self.since = id_floor(time.time())
        self._seen: collections.deque[uuid.UUID] = collections.deque(maxlen=SEEN_IDS)
        self._seen_set: set[uuid.UUID] = set()

    def offer(self, notification_id: uuid.UUID) -> None:
        if notification_id < self.since or notification_id in self._seen_set:
            return
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(notification_id)
        self._seen_set.add(notification_id)
        if len(self._ids) == self._ids.maxlen:
            self.dropped += 1
            self._counters.dropped += 1
        self._ids.append(notification_id)
        self._ready.set()

    async def next(self, within: float) -> uuid.UUID | None:
        if not await self._wait(within):
            return None
        notification_id = self._ids.popleft()
        if not self._ids:
            self._ready.clear()
        return notification_id


class LiveHub:
    """The process's one listening connection and its subscribers.

    Started by the first subscriber. A wallet is watched from its first subscriber in this
    process to its last; the watches are renewed while the hub runs and end when their last
    subscriber goes (or with the lease, when the process dies)."""

    def __init__(
        self, driver: DriverPool, sessions: async_sessionmaker[AsyncSession], *, lease_seconds: float
    ) -> None:
        self.id = uuid.uuid4()  # this process's name in live_wallets
        self.counters = LiveCounters()
        self.backend_pid: int | None = None  # the listening connection's server process
        self._driver = driver
        self._sessions = sessions
        self._lease_seconds = lease_seconds
        self._check_seconds = min(CHECK_SECONDS, lease_seconds / 3)
        self._renewed_at = 0.0  # loop time of the last renewal
        self._wallet_feeds: dict[uuid.UUID, set[WalletFeed]] = {}
        self._notification_feeds: dict[uuid.UUID, set[NotificationFeed]] = {}
        self._leased: set[uuid.UUID] = set()  # wallets with this hub's row in live_wallets
        self._lease_lock = asyncio.Lock()  # one change of the rows at a time
        self._listening = asyncio.Event()
        self._heard_at = time.time()  # the last moment the hub was known to listen
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()

    def wallet_feeds(self, wallet_id: uuid.UUID) -> list[WalletFeed]:
        return list(self._wallet_feeds.get(wallet_id, ()))

    @property
    def subscribers(self) -> int:
        return sum(map(len, self._wallet_feeds.values())) + sum(map(len, self._notification_feeds.values()))

    @asynccontextmanager
    async def wallet(self, organization_id: uuid.UUID) -> AsyncIterator[WalletFeed]:
        """The organization's wallet: its current state at once, then each committed change."""
        await self._started()
        async with self._driver.acquire() as connection:
            wallet_id = await connection.fetchval(
                "SELECT id FROM wallets WHERE organization_id = $1", organization_id
            )
        if wallet_id is None:
            raise NotFound("wallet not found")
        feed = WalletFeed(wallet_id, self.counters)
        self._wallet_feeds.setdefault(wallet_id, set()).add(feed)
        try:
            await self._watch(wallet_id)
            current = await self._states([wallet_id])
            if wallet_id not in current:
                raise NotFound("wallet not found")
            feed.offer(current[wallet_id])
            yield feed
        finally:
            feeds = self._wallet_feeds[wallet_id]
            feeds.discard(feed)
            if not feeds:
                del self._wallet_feeds[wallet_id]
                self._chore(self._unwatch(wallet_id))

    @asynccontextmanager
    async def notifications(self, organization_id: uuid.UUID) -> AsyncIterator[NotificationFeed]:
        """Ids of the organization's notifications created from now on."""
        await self._started()
        feed = NotificationFeed(organization_id, self.counters)
        self._notification_feeds.setdefault(organization_id, set()).add(feed)
        try:
            yield feed
        finally:
            feeds = self._notification_feeds[organization_id]
            feeds.discard(feed)
            if not feeds:
                del self._notification_feeds[organization_id]

    async def close(self) -> None:
        for task in [*self._chores, *([self._task] if self._task else [])]:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        if self._leased:  # so that writers stop notifying now, not when the lease ends
            with suppress(Exception):
                async with asyncio.timeout(2), self._driver.acquire() as connection:
                    for wallet_id in sorted(self._leased):
                        await connection.execute(_WATCH, wallet_id, self.id, None)
            self._leased.clear()

    # ------------------------------------------------------------ watches

    async def _watch(self, wallet_id: uuid.UUID) -> None:
        """Makes the database NOTIFY the wallet's changes. A writer that had the wallet locked
        has committed when this returns (so the first read shows its change); every later one
        sees the watch."""
        if wallet_id in self._leased:
            return
        async with self._lease_lock:
            if wallet_id in self._leased:
                return
            await self._lease([wallet_id])
            self._leased.add(wallet_id)

    async def _unwatch(self, wallet_id: uuid.UUID) -> None:
        async with self._lease_lock:
            if wallet_id in self._wallet_feeds or wallet_id not in self._leased:
                return
            # Before the watch ends: a subscriber arriving meanwhile watches the wallet again.
            self._leased.discard(wallet_id)
            async with self._driver.acquire() as connection:
                await connection.execute(_WATCH, wallet_id, self.id, None)

    async def _lease(self, wallet_ids: Iterable[uuid.UUID]) -> None:
        """One wallet at a time, each in a statement of its own: one wallet lock held at once
        (no deadlock with a writer that locks several)."""
        async with self._driver.acquire() as connection:
            for wallet_id in wallet_ids:
                await connection.execute(_WATCH, wallet_id, self.id, self._lease_seconds)

    async def _renew(self) -> None:
        """Every third of a lease: this process's watches go on."""
        now = asyncio.get_running_loop().time()
        if now - self._renewed_at < self._lease_seconds / 3:
            return
        async with self._lease_lock:
            await self._lease(sorted(self._leased))
        async with self._driver.acquire() as connection:
            await connection.execute(_FORGET_EXPIRED)
        self._renewed_at = now

    async def _states(self, wallet_ids: list[uuid.UUID]) -> dict[uuid.UUID, WalletChange]:
        """The wallets as a query shows them: what is past due is settled first."""
        async with self._driver.acquire() as connection:
            rows = await connection.fetch(_STATES, wallet_ids)
            due = [row["wallet_id"] for row in rows if row["due"]]
            for wallet_id in due:
                async with transaction(self._sessions) as session:
                    await ledger.settle(session, wallet_id)
            if due:
                rows = await connection.fetch(_STATES, wallet_ids)
        return {row["wallet_id"]: change for row in rows if (change := wallet_change({**row, "due": False}))}

    # ------------------------------------------------------------ listening

    async def _started(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="orgwallet-live")
        async with asyncio.timeout(START_TIMEOUT_SECONDS):
            await self._listening.wait()

    async def _listen(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while True:
            connects = self.counters.connects
            try:
                await self._listen_once()
                log.warning("live updates: the listening connection was lost")
            except Exception as error:
                log.warning("live updates: listening failed: %r", error)
            if self.counters.connects != connects:  # it was listening: back off from the start
                delay = RECONNECT_FIRST_SECONDS
            log.info("live updates: listening again in %.2f s", delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_SECONDS)

    async def _listen_once(self) -> None:
        connection = await asyncpg.connect(
            self._driver.dsn, server_settings={"application_name": "orgwallet-live"}
        )
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        try:
            await connection.add_listener(WALLET_CHANNEL, self._wallet_changed)
            await connection.add_listener(NOTIFICATION_CHANNEL, self._notification_added)
            if self.counters.connects:
                await self._resume()
            self.backend_pid = connection.get_server_pid()
            self.counters.connects += 1
            self._listening.set()
            self._heard_at = time.time()
            while not lost.is_set():
                with suppress(TimeoutError):
                    async with asyncio.timeout(self._check_seconds):
                        await lost.wait()
                if not lost.is_set():
                    checked = time.time()
                    await connection.execute("SELECT 1", timeout=self._check_seconds)
                    self._heard_at = checked
                    await self._renew()
        finally:
            self._listening.clear()
            connection.terminate()

    async def _resume(self) -> None:
        """After a reconnect: what changed while nobody listened was not heard. The watches are
        renewed (they may have lapsed), every wallet subscriber gets the current state, and each
        notification subscriber the notifications made meanwhile (searched from a margin before
        the hub was last known to listen; each is offered once)."""
        await self._recover_notifications()
        async with self._lease_lock:
            await self._lease(sorted(self._leased))
        states = await self._states(list(self._wallet_feeds))
        for wallet_id, feeds in self._wallet_feeds.items():
            if wallet_id in states:
                for feed in feeds:
                    feed.offer(states[wallet_id], again=True)
        self.counters.refreshes += 1

    async def _recover_notifications(self) -> None:
        organizations = list(self._notification_feeds)
        if not organizations:
            return
        since = id_floor(self._heard_at - RECOVERY_MARGIN_SECONDS)
        async with self._driver.acquire() as connection:
            rows = await connection.fetch(
                "SELECT id, organization_id FROM notifications WHERE organization_id = ANY($1::uuid[])"
                " AND id >= $2 ORDER BY id",
                organizations,
                since,
            )
        for row in rows:
            for feed in self._notification_feeds.get(row["organization_id"], ()):
                feed.offer(row["id"])
        self.counters.recovered += len(rows)

    def _wallet_changed(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.counters.notifies += 1
        try:
            record = orjson.loads(payload)
            feeds = self._wallet_feeds.get(uuid.UUID(record["wallet_id"]))
            if not feeds:
                return  # a wallet another process watches
            record["wallet_id"] = uuid.UUID(record["wallet_id"])
            record["wallet_organization_id"] = uuid.UUID(record["wallet_organization_id"])
            change = wallet_change({**record, "due": False})
        except (ValueError, KeyError, TypeError):
            log.exception("live updates: a %s payload that cannot be read: %.200s", WALLET_CHANNEL, payload)
            return
        if change is not None:
            for feed in feeds:
                feed.offer(change)

    def _notification_added(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.counters.notifies += 1
        try:
            record = orjson.loads(payload)
            feeds = self._notification_feeds.get(uuid.UUID(record["organization_id"]))
            notification_id = uuid.UUID(record["id"])
        except (ValueError, KeyError, TypeError):
            log.exception(
                "live updates: a %s payload that cannot be read: %.200s", NOTIFICATION_CHANNEL, payload
            )
            return
        for feed in feeds or ():
            feed.offer(notification_id)

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs ``work`` in the background, kept (not collected) until done; a failure is logged."""
        task = asyncio.create_task(work)
        self._chores.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._chores.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("live updates: %r", task.exception())

        task.add_done_callback(done)
