"""Webhook delivery: Stripe's signature, background tasks, bounded retries, a record of attempts.

Every attempt is signed afresh, as Stripe does::

    Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

so ``stripe.Webhook.construct_event(body, header, secret)`` accepts it.

Where events go is a ``WebhookTarget``: an async callable taking the raw body and the headers
and returning the HTTP status the receiver answered. ``http_webhook_target(client, url)``
makes one from an ``httpx.AsyncClient`` (over the network, or in-process with
``httpx.ASGITransport``); tests can pass any recorder. A target that raises counts as a
connection error. Non-2xx answers and errors are retried after each of ``retry_delays``
seconds (so ``len(retry_delays) + 1`` attempts at most); every attempt is recorded, in
``attempts`` (this process's) and through the ``journal`` (the store's row of the delivery,
which another process resumes if this one dies before it is done).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

WebhookTarget = Callable[[bytes, Mapping[str, str]], Awaitable[int]]
#: Told of each attempt of a stored delivery: (its id, the attempt, whether it was the last).
Journal = Callable[[int, "DeliveryAttempt", bool], Awaitable[None]]

DEFAULT_RETRY_DELAYS: tuple[float, ...] = (0.2, 1.0, 5.0)
ATTEMPT_TIMEOUT_SECONDS = 30.0


def stripe_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header value for ``payload`` signed at ``timestamp``."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def encode_event(event: Mapping[str, Any]) -> bytes:
    # Stripe sends its events pretty-printed; receivers must verify the exact bytes.
    return json.dumps(event, indent=2).encode()


def http_webhook_target(client: httpx.AsyncClient, url: str) -> WebhookTarget:
    """Deliver by POSTing to ``url`` with ``client``."""

    async def deliver(payload: bytes, headers: Mapping[str, str]) -> int:
        response = await client.post(url, content=payload, headers=dict(headers))
        return response.status_code

    return deliver


@dataclass(frozen=True)
class DeliveryAttempt:
    event_id: str
    event_type: str
    attempt: int
    at: float
    status_code: int | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event_id,
            "type": self.event_type,
            "attempt": self.attempt,
            "at": self.at,
            "status_code": self.status_code,
            "error": self.error,
            "succeeded": self.succeeded,
        }


class WebhookDispatcher:
    def __init__(
        self,
        *,
        secret: str,
        target: WebhookTarget | None,
        clock: Callable[[], float],
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        attempt_timeout: float = ATTEMPT_TIMEOUT_SECONDS,
        journal: Journal | None = None,
    ) -> None:
        self.secret = secret
        self.target = target
        self.clock = clock
        self.retry_delays = tuple(retry_delays)
        self.attempt_timeout = attempt_timeout
        self.journal = journal
        self.attempts: list[DeliveryAttempt] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(
        self,
        event: Mapping[str, Any],
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        delivery_id: int | None = None,
        attempts_made: int = 0,
    ) -> None:
        """Deliver ``event`` in the background. ``secret`` and ``timestamp`` override the
        signature (tests use them to send deliveries that must be rejected). ``delivery_id``:
        the stored delivery, told of each attempt; ``attempts_made``: by a process before."""
        if self.target is None:
            return
        payload = encode_event(event)
        task = asyncio.get_running_loop().create_task(
            self._deliver(
                self.target,
                str(event["id"]),
                str(event["type"]),
                payload,
                secret or self.secret,
                timestamp,
                delivery_id,
                attempts_made,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, max_wait: float = 10.0) -> None:
        """Wait until every scheduled delivery, retries included, has finished."""
        async with asyncio.timeout(max_wait):
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _deliver(
        self,
        target: WebhookTarget,
        event_id: str,
        event_type: str,
        payload: bytes,
        secret: str,
        timestamp: int | None,
        delivery_id: int | None,
        attempts_made: int,
    ) -> None:
        delays = (*self.retry_delays, None)
        for attempt, delay in enumerate(delays, start=attempts_made + 1):
            now = self.clock()
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                "Stripe-Signature": stripe_signature(
                    payload, secret, timestamp if timestamp is not None else int(now)
                ),
            }
            status: int | None = None
            error: str | None = None
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    status = await target(payload, headers)
            except Exception as exc:  # a receiver that fails in any way is a failed attempt
                error = f"{type(exc).__name__}: {exc}"
            record = DeliveryAttempt(event_id, event_type, attempt, now, status, error)
            self.attempts.append(record)
            if self.journal is not None and delivery_id is not None:
                await self._write(delivery_id, record, last=record.succeeded or delay is None)
            if record.succeeded:
                return
            log.info("webhook %s (%s) attempt %d failed: %s", event_id, event_type, attempt, error or status)
            if delay is None:
                log.warning("webhook %s (%s) given up after %d attempts", event_id, event_type, attempt)
                return
            await asyncio.sleep(delay)

    async def _write(self, delivery_id: int, record: DeliveryAttempt, *, last: bool) -> None:
        assert self.journal is not None
        try:
            await self.journal(delivery_id, record, last)
        except Exception:  # the delivery goes on; a restart may send it once more
            log.warning("webhook %s: its delivery could not be recorded", record.event_id, exc_info=True)
