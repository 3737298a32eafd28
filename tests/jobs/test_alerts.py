"""Low-balance alerts, notifications and e-mail, driven through GraphQL, with the jobs run by
PgQueuer in this process and mail going to a real SMTP server on loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from orgwallet.clock import ManualClock
from orgwallet.jobs import duties
from orgwallet.runtime import Runtime
from orgwallet.services import mail
from tests.helpers import GraphQLClient, add_member, create_api_key, create_org, error_code
from tests.jobs.conftest import SmtpServer, clock_of, drain, rows

GRANT = """mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "test"}) { __typename } }"""
CONSUME = """mutation($org: ID!, $amount: BigInt!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename ... on TokensConsumed { wallet { balance } } } }"""
ADD_ALERT = """mutation($org: ID!, $threshold: BigInt!) {
  addBalanceAlert(input: {organizationId: $org, threshold: $threshold}) {
    alert { id threshold armed lastFiredAt } } }"""
REMOVE_ALERT = """mutation($id: ID!) { removeBalanceAlert(input: {alertId: $id}) { alertId } }"""
ALERTS = """query($org: ID!) { organization(id: $org) { balanceAlerts { id threshold armed } } }"""
NOTIFICATIONS = """query($org: ID!, $first: Int, $after: String, $unread: Boolean) {
  organization(id: $org) {
    notifications(first: $first, after: $after, unreadOnly: $unread) {
      unreadCount pageInfo { hasNextPage endCursor }
      edges { cursor node { id kind title body data createdAt readAt } } } } }"""
MARK_READ = """mutation($org: ID!, $ids: [ID!]) {
  markNotificationsRead(input: {organizationId: $org, notificationIds: $ids}) { count unreadCount } }"""
NODE = """query($id: ID!) { node(id: $id) { __typename id } }"""
OPT_OUT = """mutation($org: ID!, $enabled: Boolean!) {
  setEmailNotifications(input: {organizationId: $org, enabled: $enabled}) { enabled } }"""


class Shop:
    """An organization whose owner has an address, and an API key that spends."""

    def __init__(self, client: GraphQLClient, runtime: Runtime, org: str, key: str) -> None:
        self.client, self.runtime, self.org, self.key = client, runtime, org, key

    @classmethod
    async def open(cls, client: GraphQLClient, runtime: Runtime, owner: str = "owner") -> Shop:
        token = client.token(owner, email=f"{owner}@example.com")
        data = await client.data(
            """mutation { createOrganization(input: {name: "Acme"}) {
                 ... on OrganizationCreated { organization { id } } } }""",
            bearer=token,
        )
        org = data["createOrganization"]["organization"]["id"]
        _, key = await create_api_key(client, org, scopes=["tokens.consume"], as_=owner)
        return cls(client, runtime, org, key)

    async def grant(self, amount: int) -> None:
        await self.client.data(GRANT, {"org": self.org, "amount": amount}, as_="root-admin")

    async def consume(self, amount: int, key: str) -> dict[str, Any]:
        body = await self.client.raw(
            CONSUME, {"org": self.org, "amount": amount, "key": key}, bearer=self.key
        )
        result: dict[str, Any] = body["data"]["consumeTokens"]
        return result

    async def alert(self, threshold: int, as_: str = "owner") -> dict[str, Any]:
        data = await self.client.data(ADD_ALERT, {"org": self.org, "threshold": threshold}, as_=as_)
        alert: dict[str, Any] = data["addBalanceAlert"]["alert"]
        return alert

    async def notifications(self, **variables: Any) -> dict[str, Any]:
        data = await self.client.data(NOTIFICATIONS, {"org": self.org, **variables}, as_="owner")
        connection: dict[str, Any] = data["organization"]["notifications"]
        return connection

    async def kinds(self) -> list[tuple[str, Any]]:
        edges = (await self.notifications(first=100))["edges"]
        return [(e["node"]["kind"], (e["node"]["data"] or {}).get("threshold")) for e in reversed(edges)]

    async def signal_jobs(self) -> int:
        found = await rows(self.runtime, "SELECT count(*) FROM pgqueuer WHERE entrypoint = 'wallet.signal'")
        return int(found[0][0])


@pytest.fixture
async def shop(client: GraphQLClient, runtime: Runtime) -> Shop:
    return await Shop.open(client, runtime)


class TestBalanceAlerts:
    async def test_a_hundred_concurrent_consumptions_crossing_two_thresholds_notify_once_each(
        self, shop: Shop
    ) -> None:
        await shop.grant(117)  # 120 with the trial's 3
        await shop.alert(100)
        await shop.alert(50)
        await drain(shop.runtime)  # the alerts are evaluated at once: the balance is above both
        assert await shop.kinds() == []
        answers = await asyncio.gather(*(shop.consume(1, f"c{i}") for i in range(100)))
        assert all(a["__typename"] == "TokensConsumed" for a in answers)
        assert await shop.signal_jobs() == 1  # one signal for the whole burst
        await drain(shop.runtime)
        await drain(shop.runtime)  # a second delivery of nothing changes nothing
        assert sorted(await shop.kinds()) == [("LOW_BALANCE", 50), ("LOW_BALANCE", 100)]
        alerts = (await shop.client.data(ALERTS, {"org": shop.org}, as_="owner"))["organization"]
        assert [(a["threshold"], a["armed"]) for a in alerts["balanceAlerts"]] == [(100, False), (50, False)]

    async def test_a_hovering_balance_notifies_once_per_real_crossing(self, shop: Shop) -> None:
        await shop.grant(97)  # 100
        await shop.alert(50)
        await drain(shop.runtime)
        await shop.consume(51, "down")  # 49: crosses
        await drain(shop.runtime)
        for i in range(5):  # hovers below: 48, 49, 48, ... without a signal
            await shop.consume(1, f"hover-{i}")
            await shop.grant(1)
        assert await shop.signal_jobs() == 0
        await drain(shop.runtime)
        assert await shop.kinds() == [("LOW_BALANCE", 50)]
        await shop.grant(1)  # 50: back at the threshold re-arms it
        await drain(shop.runtime)
        await shop.consume(1, "again")  # 49: a real crossing, notified again
        await drain(shop.runtime)
        assert await shop.kinds() == [("LOW_BALANCE", 50), ("LOW_BALANCE", 50)]

    async def test_a_dip_refilled_before_the_job_ran_still_notifies_once(self, shop: Shop) -> None:
        await shop.grant(97)
        await shop.alert(50)
        await drain(shop.runtime)
        await shop.consume(60, "dip")  # 40
        await shop.grant(60)  # 100, before any worker ran
        await drain(shop.runtime)
        assert await shop.kinds() == [("LOW_BALANCE", 50)]
        alerts = (await shop.client.data(ALERTS, {"org": shop.org}, as_="owner"))["organization"]
        assert alerts["balanceAlerts"][0]["armed"] is True  # and re-armed, the balance being back

    async def test_an_alert_above_the_balance_fires_at_once_and_depletion_is_told(self, shop: Shop) -> None:
        await shop.alert(10)  # the balance is the trial's 3
        await drain(shop.runtime)
        await shop.consume(3, "all")
        await drain(shop.runtime)
        assert await shop.kinds() == [("LOW_BALANCE", 10), ("BALANCE_DEPLETED", 1)]

    async def test_a_rolled_back_consumption_leaves_no_signal(self, shop: Shop, app: FastAPI) -> None:
        from orgwallet import ledger
        from orgwallet.db.engine import transaction

        await shop.alert(2)
        await drain(shop.runtime)
        wallet = (await rows(shop.runtime, "SELECT id FROM wallets"))[0][0]
        with pytest.raises(RuntimeError):
            async with transaction(shop.runtime.sessions) as session:
                await ledger.consume(session, wallet, amount=3, key="undone", actor="test")
                assert await shop.signal_jobs() == 0  # not visible outside the transaction
                raise RuntimeError("rolled back")
        assert await shop.signal_jobs() == 0

    async def test_removing_an_alert_stops_it(self, shop: Shop) -> None:
        await shop.grant(97)
        alert = await shop.alert(50)
        await shop.client.data(REMOVE_ALERT, {"id": alert["id"]}, as_="owner")
        await drain(shop.runtime)
        await shop.consume(60, "down")
        await drain(shop.runtime)
        assert await shop.kinds() == []


class TestAlertPermissionsAndInput:
    async def test_who_may_add_an_alert(self, client: GraphQLClient, shop: Shop) -> None:
        for subject, role in (("b", "BILLING"), ("m", "MEMBER"), ("v", "VIEWER"), ("a", "ADMIN")):
            await add_member(client, shop.org, subject=subject, role=role, as_="owner")
        codes = {}
        for subject, threshold in (("b", 10), ("m", 11), ("v", 12), ("a", 13), ("stranger", 14)):
            body = await client.raw(ADD_ALERT, {"org": shop.org, "threshold": threshold}, as_=subject)
            codes[subject] = error_code(body, "addBalanceAlert")
        assert codes == {"b": None, "m": "FORBIDDEN", "v": "FORBIDDEN", "a": None, "stranger": "NOT_FOUND"}
        body = await client.raw(ADD_ALERT, {"org": shop.org, "threshold": 10}, bearer=shop.key)
        assert error_code(body, "addBalanceAlert") == "FORBIDDEN"

    @pytest.mark.parametrize("threshold", [0, -5, 2**53, 1.5, "100"])
    async def test_a_bad_threshold_is_refused_and_writes_nothing(
        self, client: GraphQLClient, shop: Shop, threshold: object
    ) -> None:
        body = await client.raw(ADD_ALERT, {"org": shop.org, "threshold": threshold}, as_="owner")
        assert body["errors"][0]["extensions"] == {"code": "BAD_USER_INPUT", "field": "threshold"}
        assert await rows(shop.runtime, "SELECT id FROM balance_alerts WHERE kind = 'low'") == []

    async def test_the_same_threshold_twice_is_refused(self, client: GraphQLClient, shop: Shop) -> None:
        await shop.alert(10)
        body = await client.raw(ADD_ALERT, {"org": shop.org, "threshold": 10}, as_="owner")
        assert error_code(body, "addBalanceAlert") == "BAD_USER_INPUT"


class TestNotifications:
    async def test_pages_newest_first_with_unread_count_and_mark_read(self, shop: Shop) -> None:
        for threshold in (10, 20, 30):
            await shop.alert(threshold)
        await drain(shop.runtime)  # three LOW_BALANCE (the balance is 3)
        first = await shop.notifications(first=2)
        assert first["unreadCount"] == 3 and first["pageInfo"]["hasNextPage"]
        second = await shop.notifications(first=2, after=first["pageInfo"]["endCursor"])
        thresholds = [e["node"]["data"]["threshold"] for e in first["edges"] + second["edges"]]
        assert sorted(thresholds) == [10, 20, 30] and not second["pageInfo"]["hasNextPage"]
        newest = first["edges"][0]["node"]["id"]
        marked = await shop.client.data(MARK_READ, {"org": shop.org, "ids": [newest]}, as_="owner")
        assert marked["markNotificationsRead"] == {"count": 1, "unreadCount": 2}
        assert len((await shop.notifications(unread=True))["edges"]) == 2
        marked = await shop.client.data(MARK_READ, {"org": shop.org}, as_="owner")
        assert marked["markNotificationsRead"] == {"count": 2, "unreadCount": 0}

    async def test_another_organizations_notifications_are_invisible(
        self, client: GraphQLClient, runtime: Runtime, shop: Shop
    ) -> None:
        await shop.alert(10)
        await drain(runtime)
        notification = (await shop.notifications())["edges"][0]["node"]["id"]
        other = await create_org(client, "mallory", name="Other")
        assert (await client.data(NODE, {"id": notification}, as_="mallory"))["node"] is None
        body = await client.raw(NOTIFICATIONS, {"org": shop.org}, as_="mallory")
        assert body["data"]["organization"] is None
        marked = await client.data(MARK_READ, {"org": other, "ids": [notification]}, as_="mallory")
        assert marked["markNotificationsRead"]["count"] == 0
        body = await client.raw(MARK_READ, {"org": shop.org, "ids": [notification]}, as_="mallory")
        assert error_code(body, "markNotificationsRead") == "NOT_FOUND"
        assert (await shop.notifications())["unreadCount"] == 1
        assert (await client.data(NODE, {"id": notification}, as_="owner"))["node"]["id"] == notification


class TestEmail:
    async def test_mailed_to_billing_roles_with_an_address_unless_opted_out(
        self, mail_app: FastAPI, smtp: SmtpServer
    ) -> None:
        transport = httpx.ASGITransport(app=mail_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = GraphQLClient(http, mail_app.state.runtime.settings)
            runtime: Runtime = mail_app.state.runtime
            shop = await Shop.open(client, runtime)
            for subject, role in (
                ("bill", "BILLING"),
                ("adm", "ADMIN"),
                ("mem", "MEMBER"),
                ("view", "VIEWER"),
            ):
                await add_member(
                    client, shop.org, subject=subject, role=role, as_="owner", email=f"{subject}@x.io"
                )
            await add_member(client, shop.org, subject="noaddr", role="ADMIN", as_="owner")
            await client.data(OPT_OUT, {"org": shop.org, "enabled": False}, as_="adm")
            await shop.alert(10)
            await drain(runtime)
        assert sorted(m["To"] for m in smtp.mailbox.messages) == ["bill@x.io", "owner@example.com"]
        message = smtp.mailbox.to("bill@x.io")[0]
        assert message["Subject"] == "[Acme] Balance below 10 tokens"
        assert "below the alert set at 10 tokens" in message.get_content()
        assert await rows(runtime, "SELECT status, transport FROM emails") == [("sent", "smtp")] * 2

    async def test_a_mail_server_that_is_down_loses_nothing(
        self, mail_app: FastAPI, smtp: SmtpServer
    ) -> None:
        runtime: Runtime = mail_app.state.runtime
        runtime.clock = ManualClock(datetime.now(UTC))
        transport = httpx.ASGITransport(app=mail_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            shop = await Shop.open(GraphQLClient(http, runtime.settings), runtime)
            smtp.stop()
            await shop.alert(10)
            await drain(runtime)
        [(status, attempts, error)] = await rows(runtime, "SELECT status, attempts, last_error FROM emails")
        assert (status, attempts) == ("pending", 1)
        assert "Connect" in error
        await duties.tick(runtime)
        await drain(runtime)  # the retry is not due yet: nothing is tried
        assert await rows(runtime, "SELECT status, attempts FROM emails") == [("pending", 1)]
        smtp.start()  # the server is back
        clock_of(runtime).advance(mail.retry_delay(1) + timedelta(seconds=1))
        await duties.tick(runtime)
        await drain(runtime)
        assert [m["To"] for m in smtp.mailbox.messages] == ["owner@example.com"]
        assert await rows(runtime, "SELECT status, attempts FROM emails") == [("sent", 2)]

    async def test_the_outbox_page_shows_what_would_have_been_sent(
        self, client: GraphQLClient, runtime: Runtime, app: FastAPI
    ) -> None:
        shop = await Shop.open(client, runtime)
        await shop.alert(10)
        await drain(runtime)
        assert await rows(runtime, "SELECT status, transport FROM emails") == [("sent", "outbox")]
        page = await client.http.get("/_mail")
        assert page.status_code == 200
        assert "[Acme] Balance below 10 tokens" in page.text and "owner@example.com" in page.text

    async def test_no_outbox_page_when_a_mail_server_is_configured(self, mail_app: FastAPI) -> None:
        transport = httpx.ASGITransport(app=mail_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/_mail")).status_code == 404


class TestWalletStatusNotifications:
    async def test_suspension_and_reactivation_are_told_once_each(self, shop: Shop) -> None:
        mutation = """mutation($org: ID!) { %s(input: {organizationId: $org, reason: "chargebacks"}) {
            __typename } }"""
        for name in ("suspendWallet", "suspendWallet", "reactivateWallet"):  # the second changes nothing
            await shop.client.data(mutation % name, {"org": shop.org}, as_="root-admin")
        assert [kind for kind, _ in await shop.kinds()] == ["WALLET_SUSPENDED", "WALLET_REACTIVATED"]
        body = (await shop.notifications())["edges"][-1]["node"]["body"]
        assert "chargebacks" in body
