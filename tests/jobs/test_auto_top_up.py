"""Automatic top-ups end to end in one process: the policy through GraphQL, the signal and the
duty asking for top-ups, PgQueuer running the jobs, the offline Stripe (its test cards for
off-session payments) reached through the real SDK, and its webhooks crediting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI

from orgwallet.clock import ManualClock
from orgwallet.jobs import duties
from orgwallet.runtime import Runtime
from orgwallet.services import autotopup
from tests.helpers import add_member, error_code
from tests.jobs.conftest import drain, rows
from tests.payments.test_purchases import save_card
from tests.purchasing import SAVES_BUT_DECLINES, Shop
from tests.webhooks.test_stripe_webhook import deliver

NEEDS_AUTHENTICATION = "4000 0027 6000 3184"

SET = """mutation($input: SetAutoTopUpInput!) { setAutoTopUp(input: $input) { policy {
  enabled threshold method tokens targetBalance monthlySpendCapMinor spentThisMonthMinor currency
  consecutiveFailures nextRetryAt disabledReason schedule { interval dayOfWeek dayOfMonth hourUtc nextRunAt }
  package { name } inFlight { reference status actionUrl } lastTopUp { reference status } } } }"""
DISABLE = """mutation($org: ID!) { disableAutoTopUp(input: {organizationId: $org}) { policy { enabled } } }"""
POLICY = """query($org: ID!) { organization(id: $org) { autoTopUp {
  enabled consecutiveFailures nextRetryAt disabledReason spentThisMonthMinor
  inFlight { reference status actionUrl } lastTopUp { reference status tokens } } } }"""
NOTIFIED = """query($org: ID!) { organization(id: $org) { notifications(first: 100) {
  edges { node { kind data } } } } }"""
GRANT = """mutation($org: ID!, $amount: BigInt!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "test"}) { __typename } }"""


class TopUps:
    def __init__(self, shop: Shop, runtime: Runtime) -> None:
        self.shop, self.runtime = shop, runtime

    @property
    def clock(self) -> ManualClock:
        assert isinstance(self.runtime.clock, ManualClock)
        return self.runtime.clock

    async def set(self, **fields: Any) -> dict[str, Any]:
        data = await self.shop.client.data(
            SET, {"input": {"organizationId": self.shop.org, "enabled": True} | fields}, as_=self.shop.owner
        )
        policy: dict[str, Any] = data["setAutoTopUp"]["policy"]
        return policy

    async def policy(self) -> dict[str, Any]:
        data = await self.shop.client.data(POLICY, {"org": self.shop.org}, as_=self.shop.owner)
        policy: dict[str, Any] = data["organization"]["autoTopUp"]
        return policy

    async def settle(self) -> None:
        """Jobs and webhooks, until both are quiet."""
        for _ in range(4):
            await drain(self.runtime)
            await self.shop.drain()

    async def consume(self, amount: int, key: str) -> None:
        await self.shop.spend(amount) if key == "" else await self._consume(amount, key)

    async def _consume(self, amount: int, key: str) -> None:
        query = """mutation($org: ID!, $amount: BigInt!, $key: String!) {
          consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
            __typename } }"""
        variables = {"org": self.shop.org, "amount": amount, "key": key}
        result = (await self.shop.client.data(query, variables, as_=self.shop.owner))["consumeTokens"]
        assert result["__typename"] == "TokensConsumed", result

    async def top_ups(self) -> list[tuple[str, int, int]]:
        found = await rows(
            self.runtime,
            "SELECT status, tokens, amount_minor FROM purchases WHERE method = 'auto_top_up' ORDER BY id",
        )
        return [tuple(r) for r in found]  # type: ignore[misc]

    async def kinds(self) -> list[str]:
        data = await self.shop.client.data(NOTIFIED, {"org": self.shop.org}, as_=self.shop.owner)
        return [e["node"]["kind"] for e in reversed(data["organization"]["notifications"]["edges"])]

    async def balance(self) -> int:
        return await self.shop.balance()

    async def grant(self, amount: int) -> None:
        await self.shop.client.data(GRANT, {"org": self.shop.org, "amount": amount}, as_="root-admin")

    async def tick(self) -> None:
        await duties.tick(self.runtime)
        await self.settle()


@pytest.fixture
async def topups(shop: Shop, app: FastAPI) -> TopUps:
    runtime: Runtime = app.state.runtime
    # The clock starts at the database's time: back-off and the month are read against it.
    runtime.clock = ManualClock(datetime.now(UTC))
    return TopUps(shop, runtime)


class TestPolicy:
    async def test_a_policy_needs_a_saved_card(self, topups: TopUps) -> None:
        body = await topups.shop.client.raw(
            SET,
            {
                "input": {
                    "organizationId": topups.shop.org,
                    "enabled": True,
                    "threshold": 10,
                    "method": "FIXED",
                    "tokens": 50,
                }
            },
            as_=topups.shop.owner,
        )
        assert body["errors"][0]["extensions"]["code"] == "PAYMENT_METHOD_REQUIRED"
        assert await rows(topups.runtime, "SELECT 1 FROM auto_top_up_policies") == []

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"threshold": 100, "method": "TARGET", "targetBalance": 100}, "targetBalance"),
            ({"threshold": 100, "method": "FIXED"}, "tokens"),
            ({"threshold": 100, "method": "FIXED", "tokens": 10, "packageId": "x"}, "packageId"),
            ({"method": "FIXED", "tokens": 10}, "threshold"),
            (
                {"method": "FIXED", "tokens": 10, "schedule": {"interval": "MONTHLY", "dayOfMonth": 29}},
                "dayOfMonth",
            ),
            ({"method": "FIXED", "tokens": 10, "schedule": {"interval": "WEEKLY"}}, "dayOfWeek"),
            (
                {
                    "method": "FIXED",
                    "tokens": 10,
                    "schedule": {"interval": "WEEKLY", "dayOfWeek": 1, "hourUtc": 24},
                },
                "hourUtc",
            ),
            ({"threshold": 0, "method": "FIXED", "tokens": 10}, "threshold"),
            (
                {"threshold": 10, "method": "FIXED", "tokens": 10, "monthlySpendCapMinor": 0},
                "monthlySpendCapMinor",
            ),
        ],
    )
    async def test_bad_combinations_name_the_field_and_write_nothing(
        self, topups: TopUps, fields: dict[str, Any], field: str
    ) -> None:
        await save_card(topups.shop)
        body = await topups.shop.client.raw(
            SET,
            {"input": {"organizationId": topups.shop.org, "enabled": True} | fields},
            as_=topups.shop.owner,
        )
        extensions = body["errors"][0]["extensions"]
        assert (
            extensions["code"] in ("BAD_USER_INPUT", "NOT_FOUND") and extensions.get("field", field) == field
        )
        assert await rows(topups.runtime, "SELECT 1 FROM auto_top_up_policies") == []

    async def test_who_may_set_it_and_every_change_is_audited(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        shop = topups.shop
        await add_member(shop.client, shop.org, subject="bill", role="BILLING", as_=shop.owner)
        await add_member(shop.client, shop.org, subject="mem", role="MEMBER", as_=shop.owner)
        variables = {
            "input": {
                "organizationId": shop.org,
                "enabled": True,
                "threshold": 10,
                "method": "FIXED",
                "tokens": 50,
            }
        }
        assert error_code(await shop.client.raw(SET, variables, as_="mem"), "setAutoTopUp") == "FORBIDDEN"
        assert (
            error_code(await shop.client.raw(SET, variables, as_="stranger"), "setAutoTopUp") == "NOT_FOUND"
        )
        assert error_code(await shop.client.raw(SET, variables, as_="bill"), "setAutoTopUp") is None
        await topups.set(threshold=20, method="TARGET", targetBalance=200, monthlySpendCapMinor=50000)
        disabled = await shop.client.data(DISABLE, {"org": shop.org}, as_=shop.owner)
        assert disabled["disableAutoTopUp"]["policy"]["enabled"] is False
        audit = await rows(
            topups.runtime,
            "SELECT action, before->>'threshold', after->>'threshold', after->>'enabled' FROM audit_log "
            "WHERE target_type = 'auto_top_up_policy' ORDER BY at",
        )
        assert audit == [
            ("auto_top_up.set", None, "10", "true"),
            ("auto_top_up.set", "10", "20", "true"),
            ("auto_top_up.disable", "20", "20", "false"),
        ]


class TestThreshold:
    async def test_a_hundred_concurrent_consumptions_start_exactly_one_top_up(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        await topups.grant(117)  # 120 with the trial's 3
        await topups.set(threshold=50, method="FIXED", tokens=100)
        await topups.settle()
        assert await topups.top_ups() == []
        topups.shop.simulator.enabled_events = frozenset()  # Stripe holds its webhooks for now
        await asyncio.gather(*(topups.consume(1, f"c{i}") for i in range(100)))  # 20 left
        await drain(topups.runtime)  # the signal asks for one top-up; it is charged
        assert await topups.top_ups() == [("pending", 100, 9000)]
        # A signal while it is in flight starts nothing more.
        await topups.consume(1, "more")
        async with topups.runtime.driver.acquire() as connection:
            await connection.execute(
                "SELECT job_enqueue('wallet.signal', json_build_object('wallet_id', id)::text) FROM wallets"
            )
        await drain(topups.runtime)
        assert len(await topups.top_ups()) == 1
        topups.shop.simulator.enabled_events = None
        await deliver(topups.shop, "payment_intent.succeeded")  # Stripe's webhook credits it
        await topups.settle()
        assert await topups.top_ups() == [("paid", 100, 9000)]
        assert await topups.balance() == 119
        assert "AUTO_TOP_UP_SUCCEEDED" in await topups.kinds()
        policy = await topups.policy()
        assert policy["lastTopUp"]["status"] == "PAID" and policy["inFlight"] is None
        assert policy["spentThisMonthMinor"] == 9000
        # The next crossing may start the next one.
        await topups.consume(70, "down-again")
        await topups.settle()
        assert [status for status, *_ in await topups.top_ups()] == ["paid", "paid"]
        assert await topups.shop.violations() == {}

    async def test_target_buys_up_to_the_target(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        await topups.grant(57)  # 60
        await topups.set(threshold=50, method="TARGET", targetBalance=200)
        await topups.consume(30, "down")  # 30
        await topups.settle()
        assert await topups.top_ups() == [("paid", 170, 170 * 90)]
        assert await topups.balance() == 200

    async def test_a_job_run_twice_charges_once(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        await topups.set(threshold=50, method="FIXED", tokens=100)
        org = topups.shop.org_id
        outcomes = [await autotopup.start_top_up(topups.runtime, org, "threshold", "same") for _ in range(3)]
        assert outcomes[0] == "charged" and set(outcomes[1:]) <= {"charged", "settled"}
        await topups.settle()
        assert await topups.top_ups() == [("paid", 100, 9000)]
        intents = [
            a for a in topups.shop.simulator.webhooks.attempts if a.event_type == "payment_intent.succeeded"
        ]
        assert len({a.event_id for a in intents}) == 1


class TestDeclines:
    async def test_declines_back_off_then_turn_the_policy_off(self, topups: TopUps) -> None:
        await save_card(topups.shop, SAVES_BUT_DECLINES)
        await topups.set(threshold=50, method="FIXED", tokens=100)
        await topups.settle()  # the balance (3) is below: the first attempt, declined
        assert await topups.top_ups() == [("failed", 100, 9000)]
        policy = await topups.policy()
        assert policy["consecutiveFailures"] == 1 and policy["nextRetryAt"] is not None
        topups.clock.advance(timedelta(minutes=30))
        await topups.tick()
        assert len(await topups.top_ups()) == 1  # still backing off
        topups.clock.advance(timedelta(hours=1))
        await topups.tick()
        assert len(await topups.top_ups()) == 2
        topups.clock.advance(timedelta(hours=3))
        await topups.tick()
        assert len(await topups.top_ups()) == 2  # the second back-off is 4 hours
        topups.clock.advance(timedelta(hours=2))
        await topups.tick()
        assert [s for s, *_ in await topups.top_ups()] == ["failed"] * 3
        policy = await topups.policy()
        assert policy["enabled"] is False and "3 top-ups in a row" in policy["disabledReason"]
        kinds = await topups.kinds()
        assert kinds.count("AUTO_TOP_UP_FAILED") == 3 and kinds.count("AUTO_TOP_UP_DISABLED") == 1
        topups.clock.advance(timedelta(days=2))
        await topups.tick()
        assert len(await topups.top_ups()) == 3  # off: nothing more

    async def test_a_card_that_needs_its_holder_is_not_retried_in_a_loop(self, topups: TopUps) -> None:
        await save_card(topups.shop, NEEDS_AUTHENTICATION)
        await topups.set(threshold=50, method="FIXED", tokens=100)
        await topups.settle()
        assert await topups.top_ups() == [("pending", 100, 9000)]
        in_flight = (await topups.policy())["inFlight"]
        assert in_flight["actionUrl"]
        for _ in range(3):
            topups.clock.advance(timedelta(hours=5))
            await topups.tick()
        assert len(await topups.top_ups()) == 1
        assert (await topups.kinds()).count("PAYMENT_ACTION_REQUIRED") == 1
        await topups.shop.pay(in_flight["actionUrl"])  # the card holder completes it
        await topups.settle()
        assert await topups.top_ups() == [("paid", 100, 9000)]
        assert await topups.balance() == 103


class TestLimits:
    async def test_a_top_up_past_the_monthly_cap_is_not_made_and_told_once(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        await topups.grant(97)  # 100
        await topups.set(threshold=50, method="FIXED", tokens=100, monthlySpendCapMinor=15000)
        await topups.consume(60, "one")
        await topups.settle()
        assert await topups.top_ups() == [("paid", 100, 9000)]  # 140
        await topups.consume(100, "two")
        await topups.settle()
        await topups.consume(10, "three")
        topups.clock.advance(timedelta(minutes=5))
        await topups.tick()
        assert len(await topups.top_ups()) == 1
        assert (await topups.kinds()).count("SPEND_CAP_REACHED") == 1

    async def test_the_runaway_guard(self, topups: TopUps) -> None:
        topups.runtime.settings.auto_top_up_max_per_day = 2
        await save_card(topups.shop)
        await topups.set(threshold=50, method="FIXED", tokens=100)
        for i in range(4):  # each round spends the wallet empty: below the threshold again
            await topups.settle()
            if balance := await topups.balance():
                await topups.consume(balance, f"drain-{i}")
        await topups.settle()
        assert [s for s, *_ in await topups.top_ups()] == ["paid", "paid"]

    async def test_a_refunded_top_up_is_clawed_back(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        await topups.set(threshold=50, method="FIXED", tokens=100)
        await topups.settle()
        [(intent,)] = await rows(
            topups.runtime, "SELECT payment_intent_id FROM purchases WHERE method = 'auto_top_up'"
        )
        await topups.shop.gateway.create_refund(payment_intent_id=intent, idempotency_key="refund-top-up")
        await topups.settle()
        # Taken back: the balance (3) is below the threshold again, and the next top-up comes.
        assert await topups.top_ups() == [("refunded", 100, 9000), ("paid", 100, 9000)]
        assert await topups.balance() == 103
        assert await rows(topups.runtime, "SELECT amount FROM ledger_entries WHERE kind = 'clawback'") == [
            (-100,)
        ]
        assert await topups.shop.violations() == {}


class TestSchedule:
    async def test_once_per_period_and_a_missed_stretch_caught_up_once(self, topups: TopUps) -> None:
        await save_card(topups.shop)
        now = topups.clock.now()
        policy = await topups.set(
            method="FIXED",
            tokens=100,
            schedule={"interval": "WEEKLY", "dayOfWeek": now.isoweekday(), "hourUtc": 0},
        )
        next_run = datetime.fromisoformat(policy["schedule"]["nextRunAt"])
        await topups.tick()
        assert await topups.top_ups() == []  # the slot before the policy was set is not bought
        topups.clock.set(next_run + timedelta(minutes=1))
        for _ in range(3):
            topups.clock.advance(timedelta(minutes=1))
            await topups.tick()
        assert [s for s, *_ in await topups.top_ups()] == ["paid"]
        topups.clock.advance(timedelta(weeks=3))  # three slots pass with no worker
        await topups.tick()
        await topups.tick()
        assert [s for s, *_ in await topups.top_ups()] == ["paid", "paid"]
