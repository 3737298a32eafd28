"""What a subscription does to the forecast (its renewals are inflows; an unlimited plan runs
nothing out), a read of Stripe's subscription begun before another that was applied never
overwrites it, and the grace and reminder duties run through the worker's duty tick."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from orgwallet.db.engine import transaction
from orgwallet.jobs import duties
from orgwallet.services import forecast, subscriptions
from orgwallet.services.forecast import Inflow, Usage
from tests.jobs.conftest import drain
from tests.subscriptions.harness import DAY, DECLINES_LATER, HOUR, START, Subscriber, at, month


async def outlook(s: Subscriber, now: int) -> subscriptions.Outlook:
    async with s.runtime.driver.acquire() as connection:
        return await subscriptions.outlook(connection, s.shop.org_id, at(now), timedelta(days=90))


class TestForecast:
    async def test_renewals_within_the_horizon_are_inflows_of_the_plan_to_come(
        self, subscriber: Subscriber
    ) -> None:
        s = subscriber
        await s.plan("basic", tokens=100, price=1000)
        await s.plan("small", tokens=40, price=500)
        await s.start("basic")
        seen = await outlook(s, START + DAY)
        assert not seen.unlimited
        horizon = START + DAY + 90 * DAY
        renewals = [month(n) for n in range(1, 5) if month(n) <= horizon]
        assert len(renewals) >= 2
        assert seen.grants == [(at(renewal), 100) for renewal in renewals]

        await s.change_plan("small")  # a downgrade: the renewals grant the smaller plan
        assert (await outlook(s, START + DAY)).grants == [(at(renewal), 40) for renewal in renewals]

        await s.cancel()  # at the period's end: nothing more comes
        assert (await outlook(s, START + DAY)).grants == []

    async def test_an_unlimited_plan_runs_nothing_out(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("unlimited", tokens=0, price=5000, unlimited=True)
        await s.start("unlimited")
        seen = await outlook(s, START + DAY)
        assert seen == subscriptions.Outlook([], True)

        now = at(START + DAY)
        usage = Usage(
            now=now,
            consumed={(now - timedelta(days=d)).date(): 50 for d in range(1, 20)},
            today_so_far=10,
            first_day=(now - timedelta(days=19)).date(),
            balance=100,
            threshold=80,
            inflows=[],
            packages=[10, 50],
            tiers=[(1, 100)],
            unlimited=True,
        )
        result, suggestion = forecast.forecast_of(usage, custom=(1, 100_000))
        assert (result.depletion_at, result.threshold_crossing_at, result.days_left, suggestion) == (
            None,
            None,
            None,
            None,
        )
        assert result.burn_rate_per_day > 0 and "unlimited plan" in result.explanation
        limited, suggested = forecast.forecast_of(replace(usage, unlimited=False), custom=(1, 100_000))
        assert limited.depletion_at is not None and suggested is not None

    async def test_a_grant_in_the_horizon_moves_depletion_later(self, subscriber: Subscriber) -> None:
        now = datetime(2027, 1, 16, tzinfo=UTC)
        history = [30] * 21
        common = {"first_weekday": 0, "today_so_far": 0, "balance": 300, "threshold": None, "now": now}
        without = forecast.forecast(history, **common)  # type: ignore[arg-type]
        with_grant = forecast.forecast(
            history,
            inflows=[Inflow(now + timedelta(days=5), 300, "subscription grant")],
            **common,  # type: ignore[arg-type]
        )
        assert without.depletion_at is not None and with_grant.depletion_at is not None
        assert with_grant.depletion_at - without.depletion_at >= timedelta(days=9)


class TestStaleReads:
    async def test_a_read_begun_earlier_never_overwrites_one_applied(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=100, price=1000)
        await s.start("basic")
        sessions = s.runtime.sessions
        early = await subscriptions.next_seq(sessions)
        stripe_id = (await s.row()).stripe_subscription_id
        before_cancel = subscriptions.as_json(await s.runtime.gateway.retrieve_subscription(stripe_id))
        await s.cancel()  # a later read (Stripe's answer) applied: canceling at the period's end
        assert (await s.subscription())["cancelAtPeriodEnd"] is True

        grace = subscriptions.grace_period(s.runtime)
        async with transaction(sessions) as session:
            outcome = await subscriptions.apply_subscription(
                session, before_cancel, seq=early, now=s.clock.now(), grace=grace
            )
        assert outcome == "stale"
        assert (await s.subscription())["cancelAtPeriodEnd"] is True

        later = await subscriptions.next_seq(sessions)
        async with transaction(sessions) as session:  # a read begun later wins, whatever it says
            outcome = await subscriptions.apply_subscription(
                session, before_cancel, seq=later, now=s.clock.now(), grace=grace
            )
        assert outcome == "synced"
        assert (await s.subscription())["cancelAtPeriodEnd"] is False


class TestDutiesThroughTheWorker:
    async def test_grace_and_reminders_run_from_the_duty_tick(self, subscriber: Subscriber) -> None:
        s = subscriber
        await s.plan("basic", tokens=100, price=1000)
        await s.start("basic")
        runtime = s.runtime

        s.set_clock(month(1) - 2 * DAY)  # within 3 days of the renewal
        assert "subscriptions.remind" in await duties.tick(runtime)
        await drain(runtime)
        assert await s.notification_kinds("SUBSCRIPTION_RENEWAL_UPCOMING") == [
            "SUBSCRIPTION_RENEWAL_UPCOMING"
        ]

        await s.set_card(DECLINES_LATER)
        await s.advance(month(1) + 2 * HOUR)
        assert (await s.subscription())["status"] == "PAST_DUE"
        s.set_clock(month(1) + 8 * DAY)  # past the 7 days of grace (Stripe's next retry: +3 days)
        started = await duties.tick(runtime)
        assert "subscriptions.grace" in started
        await drain(runtime)
        assert await s.current() is None  # canceled
        assert await s.wallet_status() == "SUSPENDED"
        [finished] = await s.sql(
            "SELECT outcome FROM duty_runs WHERE duty = 'subscriptions.grace' AND finished_at IS NOT NULL"
            " ORDER BY period_start DESC LIMIT 1"
        )
        assert finished.outcome == "ended 1 of 1"
