"""Which Stripe a process talks to: the real one when ``STRIPE_SECRET_KEY`` is configured,
else the offline simulator, mounted in the web app itself at ``/_stripe``.

With the simulator, the web app's SDK reaches it in-process (an ASGI transport into the app,
no port needed), webhooks go to the app's own ``/webhooks/stripe`` the same way, and the
checkout pages it hands out live under ``<public_url>/_stripe`` for a browser. It signs with
the configured ``STRIPE_WEBHOOK_SECRET`` or a secret generated once under the home directory,
accepts only the secret key generated there (``Settings.simulator_secret_key``), and keeps its
state in the app's database (a schema of its own), so every server process shares it. A
process without the app (``orgwallet worker``) reaches a server's simulator over HTTP, with
the same key (same home directory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from orgwallet.config import Settings
from orgwallet.payments.gateway import StripeGateway, TransportHTTPClient
from orgwallet.payments.simulator import Simulator, create_simulator, http_webhook_target

log = logging.getLogger(__name__)

SIMULATOR_MOUNT = "/_stripe"
#: The in-process base address (never resolved: the ASGI transport carries the requests).
INTERNAL_BASE_URL = "http://orgwallet.internal"


@dataclass
class StripeConnection:
    gateway: StripeGateway
    simulator: Simulator | None = None
    _internal: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """At the app's start-up: the simulator sends what a process that died left pending."""
        if self.simulator is not None:
            await self.simulator.start()

    async def close(self) -> None:
        if self.simulator is not None:
            await self.simulator.close()
        if self._internal is not None:
            await self._internal.aclose()
        await self.gateway.close()


def connect_stripe(settings: Settings, app: FastAPI | None = None) -> StripeConnection:
    """The gateway for ``app``; mounts the simulator on it when no real key is configured.
    Without an app, the gateway of a worker: the simulator is the running server's."""
    if settings.stripe_secret_key:
        if not settings.stripe_webhook_secret:
            raise RuntimeError(
                "STRIPE_WEBHOOK_SECRET is required with STRIPE_SECRET_KEY: webhooks cannot be verified "
                "without it"
            )
        return StripeConnection(StripeGateway(settings.stripe_secret_key, settings.stripe_webhook_secret))

    secret = settings.webhook_secret
    key = settings.simulator_secret_key
    public_base_url = settings.public_url.rstrip("/") + SIMULATOR_MOUNT
    if app is None:
        return StripeConnection(StripeGateway(key, secret, api_base=public_base_url))
    if not settings.database_url:
        raise RuntimeError(
            "ORGWALLET_DATABASE_URL is not set: the offline Stripe simulator keeps its state there"
        )
    internal = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=INTERNAL_BASE_URL, timeout=60
    )
    stripe_app, simulator = create_simulator(
        secret_key=key,
        database_url=settings.database_url,
        webhook_secret=secret,
        public_base_url=public_base_url,
        deliver=http_webhook_target(internal, "/webhooks/stripe"),
    )
    app.mount(SIMULATOR_MOUNT, stripe_app)
    gateway = StripeGateway(
        key,
        secret,
        api_base=INTERNAL_BASE_URL + SIMULATOR_MOUNT,
        http_client=TransportHTTPClient(httpx.ASGITransport(app=app)),
    )
    log.info("no STRIPE_SECRET_KEY: the offline Stripe simulator serves %s", simulator.public_base_url)
    return StripeConnection(gateway, simulator, internal)
