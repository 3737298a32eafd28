"""The simulator's HTTP face: Stripe's REST subset under ``/v1`` (Billing's in
``_add_billing_routes``), the hosted pages, and the test controls under ``/test``. Paths are
relative to where the app is mounted (``/_stripe``).

``/v1`` and ``/test`` answer only requests carrying the simulator's secret key (Stripe's 401
otherwise); the hosted pages are open, as Stripe's are, each showing only its own object.
Every request (but ``/test/drain``, which waits for deliveries) runs as one section of the
account (``store``): its answer is sent once what it did is committed, and its events are
then on their way.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orgwallet.payments.gateway import STRIPE_API_VERSION
from orgwallet.payments.simulator import pages
from orgwallet.payments.simulator.billing import PAYMENT_RETRY_DAYS, TEST_CLOCK, UPCOMING_INVOICE_DAYS
from orgwallet.payments.simulator.cards import normalize
from orgwallet.payments.simulator.core import Account, IdempotentResult
from orgwallet.payments.simulator.delivery import DEFAULT_RETRY_DELAYS, WebhookTarget
from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.forms import decode_form, param_list
from orgwallet.payments.simulator.objects import JsonObject, new_id
from orgwallet.payments.simulator.service import Simulator

DECLINED_CARD = "4000000000000002"
# Results Stripe does not keep under an idempotency key: requests refused before they ran.
_NOT_REPLAYED = frozenset({400, 401, 409, 429})
_KEYED = ("/v1", "/test")  # what needs the secret key; the rest are the hosted pages
_OUTSIDE_SECTIONS = frozenset({"/test/drain"})

Operation = Callable[[JsonObject], JsonObject]


def create_simulator(
    *,
    secret_key: str,
    database_url: str,
    webhook_secret: str,
    public_base_url: str,
    deliver: WebhookTarget | None = None,
    enabled_events: Collection[str] | None = None,
    api_version: str = STRIPE_API_VERSION,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    clock: Callable[[], float] = time.time,
    business_name: str = pages.DEFAULT_BUSINESS_NAME,
    upcoming_invoice_days: int = UPCOMING_INVOICE_DAYS,
    payment_retry_days: Sequence[int] = PAYMENT_RETRY_DAYS,
) -> tuple[FastAPI, Simulator]:
    """Build the simulator app and its state. ``secret_key`` is the only API key it accepts;
    ``database_url`` where its state is kept. ``public_base_url`` is where the app is
    reachable from a browser, mount path included (``http://localhost:8000/_stripe``).
    ``clock`` stamps objects, events and signatures (tests may shift it). ``business_name`` is
    the merchant the hosted pages show (Stripe shows the account's). ``upcoming_invoice_days``
    and ``payment_retry_days``: Stripe Billing's reminder and retry settings (``billing``)."""
    simulator = Simulator(
        secret_key=secret_key,
        database_url=database_url,
        webhook_secret=webhook_secret,
        public_base_url=public_base_url,
        deliver=deliver,
        enabled_events=enabled_events,
        api_version=api_version,
        retry_delays=retry_delays,
        clock=clock,
        upcoming_invoice_days=upcoming_invoice_days,
        payment_retry_days=payment_retry_days,
    )
    app = FastAPI(title="Stripe simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.simulator = simulator
    _add_billing_routes(app, simulator.account)  # before the API's catch-all for unknown URLs
    _add_api_routes(app, simulator.account)
    _add_page_routes(app, simulator.account, business_name)
    _add_invoice_page_routes(app, simulator.account, business_name)
    _add_test_routes(app, simulator)
    app.add_middleware(SectionPerRequest, simulator=simulator)
    return app, simulator


class SectionPerRequest:
    """Checks the key of ``/v1`` and ``/test`` requests, then runs each request as one section
    of the account: the body read first, the answer held until the section has committed."""

    def __init__(self, app: ASGIApp, simulator: Simulator) -> None:
        self.app = app
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if any(path == prefix or path.startswith(prefix + "/") for prefix in _KEYED):
            headers = dict(scope["headers"])
            refused = self.simulator.refusal(headers.get(b"authorization", b"").decode("latin-1"))
            if refused is not None:
                await _json(refused.status, refused.body(), new_id("req_", 14))(scope, receive, send)
                return
        if path in _OUTSIDE_SECTIONS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its request was whole
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        answer: list[Message] = []

        async def hold(message: Message) -> None:
            answer.append(message)

        async with self.simulator.section():
            await self.app(scope, replay, hold)
        for message in answer:
            await send(message)


def _route_path(scope: Scope) -> str:
    """The path under the mount point (Starlette keeps the full path and the mount in
    ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# -- /v1: Stripe's REST API --------------------------------------------------------------------


def _json(status: int, body: JsonObject, request_id: str, **headers: str) -> Response:
    return Response(
        json.dumps(body, indent=2),
        status_code=status,
        media_type="application/json",
        headers={"Request-Id": request_id, "Stripe-Version": STRIPE_API_VERSION, **headers},
    )


async def _call(request: Request, account: Account, operation: Operation) -> Response:
    """An API call, inside the request's section: the idempotency key's check, the operation
    and the answer kept under the key are one atomic step."""
    request_id = new_id("req_", 14)
    try:
        if request.method == "POST":
            params = decode_form((await request.body()).decode())
        else:
            params = decode_form(request.url.query)
        expand = [str(path) for path in param_list(params, "expand")]
    except (StripeApiError, UnicodeDecodeError) as error:
        bad = error if isinstance(error, StripeApiError) else StripeApiError(400, "Invalid request body.")
        return _json(bad.status, bad.body(), request_id)
    params.pop("expand", None)

    key = request.headers.get("idempotency-key") if request.method == "POST" else None
    fingerprint = json.dumps([request.method, request.url.path, params], sort_keys=True)
    if key is not None:
        previous = account.idempotent_result(key)
        if previous is not None:
            if previous.fingerprint != fingerprint:
                conflict = StripeApiError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they were "
                    f"first used with. Try using a key other than '{key}' if you meant to execute a "
                    "different request.",
                    type="idempotency_error",
                )
                return _json(conflict.status, conflict.body(), request_id)
            return _json(
                previous.status,
                previous.body,
                request_id,
                **{"Idempotent-Replayed": "true", "Idempotency-Key": key},
            )
    try:
        status, body = 200, account.expand(operation(params), expand)
    except StripeApiError as error:
        status, body = error.status, error.body()
    if key is not None and status not in _NOT_REPLAYED:
        account.keep_result(key, IdempotentResult(fingerprint, status, body))
    extra = {"Idempotency-Key": key} if key else {}
    return _json(status, body, request_id, **extra)


def _add_api_routes(app: FastAPI, sim: Account) -> None:
    def retrieve(object_name: str) -> Callable[[str], Operation]:
        return lambda object_id: lambda _params: sim.retrieve(object_id, object_name)

    get_customer = retrieve("customer")
    get_session = retrieve("checkout.session")
    get_intent = retrieve("payment_intent")
    get_method = retrieve("payment_method")
    get_charge = retrieve("charge")
    get_refund = retrieve("refund")
    get_dispute = retrieve("dispute")
    get_setup_intent = retrieve("setup_intent")
    get_event = retrieve("event")

    @app.post("/v1/customers")
    async def create_customer(request: Request) -> Response:
        return await _call(request, sim, sim.create_customer)

    @app.get("/v1/customers/{customer_id}")
    async def customer(request: Request, customer_id: str) -> Response:
        return await _call(request, sim, get_customer(customer_id))

    @app.post("/v1/customers/{customer_id}")
    async def update_customer(request: Request, customer_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.update_customer(customer_id, params))

    @app.get("/v1/customers/{customer_id}/payment_methods")
    async def customer_payment_methods(request: Request, customer_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.list_payment_methods(customer_id, params))

    @app.get("/v1/payment_methods")
    async def payment_methods(request: Request) -> Response:
        def operation(params: JsonObject) -> JsonObject:
            customer_id = params.pop("customer", None)
            if not isinstance(customer_id, str):
                raise StripeApiError(
                    400, "The simulator lists payment methods by customer only.", param="customer"
                )
            return sim.list_payment_methods(customer_id, params)

        return await _call(request, sim, operation)

    @app.get("/v1/payment_methods/{payment_method_id}")
    async def payment_method(request: Request, payment_method_id: str) -> Response:
        return await _call(request, sim, get_method(payment_method_id))

    @app.post("/v1/checkout/sessions")
    async def create_session(request: Request) -> Response:
        return await _call(request, sim, sim.create_checkout_session)

    @app.get("/v1/checkout/sessions/{session_id}")
    async def session(request: Request, session_id: str) -> Response:
        return await _call(request, sim, get_session(session_id))

    @app.get("/v1/checkout/sessions/{session_id}/line_items")
    async def session_line_items(request: Request, session_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.checkout_line_items(session_id))

    @app.post("/v1/checkout/sessions/{session_id}/expire")
    async def expire_session(request: Request, session_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.expire_checkout_session(session_id))

    @app.post("/v1/payment_intents")
    async def create_intent(request: Request) -> Response:
        return await _call(request, sim, sim.create_payment_intent)

    @app.get("/v1/payment_intents/{intent_id}")
    async def intent(request: Request, intent_id: str) -> Response:
        return await _call(request, sim, get_intent(intent_id))

    @app.post("/v1/payment_intents/{intent_id}/confirm")
    async def confirm_intent(request: Request, intent_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.confirm_payment_intent(intent_id, params))

    @app.get("/v1/charges/{charge_id}")
    async def charge(request: Request, charge_id: str) -> Response:
        return await _call(request, sim, get_charge(charge_id))

    @app.post("/v1/refunds")
    async def create_refund(request: Request) -> Response:
        return await _call(request, sim, sim.create_refund)

    @app.get("/v1/refunds/{refund_id}")
    async def refund(request: Request, refund_id: str) -> Response:
        return await _call(request, sim, get_refund(refund_id))

    @app.get("/v1/disputes/{dispute_id}")
    async def dispute(request: Request, dispute_id: str) -> Response:
        return await _call(request, sim, get_dispute(dispute_id))

    @app.get("/v1/setup_intents/{setup_intent_id}")
    async def setup_intent(request: Request, setup_intent_id: str) -> Response:
        return await _call(request, sim, get_setup_intent(setup_intent_id))

    @app.get("/v1/events")
    async def events(request: Request) -> Response:
        return await _call(request, sim, sim.list_events)

    @app.get("/v1/events/{event_id}")
    async def event(request: Request, event_id: str) -> Response:
        return await _call(request, sim, get_event(event_id))

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def unknown(request: Request, rest: str) -> Response:
        def operation(_params: JsonObject) -> JsonObject:
            raise StripeApiError(
                404,
                f"Unrecognized request URL ({request.method}: /v1/{rest}). "
                "The Stripe simulator implements only the part of Stripe's API this project uses.",
            )

        return await _call(request, sim, operation)


def _add_billing_routes(app: FastAPI, sim: Account) -> None:
    """Products, prices, subscriptions, invoices and test clocks (``billing``)."""

    @app.post("/v1/products")
    async def create_product(request: Request) -> Response:
        return await _call(request, sim, sim.create_product)

    @app.get("/v1/products")
    async def products(request: Request) -> Response:
        return await _call(request, sim, sim.list_products)

    @app.get("/v1/products/{product_id}")
    async def product(request: Request, product_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.retrieve(product_id, "product"))

    @app.post("/v1/products/{product_id}")
    async def update_product(request: Request, product_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.update_product(product_id, params))

    @app.post("/v1/prices")
    async def create_price(request: Request) -> Response:
        return await _call(request, sim, sim.create_price)

    @app.get("/v1/prices")
    async def prices(request: Request) -> Response:
        return await _call(request, sim, sim.list_prices)

    @app.get("/v1/prices/{price_id}")
    async def price(request: Request, price_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.retrieve(price_id, "price"))

    @app.post("/v1/prices/{price_id}")
    async def update_price(request: Request, price_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.update_price(price_id, params))

    @app.post("/v1/subscriptions")
    async def create_subscription(request: Request) -> Response:
        return await _call(request, sim, sim.create_subscription)

    @app.get("/v1/subscriptions")
    async def subscriptions(request: Request) -> Response:
        return await _call(request, sim, sim.list_subscriptions)

    @app.get("/v1/subscriptions/{subscription_id}")
    async def subscription(request: Request, subscription_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.retrieve(subscription_id, "subscription"))

    @app.post("/v1/subscriptions/{subscription_id}")
    async def update_subscription(request: Request, subscription_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.update_subscription(subscription_id, params))

    @app.delete("/v1/subscriptions/{subscription_id}")
    async def cancel_subscription(request: Request, subscription_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.cancel_subscription(subscription_id, params))

    @app.get("/v1/invoices")
    async def invoices(request: Request) -> Response:
        return await _call(request, sim, sim.list_invoices)

    @app.post("/v1/invoices/create_preview")
    async def invoice_preview(request: Request) -> Response:
        return await _call(request, sim, sim.create_invoice_preview)

    @app.get("/v1/invoices/{invoice_id}")
    async def invoice(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.retrieve(invoice_id, "invoice"))

    @app.get("/v1/invoices/{invoice_id}/lines")
    async def invoice_lines(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.invoice_lines(invoice_id))

    @app.post("/v1/invoices/{invoice_id}/pay")
    async def pay_invoice(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.pay_invoice(invoice_id, params))

    @app.post("/v1/invoices/{invoice_id}/finalize")
    async def finalize_invoice(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.finalize_invoice(invoice_id, params))

    @app.post("/v1/invoices/{invoice_id}/void")
    async def void_invoice(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.void_invoice(invoice_id))

    @app.post("/v1/invoices/{invoice_id}/mark_uncollectible")
    async def mark_uncollectible(request: Request, invoice_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.mark_invoice_uncollectible(invoice_id))

    @app.post("/v1/test_helpers/test_clocks")
    async def create_test_clock(request: Request) -> Response:
        return await _call(request, sim, sim.create_test_clock)

    @app.get("/v1/test_helpers/test_clocks")
    async def test_clocks(request: Request) -> Response:
        return await _call(request, sim, sim.list_test_clocks)

    @app.get("/v1/test_helpers/test_clocks/{clock_id}")
    async def test_clock(request: Request, clock_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.retrieve(clock_id, TEST_CLOCK))

    @app.post("/v1/test_helpers/test_clocks/{clock_id}/advance")
    async def advance_test_clock(request: Request, clock_id: str) -> Response:
        return await _call(request, sim, lambda params: sim.advance_test_clock(clock_id, params))

    @app.delete("/v1/test_helpers/test_clocks/{clock_id}")
    async def delete_test_clock(request: Request, clock_id: str) -> Response:
        return await _call(request, sim, lambda _params: sim.delete_test_clock(clock_id))


# -- hosted pages --------------------------------------------------------------------------------


def _after_checkout(url: str | None, session_id: str) -> str | None:
    """Where the browser goes once a session is paid: its ``success_url``, with the session's id
    in place of ``{CHECKOUT_SESSION_ID}``, as Stripe does (Stripe does it in no other URL)."""
    return url.replace("{CHECKOUT_SESSION_ID}", session_id) if url else None


#: The pages load nothing from anywhere and may not be framed; the ids in their URLs stay out of
#: caches and of the Referer of links leaving them.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _html(page: pages.Page) -> Response:
    return HTMLResponse(page.html, page.status, headers=_PAGE_HEADERS)


def _redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=_PAGE_HEADERS)


def _add_page_routes(app: FastAPI, sim: Account, business_name: str) -> None:
    """Checkout (payment and setup modes), the simulator's own "payment received" (``/done/{cs}``)
    and "payment cancelled" (``/cancelled``) pages, and receipts. Open without a key, as
    Stripe's are; each shows only the object its URL names (an unknown id: a plain 404)."""

    def checkout_session(session_id: str) -> JsonObject | None:
        session = sim.find(session_id)
        return session if session is not None and session["object"] == "checkout.session" else None

    def checkout(
        session: JsonObject, *, error: str | None = None, card_number: str | None = None, status: int = 200
    ) -> pages.Page:
        if session["status"] != "open":
            return pages.closed_checkout_page(session, merchant=business_name, status=status)
        items = sim.checkout_line_items(session["id"])["data"]
        return pages.checkout_page(
            session, items, merchant=business_name, error=error, card_number=card_number, status=status
        )

    def not_found(what: str) -> Response:
        return _html(pages.not_found(what, merchant=business_name))

    @app.get("/checkout/{session_id}")
    async def checkout_page(session_id: str) -> Response:
        session = checkout_session(session_id)
        return not_found("checkout session") if session is None else _html(checkout(session))

    @app.post("/checkout/{session_id}")
    async def checkout_submit(request: Request, session_id: str) -> Response:
        """The form's buttons: Pay (the typed card, or a test card's own button), Pay by bank
        debit, Decline, Cancel. A declined card shows the page again with Stripe's message."""
        form = dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))
        action = form.get("action", "pay")
        card_number = form.get("test_card") or form.get("card_number", "")
        session = checkout_session(session_id)
        if session is None:
            return not_found("checkout session")
        if session["status"] != "open":
            return _html(checkout(session, status=409))
        if action == "cancel":
            return _redirect(session["cancel_url"] or f"{sim.public_base_url}/cancelled")
        try:
            done = sim.pay_checkout_session(
                session_id,
                DECLINED_CARD if action == "decline" else normalize(card_number),
                async_payment=action == "pay_async",
            )
        except StripeApiError as error:  # the declined attempt is kept (the section commits)
            page = checkout(session, error=error.message, card_number=card_number, status=error.status)
            return _html(page)
        target = _after_checkout(done["success_url"], session_id)
        return _redirect(target or f"{sim.public_base_url}/done/{session_id}")

    @app.get("/done/{session_id}")
    async def done_page(session_id: str) -> Response:
        """Payment received (or processing, or a card saved) for this one session."""
        session = checkout_session(session_id)
        if session is None:
            return not_found("checkout session")
        if session["mode"] == "subscription" and session["status"] == "complete":
            subscription = sim.find(session["subscription"])
            invoice = sim.find(session["invoice"])
            assert subscription is not None and invoice is not None
            return _html(
                pages.subscribed_page(
                    session, merchant=business_name, subscription=subscription, invoice=invoice
                )
            )
        intent = sim.find(session["payment_intent"]) if session.get("payment_intent") else None
        charge = sim.find(intent["latest_charge"]) if intent and intent.get("latest_charge") else None
        setup_intent = sim.find(session["setup_intent"]) if session.get("setup_intent") else None
        method_id = setup_intent.get("payment_method") if setup_intent else None
        payment_method = sim.find(method_id) if isinstance(method_id, str) else None
        return _html(
            pages.done_page(session, merchant=business_name, charge=charge, payment_method=payment_method)
        )

    @app.get("/cancelled")
    async def cancelled_page() -> Response:
        return _html(pages.cancelled_page(merchant=business_name))

    @app.get("/receipts/{charge_id}")
    async def receipt(charge_id: str) -> Response:
        charge = sim.find(charge_id)
        if charge is None or charge["object"] != "charge" or charge["receipt_url"] is None:
            return not_found("receipt")
        customer = sim.find(charge["customer"]) if charge.get("customer") else None
        if customer is not None and customer["object"] != "customer":
            customer = None
        refunds = sim.refunds_of(charge_id)
        return _html(pages.receipt_page(charge, merchant=business_name, customer=customer, refunds=refunds))


def _add_invoice_page_routes(app: FastAPI, sim: Account, business_name: str) -> None:
    """The page behind ``invoice.hosted_invoice_url``: the invoice, and a card form to pay it
    while it is open (or uncollectible), as Stripe's. Open without a key; a draft has none."""

    def hosted_invoice(invoice_id: str) -> JsonObject | None:
        invoice = sim.find(invoice_id)
        if invoice is None or invoice["object"] != "invoice" or invoice["hosted_invoice_url"] is None:
            return None
        return invoice

    def page(
        invoice: JsonObject, *, error: str | None = None, card_number: str | None = None, status: int = 200
    ) -> pages.Page:
        return pages.invoice_page(
            invoice, merchant=business_name, error=error, card_number=card_number, status=status
        )

    @app.get("/invoices/{invoice_id}")
    async def invoice_page(invoice_id: str) -> Response:
        invoice = hosted_invoice(invoice_id)
        return _html(pages.not_found("invoice", merchant=business_name) if invoice is None else page(invoice))

    @app.post("/invoices/{invoice_id}")
    async def invoice_submit(request: Request, invoice_id: str) -> Response:
        """Pay (the typed card, or a test card's own button); a declined card shows the page
        again with Stripe's message (the failed attempt counts, as on Stripe)."""
        form = dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))
        card_number = form.get("test_card") or form.get("card_number", "")
        invoice = hosted_invoice(invoice_id)
        if invoice is None:
            return _html(pages.not_found("invoice", merchant=business_name))
        if invoice["status"] not in pages.PAYABLE_INVOICE_STATUSES:
            return _html(page(invoice, status=409))
        try:
            sim.pay_invoice_with_card(invoice_id, normalize(card_number))
        except StripeApiError as error:  # the declined attempt is kept (the section commits)
            failed = sim.find(invoice_id)
            assert failed is not None
            return _html(page(failed, error=error.message, card_number=card_number, status=error.status))
        return _redirect(invoice["hosted_invoice_url"])


# -- /test: controls a test (or a developer) uses in place of Stripe's dashboard --------------------


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise StripeApiError(400, "The body must be a JSON object.")
    return body


def _form_params(body: dict[str, Any], *names: str) -> JsonObject:
    """JSON values as the string parameters the core reads (booleans as Stripe's ``true``)."""
    return {
        name: str(body[name]).lower() if isinstance(body[name], bool) else str(body[name])
        for name in names
        if body.get(name) is not None
    }


async def _control(request: Request, operation: Callable[[dict[str, Any]], Any]) -> Response:
    try:
        result = operation(await _body(request))
    except StripeApiError as error:
        return Response(json.dumps(error.body()), status_code=error.status, media_type="application/json")
    except (ValueError, TypeError) as error:
        bad = StripeApiError(400, f"Invalid request: {error}")
        return Response(json.dumps(bad.body()), status_code=400, media_type="application/json")
    return Response(json.dumps(result), media_type="application/json")


def _add_test_routes(app: FastAPI, simulator: Simulator) -> None:
    sim = simulator.account

    @app.post("/test/checkout_sessions/{session_id}/pay")
    async def pay(request: Request, session_id: str) -> Response:
        """``{"card_number": "4242 4242 4242 4242", "async_payment": false}``, as the page's Pay."""
        return await _control(
            request,
            lambda body: sim.pay_checkout_session(
                session_id,
                normalize(str(body.get("card_number", "4242424242424242"))),
                async_payment=bool(body.get("async_payment", False)),
            ),
        )

    @app.post("/test/checkout_sessions/{session_id}/decline")
    async def decline(request: Request, session_id: str) -> Response:
        return await _control(request, lambda _body: sim.pay_checkout_session(session_id, DECLINED_CARD))

    @app.post("/test/checkout_sessions/{session_id}/async_payment")
    async def settle(request: Request, session_id: str) -> Response:
        """``{"outcome": "succeeded" | "failed"}``: the pending bank debit settles."""

        def operation(body: dict[str, Any]) -> JsonObject:
            outcome = body.get("outcome")
            if outcome not in ("succeeded", "failed"):
                raise StripeApiError(400, "outcome must be 'succeeded' or 'failed'", param="outcome")
            return sim.settle_async_payment(session_id, succeeded=outcome == "succeeded")

        return await _control(request, operation)

    @app.post("/test/checkout_sessions/{session_id}/expire")
    async def expire(request: Request, session_id: str) -> Response:
        return await _control(request, lambda _body: sim.expire_checkout_session(session_id))

    @app.post("/test/refunds")
    async def refund(request: Request) -> Response:
        """``{"payment_intent" | "charge": id, "amount"?: minor units, "reason"?}``."""
        return await _control(
            request,
            lambda body: sim.create_refund(
                _form_params(body, "payment_intent", "charge", "amount", "reason")
            ),
        )

    @app.post("/test/disputes")
    async def open_dispute(request: Request) -> Response:
        """``{"payment_intent" | "charge": id, "amount"?: minor units, "reason"?, "inquiry"?: true}``."""
        return await _control(
            request,
            lambda body: sim.open_dispute(
                _form_params(body, "payment_intent", "charge", "amount", "reason", "inquiry")
            ),
        )

    @app.post("/test/disputes/{dispute_id}/close")
    async def close_dispute(request: Request, dispute_id: str) -> Response:
        """``{"outcome": "won" | "lost"}``."""

        def operation(body: dict[str, Any]) -> JsonObject:
            outcome = body.get("outcome")
            if outcome not in ("won", "lost"):
                raise StripeApiError(400, "outcome must be 'won' or 'lost'", param="outcome")
            return sim.close_dispute(dispute_id, won=outcome == "won")

        return await _control(request, operation)

    @app.post("/test/customers/{customer_id}/payment_methods")
    async def add_card(request: Request, customer_id: str) -> Response:
        """``{"card_number": ...}``: save a test card on the customer."""
        return await _control(
            request, lambda body: sim.add_test_card(customer_id, normalize(str(body.get("card_number", ""))))
        )

    @app.post("/test/customers/{customer_id}/default_payment_method")
    async def replace_default_card(request: Request, customer_id: str) -> Response:
        """``{"card_number": ...}``: save a test card and make it the default of the customer
        and of its subscriptions, as a customer changing cards in Stripe's billing portal."""
        return await _control(
            request,
            lambda body: sim.replace_default_card(customer_id, normalize(str(body.get("card_number", "")))),
        )

    @app.post("/test/events/{event_id}/deliver")
    async def deliver(request: Request, event_id: str) -> Response:
        """Deliver an event again: ``{"times"?: n (at once), "secret"?, "timestamp"?}``; the
        last two sign it differently, for deliveries that must be rejected."""

        def operation(body: dict[str, Any]) -> JsonObject:
            timestamp = body.get("timestamp")
            return sim.redeliver(
                event_id,
                times=int(body.get("times", 1)),
                secret=str(body["secret"]) if body.get("secret") else None,
                timestamp=int(timestamp) if timestamp is not None else None,
            )

        return await _control(request, operation)

    @app.get("/test/events")
    async def events(request: Request) -> Response:
        """Events, oldest first (``?type=``), each with its delivery attempts (by any process)."""
        events = sim.events(request.query_params.get("type"))
        attempts = await simulator.store.attempts([event["id"] for event in events])
        data = [{**event, "deliveries": attempts.get(event["id"], [])} for event in events]
        return Response(json.dumps({"data": data}), media_type="application/json")

    @app.post("/test/drain")
    async def drain() -> Response:
        """Wait (up to 10 s) until the deliveries this process is sending are done."""
        with contextlib.suppress(TimeoutError):
            await simulator.drain()
        pending = simulator.webhooks.pending
        status = 200 if pending == 0 else 504
        return Response(json.dumps({"pending": pending}), status_code=status, media_type="application/json")
