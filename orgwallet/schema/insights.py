"""GraphQL types for seeing where an organization stands: the usage forecast of its wallet."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Self

import strawberry

from orgwallet.schema.context import Info
from orgwallet.schema.scalars import BigInt
from orgwallet.services import forecast as forecasting

# ---------------------------------------------------------------- forecast


@strawberry.type
class DailyUsage:
    date: date
    consumed: BigInt


@strawberry.type(description="Where the wallet's balance is heading, from its daily consumption.")
class UsageForecast:
    enough_history: bool = strawberry.field(
        description=f"False with fewer than {forecasting.MIN_HISTORY_DAYS} days since the first consumption."
    )
    burn_rate_per_day: float = strawberry.field(description="Smoothed tokens per day.")
    average_daily_7d: float
    average_daily_30d: float
    threshold_crossing_at: datetime | None = strawberry.field(
        description="When the balance is expected to fall below the automatic top-up threshold "
        "(or else the highest balance alert); null: no threshold, or not within the horizon."
    )
    depletion_at: datetime | None = strawberry.field(
        description=f"When the balance is expected to reach zero; null: not within "
        f"{forecasting.HORIZON_DAYS} days, or no consumption."
    )
    depletion_earliest: datetime | None = strawberry.field(description="At a high burn rate.")
    depletion_latest: datetime | None = strawberry.field(description="At a low burn rate.")
    days_left: float | None
    suggested_top_up_tokens: BigInt | None = strawberry.field(
        description="Enough for the next 30 days at a high burn rate, less what the balance covers, "
        "rounded up to what can be bought; null when nothing is needed."
    )
    explanation: str
    _usage: strawberry.Private[forecasting.Usage]
    _wallet_id: strawberry.Private[uuid.UUID]

    @classmethod
    async def load(cls, info: Info, wallet_id: uuid.UUID) -> Self:
        settings = info.context.settings
        async with info.context.connection() as connection:
            usage = await forecasting.read_usage(
                connection, wallet_id, now=info.context.runtime.clock.now(), currency=settings.currency
            )
        result, suggestion = forecasting.forecast_of(
            usage, custom=(settings.min_custom_tokens, settings.max_custom_tokens)
        )
        return cls(
            enough_history=result.enough_history,
            burn_rate_per_day=result.burn_rate_per_day,
            average_daily_7d=result.average_daily_7d,
            average_daily_30d=result.average_daily_30d,
            threshold_crossing_at=result.threshold_crossing_at,
            depletion_at=result.depletion_at,
            depletion_earliest=result.depletion_earliest,
            depletion_latest=result.depletion_latest,
            days_left=result.days_left,
            suggested_top_up_tokens=None if suggestion is None else BigInt(suggestion),
            explanation=result.explanation,
            _usage=usage,
            _wallet_id=wallet_id,
        )

    @strawberry.field(description="Tokens consumed per UTC day, oldest first, today (so far) last.")
    async def daily(self, info: Info, days: int | None = 30) -> list[DailyUsage]:
        count = forecasting.check_days(30 if days is None else days)
        usage = self._usage
        if count > forecasting.HORIZON_DAYS:  # more days than the forecast read
            async with info.context.connection() as connection:
                usage = await forecasting.read_usage(
                    connection,
                    self._wallet_id,
                    now=usage.now,
                    days=count,
                    currency=info.context.settings.currency,
                )
        return [DailyUsage(date=day, consumed=BigInt(consumed)) for day, consumed in usage.daily(count)]
