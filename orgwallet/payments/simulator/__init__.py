"""An offline Stripe: the subset of Stripe's API this project calls, its hosted Checkout page,
and signed webhooks, served by a FastAPI sub-application, its state kept in PostgreSQL.

Mounting it in the main app (only when no real ``STRIPE_SECRET_KEY`` is configured)::

    import httpx
    from orgwallet.payments.gateway import StripeGateway, TransportHTTPClient
    from orgwallet.payments.simulator import create_simulator, http_webhook_target

    app = FastAPI(...)
    # Webhooks go to the app's own route in-process (or over HTTP with a plain AsyncClient).
    internal = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orgwallet.internal")
    stripe_app, simulator = create_simulator(
        secret_key=settings.simulator_secret_key,  # the only key it accepts
        database_url=settings.database_url,  # its own schema there, its own small pool
        webhook_secret=webhook_secret,
        public_base_url=f"{public_url}/_stripe",  # what the browser opens: <this>/checkout/cs_...
        deliver=http_webhook_target(internal, "/webhooks/stripe"),
    )
    app.mount("/_stripe", stripe_app)
    gateway = StripeGateway(
        settings.simulator_secret_key, webhook_secret,
        api_base="http://orgwallet.internal/_stripe",
        http_client=TransportHTTPClient(httpx.ASGITransport(app=app)),
    )
    # at start-up: await simulator.start(); on shutdown: await simulator.close()

State is in PostgreSQL (``store``: a schema ``stripe_simulator`` it creates itself): a restart
loses nothing (customers, saved cards, sessions, receipts, products, prices, subscriptions,
invoices, test clocks, events, deliveries not yet made), and several processes on one database
(uvicorn workers, servers) share one simulated account.

What it serves (relative to the mount point):

- ``/v1/...``: customers (create, with a ``test_clock`` or not, retrieve, update incl.
  ``invoice_settings.default_payment_method``, list payment methods), checkout sessions (create
  in payment, setup and subscription modes, retrieve, line items, expire), payment intents
  (create with ``confirm``/``off_session``, retrieve, confirm), payment methods (list by
  customer, retrieve), charges, refunds (create, retrieve), disputes, setup intents, events
  (list, retrieve); Stripe Billing (``billing``, where its rules are): products and prices
  (create, retrieve, update, list), subscriptions (create, retrieve, list, update: items with
  prorations, ``cancel_at_period_end``, ``pause_collection``; cancel), invoices (retrieve, list,
  lines, pay, finalize, void, mark uncollectible, create_preview), test clocks (create,
  retrieve, list, advance, delete). Form-encoded as the SDK sends them; Bearer with the
  simulator's secret key only (Stripe's 401 otherwise); ``Idempotency-Key`` honoured (same key
  and parameters: the first answer again, with ``Idempotent-Replayed: true``; other
  parameters: ``idempotency_error``); ``expand[]`` for id fields; Stripe's error shape and statuses.
- ``/checkout/{cs_id}``: the hosted page (Pay, Decline, Pay by bank debit, Cancel; Subscribe in
  subscription mode; test cards in ``cards``), ``/receipts/{ch_id}``: the receipt behind
  ``charge.receipt_url``, ``/invoices/{in_id}``: the invoice behind ``hosted_invoice_url``,
  payable while open. Open without a key, as Stripe's are; each shows only its own object.
- ``/test/...``: JSON controls, with the secret key too (see ``app._add_test_routes``):
  pay/decline a session, settle an async payment, expire a session, refund, open and close a
  dispute, save a test card on a customer (or make it the default of the customer and its
  subscriptions, as Stripe's billing portal does), deliver an event again (N copies at once, or
  signed with another secret or timestamp), list events with their delivery attempts, drain
  deliveries.

Events (``evt_``) are emitted for what happens (``checkout.session.completed`` /
``async_payment_succeeded`` / ``async_payment_failed`` / ``expired``,
``payment_intent.succeeded`` / ``payment_failed`` / ``processing`` / ``canceled`` / ``created``,
``charge.succeeded`` / ``failed`` / ``refunded``, ``refund.created``, ``charge.dispute.created`` /
``closed`` / ``funds_withdrawn`` / ``funds_reinstated``, ``setup_intent.succeeded`` /
``setup_failed``, ``customer.created`` / ``updated`` / ``deleted``, ``payment_method.attached``,
``product.*``, ``price.*``, ``customer.subscription.created`` / ``updated`` / ``deleted``,
``invoice.created`` / ``finalized`` / ``paid`` / ``payment_succeeded`` / ``payment_failed`` /
``upcoming`` / ``voided`` / ``marked_uncollectible``, ``invoice_payment.paid``,
``test_helpers.test_clock.created`` / ``advancing`` / ``ready`` / ``deleted``) and delivered,
signed, by background tasks with bounded retries (``delivery``), at least once: a delivery
left pending by a process that died is sent by the next one to start. In tests, drive the
same operations with the async methods of ``Simulator`` (``await simulator.close_dispute(...)``,
or ``await simulator.run(simulator.account.<operation>, ...)``) and ``await simulator.drain()``
before asserting.
"""

from orgwallet.payments.simulator.app import create_simulator
from orgwallet.payments.simulator.core import Account
from orgwallet.payments.simulator.delivery import (
    DeliveryAttempt,
    WebhookTarget,
    http_webhook_target,
    stripe_signature,
)
from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.objects import JsonObject
from orgwallet.payments.simulator.service import Simulator

__all__ = [
    "Account",
    "DeliveryAttempt",
    "JsonObject",
    "Simulator",
    "StripeApiError",
    "WebhookTarget",
    "create_simulator",
    "http_webhook_target",
    "stripe_signature",
]
