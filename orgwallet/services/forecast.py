"""The usage forecast of a wallet: daily consumption, a smoothed burn rate, when the balance
crosses a threshold and runs out, and what to buy.

Two halves. The math (``project``, ``forecast``, ``buyable``) is pure: functions of a list of
daily values, a balance, thresholds and ``now``, testable without a database. The reading
(``read_usage``) is cheap by design, because a dashboard asks on every visit: completed days
come from ``wallet_usage_days`` (filled once a day by the ``usage.days`` duty,
``record_usage_days``), today's part from ``wallets.lifetime_consumed`` less what the duty has
counted (``wallet_usage_marks``), so a read is one statement of indexed lookups over at most
``HORIZON_DAYS`` rows whatever the wallet's traffic, and the consumption path does no extra work.

What counts as consumption: CONSUMPTION and CAPTURE entries, less REFUND entries (the ledger's
REFUND kind gives back consumed tokens only; a purchase's refund is a CLAWBACK): the same net
as ``wallets.lifetime_consumed``, on the day each entry was written. A day whose refunds exceed
its consumption shows zero. Grants, purchases, expirations, clawbacks and reservations (a hold,
until captured) are not consumption.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from orgwallet.errors import InvalidInput, NotFound
from orgwallet.ledger import EntryKind
from orgwallet.services import subscriptions
from orgwallet.services.pricing import MAX_AMOUNT_MINOR

WEEK = 7
#: Days of completed history the forecast reads and projects over.
HORIZON_DAYS = 90
#: The most days ``daily(days)`` shows.
MAX_DAYS = 365
#: Completed days since the first consumption below which the forecast says it is a guess.
MIN_HISTORY_DAYS = 7
#: Completed days from which other smoothers than the default are tried (a trend, a weekday
#: pattern, a slower level), each kept only if it backtests better on the wallet's history.
PATTERN_MIN_DAYS = 21
#: The window of recent days whose spread gives the bounds and the "high" burn rate.
SPREAD_DAYS = 28
HIGH_QUANTILE = 0.85
LOW_QUANTILE = 0.15
#: The suggested top-up covers this many days at the high burn rate.
COVER_DAYS = 30

# Smoothing: an exponential smoother (a level, optionally a damped trend and additive weekday
# terms) whose first day out of line (beyond CLIP times the running typical error) counts as
# CLIP typical errors, so a spike moves the level a little; a second day out of line in the same
# direction restarts the level there, so a lasting change (a quiet spell) moves it at once.
BETA = 0.2  # trend, as a share of the level's correction
PHI = 0.9  # trend damping per day ahead
GAMMA = 0.2  # weekday terms
CLIP = 3.0
SCALE_RATE = 0.1
#: The last days from which the smoothers' predictions are compared.
BACKTEST_DAYS = 42
#: PHI + PHI**2 + ... + PHI**ahead: how much of the trend is still there ``ahead`` days on.
_DAMPED = [PHI * (1 - PHI**ahead) / (1 - PHI) for ahead in range(HORIZON_DAYS + 2)]
#: The smoothers tried, as (level rate, damped trend, weekday pattern); the first is the default.
_Model = tuple[float, bool, bool]
MODELS: list[_Model] = [
    (0.2, False, False),
    (0.1, False, False),
    (0.2, True, False),
    (0.2, False, True),
    (0.2, True, True),
]

#: The entries that move ``wallets.lifetime_consumed`` (``ledger_append``, migration 0002); an
#: entry consumed ``CASE kind WHEN 'capture' THEN -held_change ELSE -amount END`` tokens.
CONSUMED_KINDS = [EntryKind.CONSUMPTION.value, EntryKind.CAPTURE.value, EntryKind.REFUND.value]


# ---------------------------------------------------------------- the math (pure)


@dataclass(frozen=True, slots=True)
class Inflow:
    """Tokens known to be arriving: ``at`` or before now counts at once."""

    at: datetime
    tokens: int
    what: str


@dataclass(frozen=True, slots=True)
class Projection:
    """Expected consumption per day: ``rates[0]`` for today (whole day), ``rates[i]`` i days on."""

    rates: list[float]
    burn_rate: float  # tokens per day, the average of today and the next six days
    weekly_pattern: bool


@dataclass(frozen=True, slots=True)
class Forecast:
    enough_history: bool
    history_days: int
    burn_rate_per_day: float
    average_daily_7d: float
    average_daily_30d: float
    threshold_crossing_at: datetime | None
    depletion_at: datetime | None
    depletion_earliest: datetime | None
    depletion_latest: datetime | None
    days_left: float | None
    tokens_needed: int | None  # before rounding to what can be bought
    high_rate: float
    explanation: str


@dataclass(slots=True)
class _Smoother:
    level: float
    trend: float  # stays zero without a trend
    season: list[float]  # stays zero without a weekday pattern
    scale: float
    alpha: float
    with_trend: bool
    pattern: bool
    outlier: int = 0  # the direction of yesterday's error when it was out of line, else 0
    previous: float = 0.0  # yesterday's value less its weekday term

    def predict(self, ahead: int, weekday: int) -> float:
        """The expected value ``ahead`` days on (1: the next day), on ``weekday``."""
        return self.level + _DAMPED[ahead] * self.trend + self.season[weekday]

    def update(self, value: float, weekday: int) -> None:
        plain = value - self.season[weekday]
        error = plain - self.level - PHI * self.trend
        size = abs(error)
        limit = CLIP * self.scale
        outlier = 0 if size <= limit else (1 if error > 0 else -1)
        previous, self.previous, shifted = self.previous, plain, bool(outlier) and outlier == self.outlier
        self.outlier = outlier
        if shifted:
            # A second day out of line in the same direction: the level has moved (a quiet
            # spell, a new customer); start again from these two days.
            self.level, self.trend = (plain + previous) / 2, 0.0
            self.scale += SCALE_RATE * (size - self.scale)
            return
        if outlier:  # a first day out of line counts as CLIP typical errors: a spike moves little
            error = math.copysign(limit, error)
            size = 2 * limit
        self.scale += SCALE_RATE * (size - self.scale)
        self.level += PHI * self.trend + self.alpha * error
        if self.with_trend:
            self.trend = PHI * self.trend + self.alpha * BETA * error
        if self.pattern:
            self.season[weekday] += GAMMA * (1 - self.alpha) * error


def _start(values: Sequence[float], first_weekday: int, model: _Model) -> _Smoother:
    alpha, with_trend, pattern = model
    head = values[: 2 * WEEK] if pattern else values[:WEEK]
    mean = sum(head) / len(head)
    season = [0.0] * WEEK
    if pattern:
        for weekday in range(WEEK):
            same = [v for i, v in enumerate(head) if (first_weekday + i) % WEEK == weekday]
            season[weekday] = sum(same) / len(same) - mean if same else 0.0
    scale = sum(abs(v - mean) for v in head) / len(head)
    return _Smoother(mean, 0.0, season, scale, alpha, with_trend, pattern)


def _run(values: Sequence[float], first_weekday: int, model: _Model) -> tuple[_Smoother, float]:
    """The smoother after ``values``, and its backtest: the mean absolute error of its
    predictions of each of the next seven days, made from each of the last BACKTEST_DAYS days
    that follow two weeks of history (infinite when there are fewer than three weeks)."""
    smoother = _start(values, first_weekday, model)
    first = max(2 * WEEK, len(values) - WEEK - BACKTEST_DAYS)
    error, count = 0.0, 0
    for i, value in enumerate(values):
        if first <= i <= len(values) - WEEK:
            level, trend, season = smoother.level, smoother.trend, smoother.season
            for ahead in range(1, WEEK + 1):
                expected = level + _DAMPED[ahead] * trend + season[(first_weekday + i + ahead - 1) % WEEK]
                error += abs(values[i + ahead - 1] - (expected if expected > 0 else 0.0))
            count += WEEK
        smoother.update(value, (first_weekday + i) % WEEK)
    return smoother, error / count if count else math.inf


def project(history: Sequence[int], first_weekday: int, days: int = HORIZON_DAYS) -> Projection:
    """Expected consumption for today and the next ``days`` days, from ``history``: completed
    days, oldest first, the last one yesterday; ``first_weekday`` is the first day's (Monday 0).

    The plain smoother (an exponentially weighted average, robust to spikes) is the default.
    From PATTERN_MIN_DAYS days on, a damped trend, a weekday pattern and both are tried too,
    and the one whose backtest on this history is best is used."""
    values = [float(max(0, v)) for v in history]
    if not any(values[-WEEK:]):  # a smoother only decays: a week without any use is no use
        return Projection([0.0] * (days + 1), 0.0, False)
    smoother, best = _run(values, first_weekday, MODELS[0])
    if len(values) >= PATTERN_MIN_DAYS:
        for model in MODELS[1:]:
            candidate, error = _run(values, first_weekday, model)
            if error < best:
                smoother, best = candidate, error
    today = (first_weekday + len(values)) % WEEK
    rates = [max(0.0, smoother.predict(ahead + 1, (today + ahead) % WEEK)) for ahead in range(days + 1)]
    burn = sum(rates[:WEEK]) / WEEK
    return Projection(rates, burn, smoother.pattern)


def _quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile, interpolated between the closest ranks."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _spread(history: Sequence[int]) -> tuple[float, float]:
    """A low and a high daily rate from recent days: the LOW and HIGH quantiles of the 7-day
    averages of the last SPREAD_DAYS days (of single days while there is less than a week). A
    week's average, not a day's: a weekday peak is not a rate that lasts a month."""
    recent = [float(max(0, v)) for v in history[-SPREAD_DAYS:]]
    if len(recent) < WEEK:
        windows = recent
    else:
        windows = [sum(recent[i : i + WEEK]) / WEEK for i in range(len(recent) - WEEK + 1)]
    return _quantile(windows, LOW_QUANTILE), _quantile(windows, HIGH_QUANTILE)


def _midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


def _walk(
    rates: Sequence[float], start: float, inflows: Sequence[Inflow], now: datetime, below: float
) -> datetime | None:
    """When a balance of ``start`` at ``now``, spent at ``rates`` per day (evenly within each
    UTC day, so the rest of today at ``rates[0]``'s pace) and raised by ``inflows``, first
    reaches ``below``; None when not within HORIZON_DAYS."""
    end = now + timedelta(days=HORIZON_DAYS)
    arrivals = sorted((i for i in inflows if i.at > now), key=lambda i: i.at)
    balance = start
    if balance <= below:
        return now
    moment = now
    day = 0
    midnight = _midnight(now)
    while moment < end and day < len(rates):
        segment_end = min(midnight + timedelta(days=day + 1), end)
        per_second = rates[day] / 86_400
        while arrivals and arrivals[0].at <= segment_end:
            arrival = arrivals.pop(0)
            crossing = _cross(balance, per_second, moment, arrival.at, below)
            if crossing is not None:
                return crossing
            balance -= per_second * (arrival.at - moment).total_seconds()
            balance += arrival.tokens
            moment = arrival.at
        crossing = _cross(balance, per_second, moment, segment_end, below)
        if crossing is not None:
            return crossing
        balance -= per_second * (segment_end - moment).total_seconds()
        moment = segment_end
        day += 1
    return None


def _cross(
    balance: float, per_second: float, start: datetime, end: datetime, below: float
) -> datetime | None:
    if per_second <= 0:
        return None
    seconds = (balance - below) / per_second
    if seconds > (end - start).total_seconds():
        return None
    return start + timedelta(seconds=max(0.0, seconds))


def _scaled(rates: Sequence[float], burn: float, target: float) -> list[float]:
    """``rates`` with their average over a week moved to ``target`` (their shape kept)."""
    if burn > 0:
        return [r * target / burn for r in rates]
    return [target] * len(rates)


def _amount(value: float) -> str:
    if value >= 100:
        return f"{round(value):,}"
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.1f}".removesuffix(".0")


def _day(moment: datetime, now: datetime) -> str:
    moment = moment.astimezone(UTC)
    text = f"{moment:%b} {moment.day}"
    return text if moment.year == now.astimezone(UTC).year else f"{text}, {moment.year}"


def forecast(
    history: Sequence[int],
    *,
    first_weekday: int,
    today_so_far: int,
    balance: int,
    threshold: int | None,
    inflows: Sequence[Inflow] = (),
    now: datetime,
) -> Forecast:
    """The forecast from ``history`` (completed days since the first consumption, at most
    HORIZON_DAYS, oldest first, the last one yesterday), what was consumed so far today, the
    available balance, the threshold to watch and the tokens known to be arriving."""
    days = len(history)
    recent = [max(0, v) for v in history]
    average_7d = sum(recent[-WEEK:]) / min(WEEK, days) if days else 0.0
    average_30d = sum(recent[-30:]) / min(30, days) if days else 0.0
    projection = project(history, first_weekday)
    rates, burn = projection.rates, projection.burn_rate
    low, high = _spread(history)
    from_today = burn <= 0 and today_so_far > 0
    if from_today:
        # No history, or none in the last week, but some use today: today's pace, not
        # counting the first hours (a start is not a day).
        elapsed = (now - _midnight(now)).total_seconds() / 86_400
        burn = today_so_far / max(elapsed, 0.25)
        rates = [burn] * (HORIZON_DAYS + 1)
    if burn <= 0:
        low = high = 0.0
    high, low = max(high, burn), min(low, burn)

    arriving = [i for i in inflows if i.tokens > 0]
    start = balance + sum(i.tokens for i in arriving if i.at <= now)
    consuming = burn > 0
    depletion = _walk(rates, start, arriving, now, 0) if consuming else None
    earliest = _walk(_scaled(rates, burn, high), start, arriving, now, 0) if consuming else None
    latest = _walk(_scaled(rates, burn, low), start, arriving, now, 0) if consuming and low > 0 else None
    crossing = None
    if threshold is not None:
        crossing = (
            now
            if start < threshold
            else (_walk(rates, start, arriving, now, threshold) if consuming else None)
        )
    days_left = None if depletion is None else (depletion - now).total_seconds() / 86_400

    cover_until = now + timedelta(days=COVER_DAYS)
    covered = start + sum(i.tokens for i in arriving if now < i.at <= cover_until)
    needed = math.ceil(high * COVER_DAYS - covered) if consuming else None
    enough = days >= MIN_HISTORY_DAYS
    return Forecast(
        enough_history=enough,
        history_days=days,
        burn_rate_per_day=burn,
        average_daily_7d=average_7d,
        average_daily_30d=average_30d,
        threshold_crossing_at=crossing,
        depletion_at=depletion,
        depletion_earliest=earliest,
        depletion_latest=latest,
        days_left=days_left,
        tokens_needed=needed if needed is not None and needed > 0 else None,
        high_rate=high,
        explanation=_explain(
            days, from_today, burn, projection.weekly_pattern, depletion, earliest, latest, arriving, now
        ),
    )


def _explain(
    days: int,
    from_today: bool,
    burn: float,
    weekly: bool,
    depletion: datetime | None,
    earliest: datetime | None,
    latest: datetime | None,
    inflows: Sequence[Inflow],
    now: datetime,
) -> str:
    if burn <= 0:
        if days == 0:
            return "no consumption yet, so nothing to forecast"
        return "no consumption in the last 7 days, so the balance is not running out"
    pace = f"about {_amount(burn)} tokens/day"
    if from_today:
        rate = f"{pace} at today's pace (too little history to be sure)"
    elif days < MIN_HISTORY_DAYS:
        rate = f"{pace} over only {days} day{'s' if days > 1 else ''} (too little history to be sure)"
    else:
        rate = f"{pace} over the last {days} days" + (", following a weekly pattern" if weekly else "")
    if depletion is None:
        outlook = f"lasts beyond {HORIZON_DAYS} days"
    elif depletion <= now:
        outlook = "no tokens left"
    else:
        outlook = f"runs out around {_day(depletion, now)}"
        if (earliest is not None and earliest < depletion) or latest != depletion:
            low = _day(earliest or depletion, now)
            high = _day(latest, now) if latest is not None else f"beyond {HORIZON_DAYS} days"
            if low != high:
                outlook += f" (between {low} and {high})"
    counted = sum(i.tokens for i in inflows)
    if counted:
        outlook += f", counting {counted:,} tokens on the way"
    return f"{rate}; {outlook}"


def buyable(
    needed: int, *, packages: Sequence[int], tiers: Sequence[tuple[int, int]], custom: tuple[int, int]
) -> int:
    """``needed`` rounded up to what one purchase can buy: the smallest package (``packages``:
    their token counts) that covers it, else a custom amount within ``custom`` (min, max) that a
    volume tier (``tiers``: min tokens and unit price) prices within one payment, else
    ``needed`` itself (more than one purchase buys it)."""
    covering = [tokens for tokens in packages if tokens >= needed]
    if covering:
        return min(covering)
    amount = max(needed, custom[0])
    prices = [price for least, price in sorted(tiers) if least <= amount]
    if amount <= custom[1] and prices and amount * prices[-1] <= MAX_AMOUNT_MINOR:
        return amount
    return needed


# ---------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Usage:
    """What a forecast reads of one wallet, at ``now``."""

    now: datetime
    consumed: dict[date, int]  # completed days with consumption, within the days read
    today_so_far: int
    first_day: date | None  # of the wallet's first consumption (within the days kept)
    balance: int
    threshold: int | None
    inflows: list[Inflow]
    packages: list[int]
    tiers: list[tuple[int, int]]
    unlimited: bool = False  # an unlimited plan covers consumption: nothing runs out

    @property
    def today(self) -> date:
        return self.now.astimezone(UTC).date()

    def daily(self, days: int) -> list[tuple[date, int]]:
        """The last ``days`` days, oldest first, today (so far) last; a day's net below zero
        (refunds outweighing use) shows as zero."""
        today = self.today
        out = [
            (day, max(0, self.consumed.get(day, 0)))
            for day in (today - timedelta(days=back) for back in range(days - 1, 0, -1))
        ]
        return [*out, (today, max(0, self.today_so_far))]

    def history(self) -> list[int]:
        """Completed days from the first consumption (at most HORIZON_DAYS ago) to yesterday."""
        if self.first_day is None or self.first_day >= self.today:
            return []
        start = max(self.first_day, self.today - timedelta(days=HORIZON_DAYS))
        count = (self.today - start).days
        return [self.consumed.get(start + timedelta(days=i), 0) for i in range(count)]


# The wallet, its usage rows and marks, the thresholds, the top-up in flight and what can be
# bought: one statement, each part an indexed lookup (the days: at most `days` rows of the
# primary key; packages and tiers: the catalogue, a handful of rows).
_READ = """
SELECT w.organization_id, w.balance, w.lifetime_consumed, w.entry_seq,
       coalesce(m.through_seq, 0) AS through_seq, coalesce(m.consumed_through, 0) AS consumed_through,
       (SELECT through_day FROM wallet_usage_closed) AS closed_through,
       (SELECT min(day) FROM wallet_usage_days d WHERE d.wallet_id = w.id) AS first_day,
       (SELECT array_agg(day ORDER BY day) FROM wallet_usage_days d
         WHERE d.wallet_id = w.id AND d.day >= $2) AS days,
       (SELECT array_agg(consumed ORDER BY day) FROM wallet_usage_days d
         WHERE d.wallet_id = w.id AND d.day >= $2) AS consumed,
       (SELECT p.threshold FROM auto_top_up_policies p
         WHERE p.organization_id = w.organization_id AND p.enabled) AS top_up_threshold,
       (SELECT max(a.threshold) FROM balance_alerts a
         WHERE a.organization_id = w.organization_id AND a.kind = 'low') AS alert_threshold,
       (SELECT sum(u.tokens)::bigint FROM purchases u WHERE u.organization_id = w.organization_id
           AND u.method = 'auto_top_up' AND u.status = 'pending') AS in_flight,
       (SELECT array_agg(tokens) FROM token_packages WHERE active) AS packages,
       (SELECT array_agg(min_tokens ORDER BY min_tokens) FROM price_tiers WHERE currency = $3) AS tier_tokens,
       (SELECT array_agg(unit_price_minor ORDER BY min_tokens) FROM price_tiers WHERE currency = $3)
         AS tier_prices
FROM wallets w LEFT JOIN wallet_usage_marks m ON m.wallet_id = w.id
WHERE w.id = $1
"""

# Entries the duty has not counted yet, by day: read only while the duty is behind (before
# its first run, or when a day was not closed yet), so a read stays exact meanwhile.
_UNCOUNTED = """
SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
       sum(CASE kind WHEN 'capture' THEN -held_change ELSE -amount END)::bigint AS consumed
FROM ledger_entries
WHERE wallet_id = $1 AND seq > $2 AND seq <= $3 AND kind = ANY($4::text[])
GROUP BY 1
"""


def check_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"days must be between 1 and {MAX_DAYS}", field="days")
    return days


async def upcoming_subscription_grants(
    connection: Any, organization_id: uuid.UUID, now: datetime
) -> tuple[list[Inflow], bool]:
    """The renewals of the organization's subscription within the horizon, each an inflow of
    the plan's tokens, and whether an unlimited plan covers consumption (then nothing runs
    out)."""
    outlook = await subscriptions.outlook(connection, organization_id, now, timedelta(days=HORIZON_DAYS))
    return [Inflow(at, tokens, "subscription grant") for at, tokens in outlook.grants], outlook.unlimited


async def read_usage(
    connection: Any,
    wallet_id: uuid.UUID,
    *,
    now: datetime,
    days: int = HORIZON_DAYS,
    currency: str,
) -> Usage:
    """The wallet's usage over the last ``days`` days (today included), on an asyncpg
    connection: one statement, and a second only while the ``usage.days`` duty is behind."""
    check_days(days)
    today = now.astimezone(UTC).date()
    since = today - timedelta(days=max(days, HORIZON_DAYS + 1))
    row = await connection.fetchrow(_READ, wallet_id, since, currency)
    if row is None:
        raise NotFound("wallet not found")
    consumed = dict(zip(row["days"] or [], row["consumed"] or [], strict=True))
    first_day: date | None = row["first_day"]
    today_so_far = row["lifetime_consumed"] - row["consumed_through"]
    closed = row["closed_through"]
    if row["entry_seq"] > row["through_seq"] and (closed is None or closed < today - timedelta(days=1)):
        uncounted = await connection.fetch(
            _UNCOUNTED, wallet_id, row["through_seq"], row["entry_seq"], CONSUMED_KINDS
        )
        today_so_far = 0
        for entry in uncounted:
            if entry["day"] >= today:
                today_so_far += entry["consumed"]
            else:
                consumed[entry["day"]] = consumed.get(entry["day"], 0) + entry["consumed"]
                first_day = entry["day"] if first_day is None else min(first_day, entry["day"])
    if first_day is None and today_so_far:
        first_day = today
    policy_threshold = row["top_up_threshold"]
    inflows = [Inflow(now, row["in_flight"], "top-up in flight")] if row["in_flight"] else []
    grants, unlimited = await upcoming_subscription_grants(connection, row["organization_id"], now)
    inflows += grants
    return Usage(
        now=now,
        consumed=consumed,
        today_so_far=today_so_far,
        first_day=first_day,
        balance=row["balance"],
        threshold=policy_threshold if policy_threshold is not None else row["alert_threshold"],
        inflows=inflows,
        unlimited=unlimited,
        packages=list(row["packages"] or []),
        tiers=list(zip(row["tier_tokens"] or [], row["tier_prices"] or [], strict=True)),
    )


def forecast_of(usage: Usage, *, custom: tuple[int, int]) -> tuple[Forecast, int | None]:
    """The forecast of a wallet's usage, and its suggested top-up rounded up to what can be
    bought (None when nothing is needed)."""
    history = usage.history()
    start = usage.today - timedelta(days=len(history))
    result = forecast(
        history,
        first_weekday=start.weekday(),
        today_so_far=usage.today_so_far,
        balance=usage.balance,
        threshold=usage.threshold,
        inflows=usage.inflows,
        now=usage.now,
    )
    if usage.unlimited:
        result = replace(
            result,
            threshold_crossing_at=None,
            depletion_at=None,
            depletion_earliest=None,
            depletion_latest=None,
            days_left=None,
            tokens_needed=None,
            explanation="consumption is covered by the organization's unlimited plan: nothing runs out",
        )
    needed = result.tokens_needed
    suggestion = None
    if needed is not None:
        suggestion = buyable(needed, packages=usage.packages, tiers=usage.tiers, custom=custom)
    return result, suggestion


# ---------------------------------------------------------------- the duty

#: Completed days kept in ``wallet_usage_days``: more than ``daily`` shows.
KEEP_DAYS = 400
#: Wallets counted per statement (and transaction) of a run.
BATCH = 500

# One batch: the next BATCH wallets (by id, after $1) with entries the marks have not counted;
# their consumption entries past the mark, one range of the (wallet_id, seq) key per wallet
# (the cost is the entries since the last run, not the ledger's size); each wallet counted up
# to its first consumption of today ($3, the run's midnight), so an entry written before
# midnight but committed after one of today's is counted by the next run, never twice; the
# counted entries added to their days' rows (those of the last KEEP_DAYS days, from $4) and to
# the wallet's mark; rows older than that removed.
_RECORD = """
WITH todo AS (
  SELECT w.id AS wallet_id, w.entry_seq, coalesce(m.through_seq, 0) AS from_seq
  FROM wallets w LEFT JOIN wallet_usage_marks m ON m.wallet_id = w.id
  WHERE w.id > $1 AND w.entry_seq > coalesce(m.through_seq, 0)
  ORDER BY w.id LIMIT $2
), moves AS (
  SELECT t.wallet_id, e.seq, e.created_at, e.consumed
  FROM todo t CROSS JOIN LATERAL (
    SELECT seq, created_at, CASE kind WHEN 'capture' THEN -held_change ELSE -amount END AS consumed
    FROM ledger_entries
    WHERE wallet_id = t.wallet_id AND seq > t.from_seq AND seq <= t.entry_seq AND kind = ANY($5::text[])
  ) e
), cut AS (
  SELECT t.wallet_id, coalesce(min(v.seq) FILTER (WHERE v.created_at >= $3) - 1, t.entry_seq) AS to_seq
  FROM todo t LEFT JOIN moves v ON v.wallet_id = t.wallet_id
  GROUP BY t.wallet_id, t.entry_seq
), counted AS (
  SELECT v.wallet_id, v.created_at, v.consumed
  FROM moves v JOIN cut c ON c.wallet_id = v.wallet_id AND v.seq <= c.to_seq
), days AS (
  INSERT INTO wallet_usage_days AS d (wallet_id, day, consumed)
  SELECT wallet_id, (created_at AT TIME ZONE 'UTC')::date, sum(consumed)
  FROM counted WHERE created_at >= $4
  GROUP BY 1, 2
  ON CONFLICT (wallet_id, day) DO UPDATE SET consumed = d.consumed + EXCLUDED.consumed
), pruned AS (
  DELETE FROM wallet_usage_days d USING cut c
  WHERE d.wallet_id = c.wallet_id AND d.day < ($4 AT TIME ZONE 'UTC')::date
)
INSERT INTO wallet_usage_marks AS m (wallet_id, through_seq, consumed_through, updated_at)
SELECT c.wallet_id, c.to_seq, coalesce(sum(k.consumed), 0), $6
FROM cut c LEFT JOIN counted k ON k.wallet_id = c.wallet_id
GROUP BY c.wallet_id, c.to_seq
ON CONFLICT (wallet_id) DO UPDATE SET
  through_seq = EXCLUDED.through_seq,
  consumed_through = m.consumed_through + EXCLUDED.consumed_through,
  updated_at = EXCLUDED.updated_at
RETURNING wallet_id
"""


async def record_usage_days(driver: Any, now: datetime) -> str:
    """Counts every wallet's consumption of the completed UTC days before ``now`` into
    ``wallet_usage_days`` (the ``usage.days`` duty, once a day after midnight): the days since
    its last run, so missed days are caught up, and on its first run each wallet's history
    from the ledger. Idempotent: what is counted is marked in the same transaction, so a
    second run of the same day finds nothing new. Each batch locks ``wallet_usage_closed``,
    so two runs never count the same entries."""
    midnight = _midnight(now)
    keep_from = midnight - timedelta(days=KEEP_DAYS)
    after = uuid.UUID(int=0)
    wallets = 0
    async with driver.acquire() as connection:
        while True:
            async with connection.transaction():
                await connection.execute("SELECT 1 FROM wallet_usage_closed FOR UPDATE")
                done = await connection.fetch(_RECORD, after, BATCH, midnight, keep_from, CONSUMED_KINDS, now)
            if not done:
                break
            wallets += len(done)
            after = max(r["wallet_id"] for r in done)
        closed = midnight.date() - timedelta(days=1)
        await connection.execute(
            "UPDATE wallet_usage_closed SET through_day = greatest(through_day, $1)", closed
        )
    return f"days closed through {closed.isoformat()}; {wallets} wallets had new entries"
