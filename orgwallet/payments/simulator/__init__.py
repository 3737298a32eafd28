"""An offline Stripe: the subset of Stripe's API this project calls, its hosted Checkout page,
and signed webhooks, served by a FastAPI sub-application.

Mounting it in the main app (only when no real ``STRIPE_SECRET_KEY`` is configured)::

    import httpx
    from orgwallet.payments.gateway import StripeGateway, TransportHTTPClient
    from orgwallet.payments.simulator import SIMULATOR_SECRET_KEY, create_simulator, http_webhook_target

    app = FastAPI(...)
    # Webhooks go to the app's own route in-process (or over HTTP with a plain AsyncClient).
    internal = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orgwallet.internal")
    stripe_app, simulator = create_simulator(
        webhook_secret=webhook_secret,
        public_base_url=f"{public_url}/_stripe",  # what the browser opens: <this>/checkout/cs_...
        deliver=http_webhook_target(internal, "/webhooks/stripe"),
    )
    app.mount("/_stripe", stripe_app)
    gateway = StripeGateway(
        SIMULATOR_SECRET_KEY, webhook_secret,
        api_base="http://orgwallet.internal/_stripe",
        http_client=TransportHTTPClient(httpx.ASGITransport(app=app)),
    )
    # on shutdown: await simulator.webhooks.cancel_all(); await internal.aclose(); await gateway.close()

State is in memory: run the server with ONE worker while the simulator is mounted.

What it serves (relative to the mount point):

- ``/v1/...``: customers (create, retrieve, update incl. ``invoice_settings.default_payment_method``,
  list payment methods), checkout sessions (create in payment and setup modes, retrieve, line
  items, expire), payment intents (create with ``confirm``/``off_session``, retrieve, confirm),
  payment methods (list by customer, retrieve), charges, refunds (create, retrieve), disputes,
  setup intents, events (list, retrieve). Form-encoded as the SDK sends them; Bearer
  ``sk_test_...`` required; ``Idempotency-Key`` honoured (same key and parameters: the first
  answer again, with ``Idempotent-Replayed: true``; other parameters: ``idempotency_error``);
  ``expand[]`` for id fields; Stripe's error shape and statuses.
- ``/checkout/{cs_id}``: the hosted page (Pay, Decline, Pay by bank debit, Cancel; test cards
  in ``cards``), ``/receipts/{ch_id}``: the receipt behind ``charge.receipt_url``.
- ``/test/...``: JSON controls (see ``app._add_test_routes``): pay/decline a session, settle an
  async payment, expire a session, refund, open and close a dispute, save a test card on a
  customer, deliver an event again (N copies at once, or signed with another secret or
  timestamp), list events with their delivery attempts, drain deliveries.

Events (``evt_``) are emitted for what happens (``checkout.session.completed`` /
``async_payment_succeeded`` / ``async_payment_failed`` / ``expired``,
``payment_intent.succeeded`` / ``payment_failed`` / ``processing`` / ``canceled`` / ``created``,
``charge.succeeded`` / ``failed`` / ``refunded``, ``refund.created``, ``charge.dispute.created`` /
``closed`` / ``funds_withdrawn`` / ``funds_reinstated``, ``setup_intent.succeeded`` /
``setup_failed``, ``customer.created`` / ``updated``, ``payment_method.attached``) and delivered,
signed, by background tasks with bounded retries (``delivery``). In tests, drive the same
operations as Python methods on ``Simulator`` and ``await simulator.drain()`` before asserting.
"""

from orgwallet.payments.simulator.app import create_simulator
from orgwallet.payments.simulator.core import JsonObject, Simulator
from orgwallet.payments.simulator.delivery import (
    DeliveryAttempt,
    WebhookTarget,
    http_webhook_target,
    stripe_signature,
)
from orgwallet.payments.simulator.errors import StripeApiError

SIMULATOR_SECRET_KEY = "sk_test_orgwallet_simulator"  # noqa: S105  # a test-mode key the simulator accepts

__all__ = [
    "SIMULATOR_SECRET_KEY",
    "DeliveryAttempt",
    "JsonObject",
    "Simulator",
    "StripeApiError",
    "WebhookTarget",
    "create_simulator",
    "http_webhook_target",
    "stripe_signature",
]
