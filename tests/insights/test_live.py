"""Live updates (``Subscription.walletUpdated``, ``Subscription.notificationAdded``) over a real
WebSocket (graphql-transport-ws, the ``websockets`` client) and over multipart HTTP, against
the app served by uvicorn on a loopback port, with the NOTIFYs of a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from orgwallet import ledger
from orgwallet import live as live_module
from orgwallet.auth.tokens import mint_token
from orgwallet.config import Settings
from orgwallet.db.engine import transaction
from orgwallet.live import WALLET_CHANNEL
from orgwallet.runtime import Runtime
from orgwallet.services import notifications
from tests.helpers import (
    REMOVE_MEMBER,
    REVOKE_API_KEY,
    GraphQLClient,
    add_member,
    create_api_key,
    create_org,
    eventually,
)
from tests.jobs.conftest import drain
from tests.jobs.test_workers import ServedApp

RECHECK_SECONDS = 0.3  # the test's re-check period (the default is 5 s)
WAIT = 10.0  # the longest any message is waited for

GRANT = """mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "test"}) { __typename } }"""
CONSUME = """mutation($org: ID!, $amount: BigInt!, $key: String!, $metadata: JSON) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, metadata: $metadata}) {
    __typename ... on TokensConsumed { wallet { balance } } } }"""
ADD_ALERT = """mutation($org: ID!, $threshold: BigInt!) {
  addBalanceAlert(input: {organizationId: $org, threshold: $threshold}) { alert { id } } }"""
WALLET_UPDATED = (
    """subscription($org: ID!) { walletUpdated(organizationId: $org) { id balance reserved status } }"""
)
NOTIFICATION_ADDED = """subscription($org: ID!) {
  notificationAdded(organizationId: $org) { id kind title data } }"""


# ---------------------------------------------------------------- the served app and its clients


@dataclass
class Live:
    served: ServedApp
    client: GraphQLClient
    owner: str
    org: str

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.served.app.state.runtime
        return runtime

    @property
    def ws_url(self) -> str:
        return self.served.base_url.replace("http://", "ws://") + "/graphql"

    def bearer(self, subject: str) -> str:
        return self.client.token(subject)

    async def consume(self, amount: int, *, org: str | None = None, metadata: Any = None) -> int:
        variables = {"org": org or self.org, "amount": amount, "key": uuid.uuid4().hex, "metadata": metadata}
        result = (await self.client.data(CONSUME, variables, as_=self.owner))["consumeTokens"]
        assert result["__typename"] == "TokensConsumed", result
        return int(result["wallet"]["balance"])

    async def wallet_id(self, org: str | None = None) -> uuid.UUID:
        organization_id = uuid.UUID(_node_id(org or self.org))
        async with self.runtime.driver.acquire() as connection:
            wallet_id: uuid.UUID = await connection.fetchval(
                "SELECT id FROM wallets WHERE organization_id = $1", organization_id
            )
        return wallet_id


def _node_id(global_id: str) -> str:
    import base64

    return base64.b64decode(global_id).decode().partition(":")[2]


@pytest.fixture
def live_settings(settings: Settings) -> Settings:
    # No trial tokens: a new wallet holds what the test grants.
    return settings.model_copy(update={"live_recheck_seconds": RECHECK_SECONDS, "trial_tokens": 0})


@pytest.fixture
async def live(live_settings: Settings) -> AsyncIterator[Live]:
    async with ServedApp(live_settings) as served, httpx.AsyncClient(base_url=served.base_url) as http:
        client = GraphQLClient(http, served.settings)
        org = await create_org(client, "owner")
        await client.data(GRANT, {"org": org, "amount": 1000}, as_="root-admin")
        yield Live(served, client, "owner", org)


class Subscriber:
    """A graphql-transport-ws client on a real WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = iter(range(1, 1_000_000))

    async def subscribe(self, query: str, variables: dict[str, Any]) -> str:
        operation = str(next(self._ids))
        message = {"id": operation, "type": "subscribe", "payload": {"query": query, "variables": variables}}
        await self.ws.send(json.dumps(message))
        return operation

    async def message(self, within: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                raw = await self.ws.recv()
                assert isinstance(raw, str)  # a text frame: a browser's client parses text only
                received: dict[str, Any] = json.loads(raw)
                if received["type"] == "ping":
                    await self.ws.send(json.dumps({"type": "pong"}))
                    continue
                return received

    async def data(self, within: float = WAIT) -> dict[str, Any]:
        """The next ``next`` message's data (it must carry no errors)."""
        received = await self.message(within)
        assert received["type"] == "next" and not received["payload"].get("errors"), received
        data: dict[str, Any] = received["payload"]["data"]
        return data


@asynccontextmanager
async def subscriber(live: Live, credential: str | None, **options: Any) -> AsyncIterator[Subscriber]:
    """A connection acknowledged with ``credential`` in connection_init's payload; ``options``
    go to ``websockets.connect``."""
    options = {"subprotocols": ["graphql-transport-ws"], "max_size": 2**24, **options}
    async with connect(live.ws_url, **options) as ws:
        payload = {} if credential is None else {"Authorization": f"Bearer {credential}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        client = Subscriber(ws)
        ack = await client.message()
        assert ack["type"] == "connection_ack", ack
        yield client


async def refused_code(live: Live, credential: str | None) -> int:
    """The close code of a connection whose connection_init carries ``credential``."""
    async with connect(live.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        payload = {} if credential is None else {"Authorization": f"Bearer {credential}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def balance(data: dict[str, Any]) -> int:
    return int(data["walletUpdated"]["balance"])


# ---------------------------------------------------------------- walletUpdated


class TestWalletUpdated:
    async def test_the_wallet_at_once_then_one_message_per_committed_change(self, live: Live) -> None:
        async with subscriber(live, live.bearer("owner")) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            first = (await sub.data())["walletUpdated"]
            assert first == {
                "id": first["id"],
                "balance": 1000,
                "reserved": 0,
                "status": "ACTIVE",
            }
            expected = 1000
            for amount in (1, 2, 3, 50, 7):
                expected = await live.consume(amount)
                assert balance(await sub.data()) == expected

            # A change that rolls back is never heard of; the next committed one is.
            wallet_id = await live.wallet_id()
            with pytest.raises(RuntimeError):
                async with transaction(live.runtime.sessions) as session:
                    await ledger.consume(session, wallet_id, amount=500, key="rolled-back", actor="test")
                    raise RuntimeError("rolled back")
            expected = await live.consume(4)
            assert balance(await sub.data()) == expected == 1000 - 63 - 4

    async def test_a_change_in_flight_when_the_watch_begins_is_not_missed(self, live: Live) -> None:
        wallet_id = await live.wallet_id()
        async with subscriber(live, live.bearer("owner")) as sub:
            async with transaction(live.runtime.sessions) as session:
                # Written (its trigger has run, the wallet unwatched) but not committed yet.
                await ledger.consume(session, wallet_id, amount=5, key="in-flight", actor="test")
                await sub.subscribe(WALLET_UPDATED, {"org": live.org})
                await eventually(lambda: _watch_waiting(live), what="the watch waiting for the wallet")
            assert balance(await sub.data()) == 995  # the first state read follows that commit
            expected = await live.consume(1)
            assert balance(await sub.data()) == expected == 994

    async def test_a_slow_subscriber_gets_the_latest_state_from_a_bounded_buffer(self, live: Live) -> None:
        # Big messages (50 entries of ~7 KB of metadata each, not compressed), and a client that
        # reads nothing: its socket fills, and the server's send waits for it.
        async with transaction(live.runtime.sessions) as session:
            wallet_id = await live.wallet_id()
            for n in range(50):
                metadata = {"blob": secrets.token_hex(3500), "n": n}
                await ledger.consume(
                    session, wallet_id, amount=1, key=f"seed-{n}", actor="test", metadata=metadata
                )
        heavy = """subscription($org: ID!) { walletUpdated(organizationId: $org) {
          balance ledger(first: 50) { edges { node { metadata } } } } }"""
        small_buffer = socket.socket()
        small_buffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
        small_buffer.connect(("127.0.0.1", int(live.served.base_url.rsplit(":", 1)[1])))
        async with (
            subscriber(live, live.bearer("owner")) as fast,
            subscriber(live, live.bearer("owner"), sock=small_buffer, max_queue=1, compression=None) as slow,
        ):
            await fast.subscribe(WALLET_UPDATED, {"org": live.org})
            await slow.subscribe(heavy, {"org": live.org})
            assert balance(await fast.data()) == 950
            feeds = await eventually(lambda: _feeds(live, wallet_id, 2), what="two subscribers")

            seen = [950]
            for _ in range(30):
                seen.append(await live.consume(1))
                assert balance(await fast.data()) == seen[-1]  # the fast one gets every update

            slow_feed = next(feed for feed in feeds if feed.delivered < 31)
            assert slow_feed.pending <= 1  # the server keeps one state for it, whatever it misses
            assert slow_feed.coalesced > 0 and live.runtime.live.counters.coalesced == slow_feed.coalesced

            received: list[int] = []
            while not received or received[-1] != seen[-1]:
                received.append(balance(await slow.data()))
            assert received == sorted(received, reverse=True)  # never an older state after a newer one
            assert set(received) <= set(seen) and len(received) < len(seen)  # states were skipped

    async def test_a_long_subscription_keeps_nothing_per_event(self, live: Live) -> None:
        """The server's objects do not grow with the events a subscription has delivered
        (graphql-core kept every event's collected fields for the subscription's life)."""
        wallet_id = await live.wallet_id()

        async def events(count: int, subscribers: list[Subscriber]) -> None:
            for _ in range(count):
                async with transaction(live.runtime.sessions) as session:
                    await ledger.consume(session, wallet_id, amount=1, key=uuid.uuid4().hex, actor="test")
                for sub in subscribers:
                    await sub.data()

        async with subscriber(live, live.bearer("owner")) as a, subscriber(live, live.bearer("owner")) as b:
            for sub in (a, b):
                await sub.subscribe(WALLET_UPDATED, {"org": live.org})
                await sub.data()
            await events(20, [a, b])  # warm: whatever is built once is built
            before = _field_details()
            await events(100, [a, b])
            assert _field_details() - before < 20  # was 5 per event and subscriber: 1,000

    async def test_suspension_and_reactivation_are_changes_too(self, live: Live) -> None:
        suspend = """mutation($org: ID!) { suspendWallet(input: {organizationId: $org, reason: "r"}) {
          __typename } }"""
        reactivate = suspend.replace("suspendWallet", "reactivateWallet")
        async with subscriber(live, live.bearer("owner")) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            assert (await sub.data())["walletUpdated"]["status"] == "ACTIVE"
            await live.client.data(suspend, {"org": live.org}, as_="root-admin")
            assert (await sub.data())["walletUpdated"]["status"] == "SUSPENDED"
            await live.client.data(reactivate, {"org": live.org}, as_="root-admin")
            assert (await sub.data())["walletUpdated"]["status"] == "ACTIVE"


def _field_details() -> int:
    """graphql-core's records of collected fields alive in this process (the server's)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "FieldDetails")


async def _watch_waiting(live: Live) -> bool:
    async with live.runtime.driver.acquire() as connection:
        waiting = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%live_watch%'"
        )
    return bool(waiting)


async def _feeds(live: Live, wallet_id: uuid.UUID, count: int) -> list[Any] | None:
    feeds = live.runtime.live.wallet_feeds(wallet_id)
    return feeds if len(feeds) == count else None


# ---------------------------------------------------------------- notificationAdded


class TestNotificationAdded:
    async def test_each_new_notification_is_sent(self, live: Live) -> None:
        await live.client.data(ADD_ALERT, {"org": live.org, "threshold": 500}, as_=live.owner)
        async with subscriber(live, live.bearer("owner")) as sub:
            await sub.subscribe(NOTIFICATION_ADDED, {"org": live.org})
            await eventually(lambda: _subscribed(live, 1), what="the subscription")
            await live.consume(600)  # 400: below the alert's 500
            await drain(live.runtime)
            low = (await sub.data())["notificationAdded"]
            assert low["kind"] == "LOW_BALANCE" and low["data"]["threshold"] == 500

            await live.consume(400)  # 0: the built-in "depleted" alert
            await drain(live.runtime)
            depleted = (await sub.data())["notificationAdded"]
            assert depleted["kind"] == "BALANCE_DEPLETED" and depleted["id"] != low["id"]


async def _subscribed(live: Live, count: int) -> bool:
    return live.runtime.live.subscribers == count


# ---------------------------------------------------------------- who may subscribe


class TestAuthentication:
    async def test_no_credentials_or_a_forged_token_is_refused(self, live: Live) -> None:
        assert await refused_code(live, None) == 4403
        forged = mint_token(Settings(jwt_secret="another-secret-" + "y" * 40), subject="owner")
        assert await refused_code(live, forged) == 4403
        assert await refused_code(live, "owk_not_a_key") == 4403

    async def test_another_organizations_wallet_is_not_found(self, live: Live) -> None:
        other = await create_org(live.client, "stranger", name="Other")
        async with subscriber(live, live.bearer("stranger")) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            error = await sub.message()
            assert error["type"] == "next", error
            assert error["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
            assert (await sub.message())["type"] == "complete"
            # The same connection still subscribes to its own organization.
            await sub.subscribe(WALLET_UPDATED, {"org": other})
            assert balance(await sub.data()) == 0

    async def test_a_viewer_may_subscribe_a_key_without_tokens_view_may_not(self, live: Live) -> None:
        await add_member(live.client, live.org, subject="viewer", role="VIEWER", as_=live.owner)
        async with subscriber(live, live.bearer("viewer")) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            assert balance(await sub.data()) == 1000

        _, consume_only = await create_api_key(
            live.client, live.org, scopes=["tokens.consume"], as_=live.owner
        )
        async with subscriber(live, consume_only) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            error = await sub.message()
            assert error["payload"]["errors"][0]["extensions"]["code"] == "FORBIDDEN", error

        _, viewing = await create_api_key(live.client, live.org, scopes=["tokens.view"], as_=live.owner)
        async with subscriber(live, viewing) as sub:
            await sub.subscribe(NOTIFICATION_ADDED, {"org": live.org})
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            assert balance(await sub.data()) == 1000


class TestAccessEnds:
    async def test_a_removed_member_stops_receiving_within_the_recheck_period(self, live: Live) -> None:
        await add_member(live.client, live.org, subject="member", role="MEMBER", as_=live.owner)
        wallet_id = await live.wallet_id()
        async with subscriber(live, live.bearer("member")) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            assert balance(await sub.data()) == 1000
            removed = await live.client.data(
                REMOVE_MEMBER, {"org": live.org, "subject": "member"}, as_=live.owner
            )
            assert removed["removeMember"]["__typename"] == "MembershipChanged"
            started = time.monotonic()  # no change at all: the re-check's timer alone ends it
            error = await sub.message()
            assert (
                error["type"] == "next" and error["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
            )
            assert time.monotonic() - started < RECHECK_SECONDS + 1
            assert (await sub.message())["type"] == "complete"
            await eventually(lambda: _subscribed(live, 0), what="the subscription gone")
            await live.consume(1)  # nobody hears of it: the wallet is not even watched any more
            await eventually(lambda: _watches(live, wallet_id, 0), what="the watch removed")

    async def test_a_revoked_key_stops_receiving_within_the_recheck_period(self, live: Live) -> None:
        key_id, secret = await create_api_key(live.client, live.org, scopes=["tokens.view"], as_=live.owner)
        async with subscriber(live, secret) as sub:
            await sub.subscribe(WALLET_UPDATED, {"org": live.org})
            assert balance(await sub.data()) == 1000
            revoked = await live.client.data(REVOKE_API_KEY, {"key": key_id}, as_=live.owner)
            assert revoked["revokeApiKey"]["__typename"] == "ApiKeyRevoked"
            started = time.monotonic()
            error = await sub.message()
            assert error["payload"]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", error
            assert time.monotonic() - started < RECHECK_SECONDS + 1
            assert (await sub.message())["type"] == "complete"
            await eventually(lambda: _subscribed(live, 0), what="the subscription gone")


# ---------------------------------------------------------------- the listening connection


class TestReconnect:
    async def test_a_killed_listening_connection_is_replaced_and_subscribers_get_the_state_again(
        self, live: Live
    ) -> None:
        other = await create_org(live.client, "owner", name="Second")
        await live.client.data(GRANT, {"org": other, "amount": 70}, as_="root-admin")
        hub = live.runtime.live
        async with subscriber(live, live.bearer("owner")) as a, subscriber(live, live.bearer("owner")) as b:
            await a.subscribe(WALLET_UPDATED, {"org": live.org})
            await b.subscribe(WALLET_UPDATED, {"org": other})
            assert balance(await a.data()) == 1000
            assert balance(await b.data()) == 70
            killed = hub.backend_pid
            connection = await asyncpg.connect(live.runtime.driver.dsn)
            try:
                assert await connection.fetchval("SELECT pg_terminate_backend($1)", killed)
            finally:
                await connection.close()

            # Each subscriber hears the current state again once the hub listens again.
            assert balance(await a.data()) == 1000
            assert balance(await b.data()) == 70
            assert hub.counters.connects == 2 and hub.counters.refreshes == 1
            assert hub.backend_pid != killed
            # And changes flow again.
            await live.consume(10)
            assert balance(await a.data()) == 990

    async def test_a_notification_made_while_nobody_listened_is_sent_after_the_reconnect(
        self, live: Live, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        hub = live.runtime.live
        # The hub waits a whole second before it listens again: the notification below is
        # committed while no connection listens, so its NOTIFY is lost for good.
        monkeypatch.setattr(live_module, "RECONNECT_FIRST_SECONDS", 1.0)
        async with subscriber(live, live.bearer("owner")) as sub:
            await sub.subscribe(NOTIFICATION_ADDED, {"org": live.org})
            await eventually(lambda: _subscribed(live, 1), what="the subscription")
            killed = hub.backend_pid
            connection = await asyncpg.connect(live.runtime.driver.dsn)
            try:
                assert await connection.fetchval("SELECT pg_terminate_backend($1)", killed)
            finally:
                await connection.close()
            await eventually(lambda: _not_listening(live), what="the hub to notice")
            organization_id = uuid.UUID(_node_id(live.org))
            async with transaction(live.runtime.sessions) as session:
                await notifications.notify(
                    session,
                    organization_id,
                    notifications.NotificationKind.LOW_BALANCE,
                    key="made-while-deaf",
                    title="Low balance",
                    body="made while nobody listened",
                    data={"threshold": 1},
                )
            assert not hub._listening.is_set()  # committed before the hub listened again

            sent = (await sub.data())["notificationAdded"]
            assert (sent["kind"], sent["title"]) == ("LOW_BALANCE", "Low balance")
            assert hub.counters.connects == 2 and hub.counters.recovered >= 1
            # Once only, and later ones still flow.
            async with transaction(live.runtime.sessions) as session:
                await notifications.notify(
                    session,
                    organization_id,
                    notifications.NotificationKind.LOW_BALANCE,
                    key="made-after",
                    title="Later",
                    body="made while listening",
                )
            assert (await sub.data())["notificationAdded"]["title"] == "Later"


async def _not_listening(live: Live) -> bool:
    return not live.runtime.live._listening.is_set()


class TestHotPath:
    async def test_no_notify_for_a_wallet_nobody_watches(self, live: Live) -> None:
        unwatched = await create_org(live.client, "owner", name="Unwatched")
        await live.client.data(GRANT, {"org": unwatched, "amount": 100}, as_="root-admin")
        unwatched_wallet, watched_wallet = await live.wallet_id(unwatched), await live.wallet_id()
        heard: list[dict[str, Any]] = []
        listener = await asyncpg.connect(live.runtime.driver.dsn)
        await listener.add_listener(WALLET_CHANNEL, lambda *args: heard.append(json.loads(args[3])))
        try:
            async with subscriber(live, live.bearer("owner")) as sub:
                await sub.subscribe(WALLET_UPDATED, {"org": live.org})
                assert balance(await sub.data()) == 1000
                # The watch of another process whose lease has run out (it died) notifies nothing.
                async with live.runtime.driver.acquire() as connection:
                    await connection.execute(
                        "SELECT live_watch($1, $2, now() - interval '1 second')",
                        unwatched_wallet,
                        uuid.uuid4(),
                    )
                await live.consume(5, org=unwatched)
                await live.consume(3)
                assert balance(await sub.data()) == 997
                await eventually(lambda: _heard(heard, watched_wallet), what="the watched wallet's NOTIFY")
                # NOTIFYs arrive in commit order: the unwatched consumption's would be first.
                assert [h["wallet_id"] for h in heard] == [str(watched_wallet)]
                assert heard[0]["balance"] == 997 and heard[0]["entry_seq"] > 0

            # The last subscriber gone, the watch goes, and so do the NOTIFYs.
            await eventually(lambda: _watches(live, watched_wallet, 0), what="the watch removed")
            await live.consume(2)
            await live.consume(1, org=unwatched)
            await _sync(listener)
            assert len(heard) == 1
        finally:
            await listener.close()


async def _heard(heard: list[dict[str, Any]], wallet_id: uuid.UUID) -> bool:
    return any(h["wallet_id"] == str(wallet_id) for h in heard)


async def _watches(live: Live, wallet_id: uuid.UUID, count: int) -> bool:
    """Whether ``count`` processes watch the wallet (and, for none, its row says so too)."""
    async with live.runtime.driver.acquire() as connection:
        found = await connection.fetchrow(
            """SELECT (SELECT count(*) FROM live_wallets WHERE wallet_id = $1) AS watches,
                      (SELECT live_until FROM wallets WHERE id = $1) AS live_until""",
            wallet_id,
        )
    return bool(found["watches"] == count and (count or found["live_until"] is None))


async def _sync(listener: asyncpg.Connection) -> None:
    """A NOTIFY of the test's own, heard back: every NOTIFY committed before it was heard first."""
    marker = asyncio.get_running_loop().create_future()
    await listener.add_listener("live_test_marker", lambda *args: marker.set_result(None))
    await listener.execute("NOTIFY live_test_marker")
    async with asyncio.timeout(WAIT):
        await marker


# ---------------------------------------------------------------- multipart HTTP


class TestMultipart:
    async def test_a_subscription_over_a_multipart_http_response(self, live: Live) -> None:
        headers = {
            "Accept": "multipart/mixed;subscriptionSpec=1.0",
            "Authorization": f"Bearer {live.bearer('owner')}",
        }
        body = {"query": WALLET_UPDATED, "variables": {"org": live.org}}
        async with (
            httpx.AsyncClient(base_url=live.served.base_url, timeout=WAIT) as http,
            http.stream("POST", "/graphql", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("multipart/mixed")
            parts = _parts(response)
            assert balance(await anext(parts)) == 1000
            expected = await live.consume(25)
            assert balance(await anext(parts)) == expected == 975
        # The client gone, the server lets the subscription go.
        await eventually(lambda: _subscribed(live, 0), what="the subscription released")


async def _parts(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The payloads of a multipart subscription response (heartbeats, ``{}``, skipped)."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\r\n--graphql" in buffer:
            part, _, buffer = buffer.partition("\r\n--graphql")
            _head, _, content = part.partition("\r\n\r\n")
            if not content.strip():
                continue
            value = json.loads(content)
            if "payload" in value:
                assert not value["payload"].get("errors"), value
                yield value["payload"]["data"]
