"""The usage forecast: its math on generated histories (and a backtest against a plain 7-day
average), the ``usage.days`` duty, and ``wallet { forecast }`` through GraphQL on a real
database.

Consumptions are written with the ledger's own functions at the times of a ``ManualClock``
(each takes ``now``; a request's consumption would take PostgreSQL's ``now()``, today), so a
history spreads over days without waiting for them."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from strawberry.relay import GlobalID

from orgwallet import ledger
from orgwallet.clock import ManualClock
from orgwallet.db.engine import transaction
from orgwallet.jobs import duties
from orgwallet.ledger import GrantSource
from orgwallet.runtime import Runtime
from orgwallet.services import forecast as fc
from orgwallet.services.forecast import Inflow
from tests.helpers import GraphQLClient, create_org
from tests.jobs.conftest import drain, rows
from tests.jobs.test_alerts import ADD_ALERT
from tests.jobs.test_auto_top_up import NEEDS_AUTHENTICATION, SET
from tests.payments.test_purchases import save_card
from tests.purchasing import Shop
from tests.purchasing import shop as shop  # the fixture

NOW = datetime(2027, 3, 1, 9, 30, tzinfo=UTC)  # a Monday
DAYS = 70


# ---------------------------------------------------------------- generated histories


def _noise(seed: int) -> Callable[[float, float], int]:
    draw = random.Random(seed)
    return lambda mean, spread: max(0, round(draw.gauss(mean, spread)))


def steady(seed: int = 1, days: int = DAYS) -> list[int]:
    g = _noise(seed)
    return [g(120, 25) for _ in range(days)]


def growing(seed: int = 1, days: int = DAYS) -> list[int]:
    g = _noise(seed)
    return [g(40 + 3 * i, 15) for i in range(days)]


def weekly(seed: int = 1, days: int = DAYS) -> list[int]:
    """Busy on weekdays, quiet at weekends; day 0 is a Monday."""
    g = _noise(seed)
    return [g(200, 25) if i % 7 < 5 else g(20, 8) for i in range(days)]


def spike(seed: int = 1, days: int = DAYS) -> list[int]:
    g = _noise(seed)
    values = [g(100, 20) for _ in range(days)]
    values[days - 30] = 2500
    return values


def quiet_month(seed: int = 1, days: int = DAYS) -> list[int]:
    g = _noise(seed)
    return [g(100, 20) for _ in range(days - 30)] + [0] * 30


HISTORIES = {
    "steady": steady,
    "growing": growing,
    "weekly": weekly,
    "spike": spike,
    "quiet month": quiet_month,
}


def first_weekday(history: list[int]) -> int:
    """The weekday of the first day of a history that ends yesterday (NOW is a Monday)."""
    return (NOW.date() - timedelta(days=len(history))).weekday()


def run(history: list[int], *, balance: int = 10_000, threshold: int | None = None, **kw: Any) -> fc.Forecast:
    return fc.forecast(
        history,
        first_weekday=first_weekday(history),
        today_so_far=kw.pop("today_so_far", 0),
        balance=balance,
        threshold=threshold,
        now=kw.pop("now", NOW),
        **kw,
    )


def days_until(moment: datetime | None) -> float:
    assert moment is not None
    return (moment - NOW).total_seconds() / 86_400


class TestGeneratedHistories:
    @pytest.mark.parametrize("name", ["steady", "growing", "weekly", "spike"])
    def test_bounds_bracket_the_expected_day(self, name: str) -> None:
        result = run(HISTORIES[name](), balance=3_000)
        assert result.enough_history
        assert result.depletion_earliest is not None and result.depletion_at is not None
        assert NOW < result.depletion_earliest <= result.depletion_at
        assert result.depletion_latest is None or result.depletion_at <= result.depletion_latest
        assert result.days_left == pytest.approx(days_until(result.depletion_at))
        assert "\n" not in result.explanation and "runs out around" in result.explanation

    def test_steady_runs_out_when_the_balance_over_the_rate_says(self) -> None:
        result = run(steady(), balance=6_000)
        assert 105 <= result.burn_rate_per_day <= 135
        assert 6_000 / 135 <= days_until(result.depletion_at) <= 6_000 / 105
        assert result.explanation.startswith(
            f"about {round(result.burn_rate_per_day)} tokens/day over the last 70 days"
        )

    def test_growing_runs_out_sooner_than_a_plain_average_says(self) -> None:
        history = growing()
        result = run(history, balance=10_000)
        assert result.burn_rate_per_day > result.average_daily_7d > result.average_daily_30d
        assert days_until(result.depletion_at) < 10_000 / result.average_daily_30d
        assert days_until(result.depletion_at) < 10_000 / result.average_daily_7d

    def test_a_weekly_pattern_is_learned(self) -> None:
        history = weekly()
        projection = fc.project(history, first_weekday(history))
        assert projection.weekly_pattern
        # Today is a Monday: the next Saturday and Sunday (5 and 6 days on) are quiet.
        assert max(projection.rates[5:7]) < 60 < 150 < min(projection.rates[0:5])
        week = (5 * 200 + 2 * 20) / 7
        assert week * 0.9 <= projection.burn_rate <= week * 1.1
        result = run(history, balance=3_000)
        assert "weekly pattern" in result.explanation
        # The bounds come from whole weeks, which hardly vary: a weekday's peak is no burn rate.
        assert result.depletion_latest is not None
        assert days_until(result.depletion_latest) - days_until(result.depletion_earliest) < 4

    def test_a_spike_moves_the_rate_a_little(self) -> None:
        history = [*steady()[:-1], 2_500]  # yesterday
        result = run(history)
        assert result.average_daily_7d > 400
        assert result.burn_rate_per_day < 1.3 * 120
        back_to_normal = run(history + [120] * 6)
        assert back_to_normal.burn_rate_per_day < 1.15 * 120

    def test_a_quiet_month_runs_out_never(self) -> None:
        result = run(quiet_month(), balance=50, threshold=100)
        assert result.burn_rate_per_day == 0 and result.average_daily_7d == 0
        assert result.average_daily_30d == 0 and result.enough_history
        assert result.depletion_at is result.depletion_earliest is result.depletion_latest is None
        assert result.days_left is None and result.tokens_needed is None
        assert result.threshold_crossing_at == NOW  # below it already
        assert result.explanation == "no consumption in the last 7 days, so the balance is not running out"

    def test_a_brand_new_wallet_says_it_has_too_little_history(self) -> None:
        nothing = run([], today_so_far=0)
        assert not nothing.enough_history and nothing.burn_rate_per_day == 0
        assert nothing.depletion_at is None and nothing.days_left is None
        assert nothing.explanation == "no consumption yet, so nothing to forecast"

        today_only = run([], today_so_far=400, balance=2_000, now=NOW.replace(hour=12, minute=0))
        assert not today_only.enough_history
        assert today_only.burn_rate_per_day == pytest.approx(800)  # 400 in half a day
        assert "at today's pace" in today_only.explanation and "too little history" in today_only.explanation
        assert 2 <= days_until(today_only.depletion_at) <= 3

        three_days = run([100, 140, 120], balance=2_000)
        assert not three_days.enough_history and three_days.history_days == 3
        assert "over only 3 days (too little history to be sure)" in three_days.explanation
        assert three_days.depletion_at is not None and 90 <= three_days.burn_rate_per_day <= 150

    @pytest.mark.parametrize("balance", [120 * 200, 2**53 - 1])
    def test_beyond_the_horizon_is_null(self, balance: int) -> None:
        result = run(steady(), balance=balance, threshold=balance - 1)
        assert result.depletion_at is None and result.days_left is None
        assert result.depletion_earliest is None and result.depletion_latest is None
        assert "lasts beyond 90 days" in result.explanation
        assert result.tokens_needed is None  # covers the next 30 days at a high rate
        assert result.threshold_crossing_at is not None  # a token below: within the hour

    def test_the_threshold_is_crossed_before_the_balance_runs_out(self) -> None:
        result = run(steady(), balance=6_000, threshold=1_200)
        crossing, depletion = days_until(result.threshold_crossing_at), days_until(result.depletion_at)
        assert crossing < depletion
        assert crossing == pytest.approx(depletion * 4_800 / 6_000, rel=0.1)
        assert run(steady(), balance=6_000, threshold=None).threshold_crossing_at is None

    def test_known_inflows_push_the_day_back(self) -> None:
        history = steady()
        without = run(history, balance=3_000)
        in_flight = run(history, balance=3_000, inflows=[Inflow(NOW, 1_200, "top-up in flight")])
        later = run(history, balance=3_000, inflows=[Inflow(NOW + timedelta(days=40), 5_000, "grant")])
        rate = without.burn_rate_per_day
        assert days_until(in_flight.depletion_at) - days_until(without.depletion_at) == pytest.approx(
            1_200 / rate, rel=0.05
        )
        assert "counting 1,200 tokens on the way" in in_flight.explanation
        assert later.depletion_at == without.depletion_at  # arrives after the balance ran out
        short = run(history, balance=1_000)
        short_in_flight = run(history, balance=1_000, inflows=[Inflow(NOW, 1_200, "top-up in flight")])
        assert short.tokens_needed is not None and short_in_flight.tokens_needed is not None
        assert short.tokens_needed - short_in_flight.tokens_needed == 1_200

    def test_the_suggestion_covers_thirty_days_at_a_high_rate(self) -> None:
        result = run(steady(), balance=1_000)
        assert result.high_rate >= result.burn_rate_per_day
        assert result.tokens_needed == pytest.approx(30 * result.high_rate - 1_000, abs=1)


class TestBuyable:
    def test_the_smallest_package_that_covers_it(self) -> None:
        assert fc.buyable(37, packages=[10, 50, 100, 500], tiers=[(1, 90)], custom=(1, 100_000)) == 50

    def test_else_a_custom_amount_within_the_limits(self) -> None:
        assert fc.buyable(501, packages=[10, 500], tiers=[(1, 90)], custom=(1, 100_000)) == 501
        assert fc.buyable(3, packages=[], tiers=[(1, 90)], custom=(25, 100_000)) == 25

    def test_else_the_need_itself(self) -> None:
        assert fc.buyable(200_000, packages=[500], tiers=[(1, 90)], custom=(1, 100_000)) == 200_000
        assert fc.buyable(600, packages=[500], tiers=[], custom=(1, 100_000)) == 600  # no price for it
        # One payment takes at most 999,999.99: 20,000 tokens at 90 minor units is 1,800,000.00.
        assert fc.buyable(20_000, packages=[500], tiers=[(1, 9_000)], custom=(1, 100_000)) == 20_000


class TestBacktest:
    """From each day after the first two weeks, each of the next seven days is predicted by
    the forecast's projection and by the plain average of the last seven days; the mean
    absolute errors over five generated histories of each kind are compared."""

    @staticmethod
    def errors(history: list[int]) -> tuple[float, float]:
        ours = plain = 0.0
        for t in range(14, len(history) - 6):
            projection = fc.project(history[:t], first_weekday(history[:t]))
            average = sum(history[t - 7 : t]) / 7
            for ahead in range(7):
                ours += abs(history[t + ahead] - projection.rates[ahead])
                plain += abs(history[t + ahead] - average)
        return ours, plain

    @pytest.mark.parametrize("name", list(HISTORIES))
    def test_the_smoothed_rate_beats_a_plain_7_day_average(self, name: str) -> None:
        ours = plain = 0.0
        for seed in range(1, 6):
            a, b = self.errors(HISTORIES[name](seed))
            ours, plain = ours + a, plain + b
        assert ours < plain, (name, ours / plain)


# ---------------------------------------------------------------- on a real database

FORECAST = """query($org: ID!, $days: Int) { organization(id: $org) { wallet { balance forecast {
  enoughHistory burnRatePerDay averageDaily7d averageDaily30d thresholdCrossingAt depletionAt
  depletionEarliest depletionLatest daysLeft suggestedTopUpTokens explanation
  daily(days: $days) { date consumed } } } } }"""


@pytest.fixture
def runtime(app: FastAPI) -> Runtime:
    """The app's runtime, its clock a ``ManualClock`` at NOW."""
    runtime: Runtime = app.state.runtime
    runtime.clock = ManualClock(NOW)
    return runtime


class Org:
    """An organization, its wallet, and ledger operations at chosen times."""

    def __init__(self, client: GraphQLClient, runtime: Runtime, org: str, owner: str, wallet_id: uuid.UUID):
        self.client, self.runtime, self.org, self.owner, self.wallet_id = (
            client,
            runtime,
            org,
            owner,
            wallet_id,
        )

    @classmethod
    async def open(cls, client: GraphQLClient, runtime: Runtime, owner: str = "owner") -> Org:
        org = await create_org(client, owner)
        organization_id = uuid.UUID(GlobalID.from_id(org).node_id)
        [row] = await rows(runtime, "SELECT id FROM wallets WHERE organization_id = $1", organization_id)
        return cls(client, runtime, org, owner, row["id"])

    async def consume(self, amount: int, when: datetime) -> ledger.Posting:
        async with transaction(self.runtime.sessions) as session:
            return await ledger.consume(
                session, self.wallet_id, amount=amount, key=f"c-{uuid.uuid4()}", actor="test", now=when
            )

    async def credit(
        self,
        amount: int,
        source: GrantSource,
        when: datetime,
        expires_at: datetime | None = None,
        priority: int | None = None,
    ) -> None:
        async with transaction(self.runtime.sessions) as session:
            await ledger.credit(
                session,
                self.wallet_id,
                amount=amount,
                source=source,
                actor="test",
                expires_at=expires_at,
                priority=priority,
                now=when,
            )

    async def refund(self, entry_id: uuid.UUID, amount: int, when: datetime) -> None:
        async with transaction(self.runtime.sessions) as session:
            await ledger.refund(session, entry_id, amount=amount, actor="test", now=when)

    async def reserve_and_capture(self, amount: int, captured: int, when: datetime) -> None:
        async with transaction(self.runtime.sessions) as session:
            posting = await ledger.reserve(
                session,
                self.wallet_id,
                amount=amount,
                key=f"r-{uuid.uuid4()}",
                ttl_seconds=600,
                actor="test",
                now=when,
            )
            assert posting.reservation_id is not None
            await ledger.capture(session, posting.reservation_id, amount=captured, actor="test", now=when)

    async def forecast(self, days: int | None = 30, as_: str | None = None) -> dict[str, Any]:
        data = await self.client.data(FORECAST, {"org": self.org, "days": days}, as_=as_ or self.owner)
        found: dict[str, Any] = data["organization"]["wallet"]["forecast"]
        return found

    async def usage_rows(self) -> list[tuple[date, int]]:
        found = await rows(
            self.runtime,
            "SELECT day, consumed FROM wallet_usage_days WHERE wallet_id = $1 ORDER BY day",
            self.wallet_id,
        )
        return [(r["day"], r["consumed"]) for r in found]


def day(back: int, hour: int = 10) -> datetime:
    """``back`` days before NOW, at ``hour`` UTC."""
    return (NOW - timedelta(days=back)).replace(hour=hour, minute=0)


async def two_weeks(org: Org) -> dict[date, int]:
    """Fourteen days of use (none on two of them) with grants, a purchase, a refund, a captured
    reservation and an expiry among them; what each day consumed, today's so far."""
    await org.credit(5_000, GrantSource.ADMIN, day(20))
    await org.credit(500, GrantSource.ADMIN, day(9), expires_at=day(6), priority=50)  # drawn last: expires
    expected: dict[date, int] = {}
    for back in range(14, 0, -1):
        if back in (10, 5):
            continue
        await org.consume(100, day(back))
        expected[day(back).date()] = 100
    await org.credit(2_000, GrantSource.ADMIN, day(10))  # a day without use stays at zero
    await org.credit(1_000, GrantSource.PURCHASE, day(7, 12))
    spent = await org.consume(300, day(3, 11))
    assert spent.entry is not None
    await org.refund(spent.entry.id, 100, day(3, 15))  # net 200 that day
    expected[day(3).date()] += 200
    await org.reserve_and_capture(50, 30, day(2, 16))  # 30 consumed, 20 back
    expected[day(2).date()] += 30
    await org.consume(40, NOW.replace(hour=8))
    expected[NOW.date()] = 40
    return expected


@pytest.fixture
async def org(client: GraphQLClient, runtime: Runtime) -> Org:
    return await Org.open(client, runtime)


class TestForecastThroughGraphQL:
    async def test_daily_counts_only_consumption_and_zeros_for_quiet_days(self, org: Org) -> None:
        expected = await two_weeks(org)
        before_the_duty = await org.forecast(days=16)
        await duties.tick(org.runtime)  # claims usage.days for today and queues it ...
        await drain(org.runtime)  # ... which counts every completed day
        assert await org.usage_rows() == [(d, c) for d, c in sorted(expected.items()) if d < NOW.date()]
        answer = await org.forecast(days=16)
        week = [NOW.date() - timedelta(days=back) for back in range(15, -1, -1)]
        assert [(date.fromisoformat(d["date"]), d["consumed"]) for d in answer["daily"]] == [
            (d, expected.get(d, 0)) for d in week
        ]
        assert before_the_duty == answer  # read from the ledger while the duty had not run
        expired = await rows(
            org.runtime,
            "SELECT created_at, amount FROM ledger_entries WHERE wallet_id = $1 AND kind = 'expiration'"
            " AND created_at > $2",
            org.wallet_id,
            day(15),
        )
        assert [(r["created_at"], r["amount"]) for r in expired] == [(day(6), -500)]  # not counted
        assert answer["enoughHistory"] is True
        last_week = [expected.get(NOW.date() - timedelta(days=back), 0) for back in range(7, 0, -1)]
        assert answer["averageDaily7d"] == pytest.approx(sum(last_week) / 7)
        history = sum(c for d, c in expected.items() if d < NOW.date())
        assert answer["averageDaily30d"] == pytest.approx(history / 14)  # since the first use
        depletion = datetime.fromisoformat(answer["depletionAt"])
        assert datetime.fromisoformat(answer["depletionEarliest"]) <= depletion
        latest = answer["depletionLatest"]  # at a low rate: maybe beyond the horizon
        assert latest is None or depletion <= datetime.fromisoformat(latest)
        assert answer["daysLeft"] == pytest.approx((depletion - NOW).total_seconds() / 86_400)
        assert answer["thresholdCrossingAt"] is None  # no policy, no alert
        assert answer["suggestedTopUpTokens"] is None  # covers 30 days at the high rate
        assert answer["explanation"].startswith("about ")
        assert "over the last 14 days; runs out around " in answer["explanation"]

    async def test_the_balance_the_forecast_counts_down(self, org: Org) -> None:
        await two_weeks(org)
        data = await org.client.data(FORECAST, {"org": org.org, "days": 1}, as_=org.owner)
        wallet = data["organization"]["wallet"]
        answer = wallet["forecast"]
        depletion = datetime.fromisoformat(answer["depletionAt"])
        rate = answer["burnRatePerDay"]
        assert (depletion - NOW).total_seconds() / 86_400 == pytest.approx(wallet["balance"] / rate, rel=0.1)

    async def test_the_suggested_top_up_is_a_package_that_covers_thirty_days(self, org: Org) -> None:
        await org.credit(250, GrantSource.ADMIN, day(20))
        for back in range(10, 0, -1):
            await org.consume(10, day(back))
        data = await org.client.data(FORECAST, {"org": org.org, "days": 1}, as_=org.owner)
        wallet = data["organization"]["wallet"]
        needed = 30 * 10 - wallet["balance"]  # 30 days at 10 a day, less the balance
        assert 50 < needed <= 500
        # The seeded catalogue: 10, 50, 100 and 500 tokens.
        assert wallet["forecast"]["suggestedTopUpTokens"] == min(p for p in (10, 50, 100, 500) if p >= needed)

    async def test_another_organizations_wallet_is_not_readable(self, org: Org) -> None:
        await two_weeks(org)
        await create_org(org.client, "mallory")
        body = await org.client.raw(FORECAST, {"org": org.org, "days": 7}, as_="mallory")
        assert body == {"data": {"organization": None}}  # as a missing one is answered
        wallet = await org.client.data(
            "query($org: ID!) { organization(id: $org) { wallet { id } } }", {"org": org.org}, as_=org.owner
        )
        node = "query($id: ID!) { node(id: $id) { ... on Wallet { forecast { burnRatePerDay } } } }"
        found = await org.client.data(node, {"id": wallet["organization"]["wallet"]["id"]}, as_="mallory")
        assert found["node"] is None

    @pytest.mark.parametrize("days", [0, -1, 366])
    async def test_days_out_of_range_is_a_typed_error(self, org: Org, days: int) -> None:
        body = await org.client.raw(FORECAST, {"org": org.org, "days": days}, as_=org.owner)
        [error] = body["errors"]
        assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "days"}
        assert "between 1 and 365" in error["message"]

    async def test_a_year_of_days(self, org: Org) -> None:
        await two_weeks(org)
        daily = (await org.forecast(days=365))["daily"]
        assert len(daily) == 365 and daily[-1] == {"date": NOW.date().isoformat(), "consumed": 40}
        assert sum(d["consumed"] for d in daily) == 100 * 12 + 200 + 30 + 40


class TestKnownInflows:
    async def test_a_top_up_in_flight_counts_and_the_policys_threshold_is_watched(
        self, shop: Shop, app: FastAPI
    ) -> None:
        runtime: Runtime = app.state.runtime
        start = datetime.now(UTC)  # top-ups read their month and back-off against the database's time
        runtime.clock = ManualClock(start)
        [wallet] = await rows(runtime, "SELECT id FROM wallets WHERE organization_id = $1", shop.org_id)
        org = Org(shop.client, runtime, shop.org, shop.owner, wallet["id"])
        await org.credit(2_000, GrantSource.ADMIN, start - timedelta(days=11))
        for back in range(10, 0, -1):
            await org.consume(100, start - timedelta(days=back))
        assert await shop.balance() == 1_003  # with the trial's 3
        await shop.client.data(ADD_ALERT, {"org": shop.org, "threshold": 10_000}, as_=shop.owner)
        await save_card(shop, NEEDS_AUTHENTICATION)  # the top-up waits for its card holder
        policy = {
            "organizationId": shop.org,
            "enabled": True,
            "threshold": 1_053,
            "method": "FIXED",
            "tokens": 100,
        }
        await shop.client.data(SET, {"input": policy}, as_=shop.owner)
        for _ in range(3):
            await drain(runtime)
            await shop.drain()
        found = await rows(runtime, "SELECT status, tokens FROM purchases WHERE method = 'auto_top_up'")
        assert [tuple(r) for r in found] == [("pending", 100)]

        answer = await org.forecast(days=1)
        rate = answer["burnRatePerDay"]
        assert rate == pytest.approx(100, rel=0.05)
        # 1,003 + 100 in flight, down to the policy's 1,053 (the alert at 10,000 is not the one).
        crossing = datetime.fromisoformat(answer["thresholdCrossingAt"])
        assert (crossing - start).total_seconds() / 86_400 == pytest.approx(50 / rate, rel=0.05)
        depletion = datetime.fromisoformat(answer["depletionAt"])
        assert (depletion - start).total_seconds() / 86_400 == pytest.approx(1_103 / rate, rel=0.05)
        assert "counting 100 tokens on the way" in answer["explanation"]
        # 30 days at 100 a day, less the 1,103 there: more than the largest package, a custom amount.
        assert answer["suggestedTopUpTokens"] == 30 * 100 - 1_103


class TestUsageDaysDuty:
    async def test_a_second_run_for_the_same_day_changes_nothing(self, org: Org) -> None:
        await two_weeks(org)
        await fc.record_usage_days(org.runtime.driver, NOW)
        first = await org.usage_rows()
        marks = await rows(org.runtime, "SELECT * FROM wallet_usage_marks")
        await fc.record_usage_days(org.runtime.driver, NOW + timedelta(hours=3))
        assert await org.usage_rows() == first and len(first) == 12
        again = await rows(org.runtime, "SELECT * FROM wallet_usage_marks")
        assert [dict(r) | {"updated_at": None} for r in again] == [
            dict(r) | {"updated_at": None} for r in marks
        ]

    async def test_a_missed_week_is_caught_up(self, org: Org) -> None:
        await org.credit(10_000, GrantSource.ADMIN, day(30))
        for back in range(21, 14, -1):
            await org.consume(10 * back, day(back))
        await fc.record_usage_days(org.runtime.driver, day(14, 0) + timedelta(minutes=5))
        assert len(await org.usage_rows()) == 7
        for back in range(14, 0, -1):  # a week and more without the duty
            await org.consume(10 * back, day(back))
        assert await rows(org.runtime, "SELECT through_day FROM wallet_usage_closed") == [(day(15).date(),)]
        await fc.record_usage_days(org.runtime.driver, NOW)
        assert await org.usage_rows() == [(day(back).date(), 10 * back) for back in range(21, 0, -1)]
        assert await rows(org.runtime, "SELECT through_day FROM wallet_usage_closed") == [(day(1).date(),)]
        daily = (await org.forecast(days=23))["daily"]
        assert [d["consumed"] for d in daily] == [0] + [10 * back for back in range(21, 0, -1)] + [0]

    async def test_an_entry_of_yesterday_committed_after_the_run_is_counted_once(self, org: Org) -> None:
        await org.credit(10_000, GrantSource.ADMIN, day(30))
        await org.consume(100, day(1))
        await fc.record_usage_days(org.runtime.driver, NOW)
        await org.consume(40, NOW)
        await org.consume(7, day(1, 23))  # written "before midnight", committed after today's
        await fc.record_usage_days(org.runtime.driver, NOW + timedelta(hours=1))  # a second run
        assert await org.usage_rows() == [(day(1).date(), 100)]
        daily = (await org.forecast(days=2))["daily"]
        assert [d["consumed"] for d in daily] == [100, 47]  # counted with today meanwhile
        await fc.record_usage_days(org.runtime.driver, NOW + timedelta(days=1))
        assert await org.usage_rows() == [(day(1).date(), 107), (NOW.date(), 40)]
        org.runtime.clock = ManualClock(NOW + timedelta(days=1))
        daily = (await org.forecast(days=3))["daily"]
        assert [d["consumed"] for d in daily] == [107, 40, 0]
