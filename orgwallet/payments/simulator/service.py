"""The offline Stripe as a process runs it: the account (``core``), its state in PostgreSQL
(``store``), the webhook dispatcher (``delivery``), and the secret key it accepts.

Python callers (tests) use the async methods here; each runs as one section. The app's
requests run as sections too (``app``).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from orgwallet.payments.gateway import STRIPE_API_VERSION
from orgwallet.payments.simulator.billing import PAYMENT_RETRY_DAYS, UPCOMING_INVOICE_DAYS
from orgwallet.payments.simulator.core import Account
from orgwallet.payments.simulator.delivery import DEFAULT_RETRY_DELAYS, WebhookDispatcher, WebhookTarget
from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.objects import JsonObject
from orgwallet.payments.simulator.store import Section, Store

P = ParamSpec("P")
T = TypeVar("T")


class Simulator:
    """One simulated Stripe account, served by this process.

    ``secret_key``: the only API key accepted (this installation's). ``database_url``: where
    the state is kept (a SQLAlchemy or asyncpg URL). ``webhook_target``: where events are
    delivered (see ``delivery``); may be set later. ``enabled_events``: see ``core.Account``.
    ``upcoming_invoice_days``: how long before a renewal ``invoice.upcoming`` is sent (0: never);
    ``payment_retry_days``: the days between a failed renewal charge and its next retry
    (``billing``).
    """

    def __init__(
        self,
        *,
        secret_key: str,
        database_url: str,
        webhook_secret: str,
        public_base_url: str,
        deliver: WebhookTarget | None = None,
        enabled_events: Collection[str] | None = None,
        api_version: str = STRIPE_API_VERSION,
        clock: Callable[[], float] = time.time,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        upcoming_invoice_days: int = UPCOMING_INVOICE_DAYS,
        payment_retry_days: Sequence[int] = PAYMENT_RETRY_DAYS,
    ) -> None:
        self.secret_key = secret_key
        self.store = Store(database_url)
        self.webhooks = WebhookDispatcher(
            secret=webhook_secret,
            target=deliver,
            clock=clock,
            retry_delays=retry_delays,
            journal=self.store.record_attempt,
        )
        self.account = Account(
            public_base_url=public_base_url,
            delivering=lambda: self.webhooks.target is not None,
            enabled_events=enabled_events,
            api_version=api_version,
            clock=clock,
        )
        self.account.upcoming_invoice_days = upcoming_invoice_days
        self.account.payment_retry_days = tuple(payment_retry_days)

    @property
    def public_base_url(self) -> str:
        return self.account.public_base_url

    @property
    def webhook_target(self) -> WebhookTarget | None:
        return self.webhooks.target

    @webhook_target.setter
    def webhook_target(self, target: WebhookTarget | None) -> None:
        self.webhooks.target = target

    @property
    def enabled_events(self) -> frozenset[str] | None:
        return self.account.enabled_events

    @enabled_events.setter
    def enabled_events(self, types: Collection[str] | None) -> None:
        self.account.enabled_events = frozenset(types) if types is not None else None

    def refusal(self, authorization: str) -> StripeApiError | None:
        """Why a request with this ``Authorization`` header is refused (Stripe's 401), or None
        when it carries this simulator's secret key."""
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return StripeApiError(
                401,
                "You did not provide an API key. "
                "Provide it in the Authorization header (Bearer sk_test_...).",
            )
        if not hmac.compare_digest(key.encode(), self.secret_key.encode()):
            shown = f"{key[:8]}****{key[-4:]}" if len(key) > 12 else "****"
            return StripeApiError(401, f"Invalid API Key provided: {shown}")
        return None

    # -- running ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the store and sends the deliveries a process that died left pending (the
        first section of a process does it: this runs one now rather than at the first call)."""
        async with self.section():
            pass

    @asynccontextmanager
    async def section(self) -> AsyncIterator[Section]:
        """The account's operations may be called in the block; what they did is committed
        when it ends, and then the events they emitted are sent."""
        async with self.store.section(self.account) as section:
            self.account.run_due()  # renewals, retries, ... come due on the simulator's own clock
            yield section
        for send in section.sends:
            self.webhooks.schedule(
                send.event,
                secret=send.secret,
                timestamp=send.timestamp,
                delivery_id=send.delivery_id,
                attempts_made=send.attempts_made,
            )

    async def run(self, operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``operation(*args, **kwargs)``, one of the account's, as one section. A Stripe error
        it raises is raised once what it did is committed (Stripe keeps a declined charge)."""
        failure: StripeApiError | None = None
        async with self.section():
            try:
                result = operation(*args, **kwargs)
            except StripeApiError as error:
                failure = error
        if failure is not None:
            raise failure
        return result

    async def drain(self, max_wait: float = 10.0) -> None:
        """Wait until every delivery this process is sending (retries included) is done;
        ``TimeoutError`` after ``max_wait`` seconds."""
        await self.webhooks.drain(max_wait)

    async def close(self) -> None:
        """Stops sending (what is pending stays in the store, for the next process) and closes
        the store's connections."""
        await self.webhooks.cancel_all()
        await self.store.close()

    # -- for Python callers ----------------------------------------------------------------------

    async def events(self, event_type: str | None = None) -> list[JsonObject]:
        """Events in the order they happened."""
        return await self.run(self.account.events, event_type)

    async def redeliver(
        self, event_id: str, *, times: int = 1, secret: str | None = None, timestamp: int | None = None
    ) -> JsonObject:
        """Deliver an event again, ``times`` copies at once; ``secret``/``timestamp`` sign
        it otherwise (deliveries that must fail)."""
        return await self.run(
            self.account.redeliver, event_id, times=times, secret=secret, timestamp=timestamp
        )

    async def settle_async_payment(self, session_id: str, *, succeeded: bool) -> JsonObject:
        return await self.run(self.account.settle_async_payment, session_id, succeeded=succeeded)

    async def open_dispute(self, params: dict[str, Any]) -> JsonObject:
        return await self.run(self.account.open_dispute, params)

    async def close_dispute(self, dispute_id: str, *, won: bool) -> JsonObject:
        return await self.run(self.account.close_dispute, dispute_id, won=won)

    async def checkout_line_items(self, session_id: str) -> JsonObject:
        return await self.run(self.account.checkout_line_items, session_id)

    async def expand(self, obj: JsonObject, paths: Sequence[str]) -> JsonObject:
        return await self.run(self.account.expand, obj, paths)
