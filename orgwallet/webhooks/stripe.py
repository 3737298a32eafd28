"""``POST /webhooks/stripe``: Stripe's events, verified, stored once, handled once.

1. The signature is verified first (``Stripe-Signature`` against the webhook secret, 300 s
   tolerance). A delivery that fails (no or bad signature, stale timestamp, another secret,
   a body that is not an event) gets 400 and nothing is stored.
2. What the handler needs from Stripe is asked first, with no transaction open (its prefetch,
   ``handlers.PREFETCH``): a Stripe that hangs holds no connection and no lock.
3. In ONE transaction: the event is claimed under its id (insert on conflict, stamped
   ``handled_at``), handled, and its outcome written. A crash leaves both the event and its
   effect, or neither.
   The claim is ``INSERT ... ON CONFLICT (event_id) DO UPDATE ... WHERE handled_at IS NULL``:
   it returns the row when the insert created it, or when the stored row is one whose
   earlier handling failed (so Stripe's retry is handled, not swallowed as a duplicate);
   either way the row is locked until commit, so concurrent copies wait and then see it
   handled. A copy of a handled event answers 200 at once.
   Before that, a copy of an event already handled is answered from one indexed read on the
   driver's pool, without opening a transaction (a third of a burst can be such copies). A
   copy of an event still being handled is not "handled" yet: it goes on to the claim, waits
   for the lock, and then sees it handled.
4. Types without a handler are stored as handled (``ignored``) and answered 200.
5. A prefetch or a handler that fails leaves no effect here (the transaction rolls back), and
   the failure (error, attempt count) is written to the event's row in a separate
   transaction, left unhandled; the route answers 500 so that Stripe retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orgwallet import metrics
from orgwallet.db.engine import DriverPool, driver_connection, transaction
from orgwallet.payments.gateway import InvalidStripeWebhook, StripeGateway
from orgwallet.services.audit import request_id_var
from orgwallet.webhooks.handlers import (
    DEFAULT_GRACE,
    HANDLERS,
    PREFETCH,
    EventContext,
    Fetched,
    PrefetchContext,
)

log = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 2000

# The row is claimed already stamped handled, its outcome 'handling' until the handler's is
# written: all in the one transaction, so no other transaction ever sees 'handling', and the
# final update touches no indexed column (a HOT update; the partial index of unhandled events
# never gets an entry for an event handled at its first delivery).
_CLAIM = text(
    """
    INSERT INTO stripe_events AS e (event_id, type, livemode, payload, handled_at, outcome)
    VALUES (:event_id, :type, :livemode, CAST(:payload AS jsonb), now(), 'handling')
    ON CONFLICT (event_id) DO UPDATE SET attempts = e.attempts + 1, handled_at = now(), outcome = 'handling'
    WHERE e.handled_at IS NULL
    RETURNING e.attempts
    """
)
_ALREADY_HANDLED = (
    "SELECT EXISTS (SELECT 1 FROM stripe_events WHERE event_id = $1 AND handled_at IS NOT NULL)"
)
#: Sent on the driver: the claim has begun the transaction.
_HANDLED = "UPDATE stripe_events SET outcome = $2 WHERE event_id = $1"
_FAILED = text(
    """
    INSERT INTO stripe_events AS e (event_id, type, livemode, payload, error)
    VALUES (:event_id, :type, :livemode, CAST(:payload AS jsonb), :error)
    ON CONFLICT (event_id) DO UPDATE SET attempts = e.attempts + 1, error = EXCLUDED.error
    WHERE e.handled_at IS NULL
    """
)


def _row(event: dict[str, Any], payload: str) -> dict[str, Any]:
    return {
        "event_id": event["id"],
        "type": event["type"],
        "livemode": bool(event.get("livemode", False)),
        "payload": payload,
    }


def _type_label(event: dict[str, Any]) -> str:
    """The event's type as a metrics label: the types we handle, or ``other``."""
    return event["type"] if event["type"] in HANDLERS else "other"


def _object(event: dict[str, Any]) -> dict[str, Any] | None:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else None


async def handle_event(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    event: dict[str, Any],
    payload: str,
    now: datetime | None = None,
    grace: timedelta = DEFAULT_GRACE,
) -> tuple[int, str]:
    """Stores and handles one verified event: (HTTP status, outcome). ``now``: the runtime's
    clock (the machine's when not given); ``grace``: a past-due subscription's grace period.
    The event's id is the request id of what it writes (audit rows) and logs: the same
    whether Stripe delivered it or a retry handles it again."""
    request_id = request_id_var.set(str(event["id"]))
    try:
        status, outcome = await _handle_event(sessions, gateway, event, payload, now, grace)
    finally:
        request_id_var.reset(request_id)
    metrics.stripe_event(_type_label(event), outcome)
    return status, outcome


async def _handle_event(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    event: dict[str, Any],
    payload: str,
    now: datetime | None,
    grace: timedelta,
) -> tuple[int, str]:
    try:
        obj = _object(event)
        prefetch = PREFETCH.get(event["type"])
        fetched = Fetched()
        if prefetch is not None and obj is not None:
            fetched = await prefetch(PrefetchContext(sessions, gateway), obj)
        async with transaction(sessions) as session:
            claimed = (await session.execute(_CLAIM, _row(event, payload))).first()
            if claimed is None:
                return 200, "duplicate"
            handler = HANDLERS.get(event["type"])
            outcome = "ignored"
            if handler is not None and obj is not None:
                at = now or datetime.now(UTC)
                context = EventContext(session, event["id"], event["type"], fetched, at, grace)
                outcome = await handler(context, obj)
            await (await driver_connection(session)).execute(_HANDLED, event["id"], outcome)
        return 200, outcome
    except Exception as error:
        log.exception("Stripe event %s (%s) failed; Stripe will retry", event["id"], event["type"])
        message = f"{type(error).__name__}: {error}"[:MAX_ERROR_LENGTH]
        try:
            async with transaction(sessions) as session:
                await session.execute(_FAILED, _row(event, payload) | {"error": message})
        except Exception:
            log.exception("could not record the failure of Stripe event %s", event["id"])
        return 500, "failed"


def stripe_webhook_route(
    driver: DriverPool,
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    clock: Callable[[], datetime],
    grace: timedelta = DEFAULT_GRACE,
) -> Route:
    """The route, plain Starlette: it needs none of FastAPI's parameter machinery. ``clock``:
    the runtime's time, read per event (tests move it); ``grace``: the subscriptions' grace."""

    async def stripe_webhook(request: Request) -> Response:
        body = await request.body()
        try:
            # The verified bytes, read as plain JSON: what is stored and what handlers read.
            event = gateway.verify_event(body, request.headers.get("stripe-signature"))
        except (InvalidStripeWebhook, ValueError) as error:
            message = error.message if isinstance(error, InvalidStripeWebhook) else "the body is not JSON"
            log.info("rejected a Stripe webhook delivery: %s", message)
            metrics.stripe_event("unverified", "bad_signature")
            return JSONResponse({"error": message}, status_code=400)
        async with driver.acquire() as connection:
            handled = await connection.fetchval(_ALREADY_HANDLED, event["id"])
        if handled:
            metrics.stripe_event(_type_label(event), "duplicate")
            return JSONResponse({"received": True, "outcome": "duplicate"})
        status, outcome = await handle_event(sessions, gateway, event, body.decode(), clock(), grace)
        return JSONResponse({"received": status < 300, "outcome": outcome}, status_code=status)

    return Route("/webhooks/stripe", stripe_webhook, methods=["POST"], include_in_schema=False)
