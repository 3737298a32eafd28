"""The simulator's HTTP face: Stripe's REST subset under ``/v1``, the hosted pages, and the
test controls under ``/test``. Paths are relative to where the app is mounted (``/_stripe``).
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

from orgwallet.payments.gateway import STRIPE_API_VERSION
from orgwallet.payments.simulator import pages
from orgwallet.payments.simulator.cards import normalize
from orgwallet.payments.simulator.core import IdempotentResult, JsonObject, Simulator, new_id
from orgwallet.payments.simulator.delivery import DEFAULT_RETRY_DELAYS, WebhookTarget
from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.forms import decode_form, param_list

DECLINED_CARD = "4000000000000002"
# Results Stripe does not keep under an idempotency key: requests refused before they ran.
_NOT_REPLAYED = frozenset({400, 401, 409, 429})

Operation = Callable[[JsonObject], JsonObject]


def create_simulator(
    *,
    webhook_secret: str,
    public_base_url: str,
    deliver: WebhookTarget | None = None,
    enabled_events: Collection[str] | None = None,
    api_version: str = STRIPE_API_VERSION,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    clock: Callable[[], float] = time.time,
) -> tuple[FastAPI, Simulator]:
    """Build the simulator app and its state. ``public_base_url`` is where the app is
    reachable from a browser, mount path included (``http://localhost:8000/_stripe``).
    ``clock`` stamps objects, events and signatures (tests may shift it)."""
    simulator = Simulator(
        webhook_secret=webhook_secret,
        public_base_url=public_base_url,
        deliver=deliver,
        enabled_events=enabled_events,
        api_version=api_version,
        retry_delays=retry_delays,
        clock=clock,
    )
    app = FastAPI(title="Stripe simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.simulator = simulator
    _add_api_routes(app, simulator)
    _add_page_routes(app, simulator)
    _add_test_routes(app, simulator)
    return app, simulator


# -- /v1: Stripe's REST API --------------------------------------------------------------------


def _json(status: int, body: JsonObject, request_id: str, **headers: str) -> Response:
    return Response(
        json.dumps(body, indent=2),
        status_code=status,
        media_type="application/json",
        headers={"Request-Id": request_id, "Stripe-Version": STRIPE_API_VERSION, **headers},
    )


def _authenticate(request: Request) -> StripeApiError | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return StripeApiError(
            401,
            "You did not provide an API key. Provide it in the Authorization header (Bearer sk_test_...).",
        )
    if not key.startswith("sk_test_"):
        return StripeApiError(401, f"Invalid API Key provided: {key[:8]}****")
    return None


async def _call(request: Request, simulator: Simulator, operation: Operation) -> Response:
    request_id = new_id("req_", 14)
    refused = _authenticate(request)
    if refused is not None:
        return _json(refused.status, refused.body(), request_id)
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
        previous = simulator.idempotent_results.get(key)
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
    # No await from here on: the operation and the idempotency record happen atomically.
    try:
        status, body = 200, simulator.expand(operation(params), expand)
    except StripeApiError as error:
        status, body = error.status, error.body()
    if key is not None and status not in _NOT_REPLAYED:
        simulator.idempotent_results[key] = IdempotentResult(fingerprint, status, body)
    extra = {"Idempotency-Key": key} if key else {}
    return _json(status, body, request_id, **extra)


def _add_api_routes(app: FastAPI, sim: Simulator) -> None:
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


# -- hosted pages --------------------------------------------------------------------------------


def _after_checkout(url: str | None, session_id: str) -> str | None:
    return url.replace("{CHECKOUT_SESSION_ID}", session_id) if url else None


def _add_page_routes(app: FastAPI, sim: Simulator) -> None:
    def render(
        session_id: str, *, error: str | None = None, card_number: str = "", status: int = 200
    ) -> Response:
        session = sim.find(session_id)
        if session is None or session["object"] != "checkout.session":
            return HTMLResponse(pages.message_page("Not found", "There is no such checkout session."), 404)
        if session["status"] == "complete":
            return HTMLResponse(pages.message_page("Done", "This checkout session is complete."), status)
        if session["status"] == "expired":
            return HTMLResponse(pages.message_page("Expired", "This checkout session has expired."), 410)
        items = sim.checkout_line_items(session_id)["data"]
        return HTMLResponse(pages.checkout_page(session, items, error=error, card_number=card_number), status)

    @app.get("/checkout/{session_id}")
    async def checkout_page(session_id: str) -> Response:
        return render(session_id)

    @app.post("/checkout/{session_id}")
    async def checkout_submit(request: Request, session_id: str) -> Response:
        form = dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))
        action = form.get("action", "pay")
        card_number = form.get("card_number", "")
        session = sim.find(session_id)
        if session is None or session["object"] != "checkout.session" or session["status"] != "open":
            return render(session_id, status=409)
        if action == "cancel":
            target = session["cancel_url"]
            if target:
                return RedirectResponse(target, status_code=303)
            return HTMLResponse(pages.message_page("Cancelled", "You cancelled the payment."))
        try:
            done = sim.pay_checkout_session(
                session_id,
                DECLINED_CARD if action == "decline" else normalize(card_number),
                async_payment=action == "pay_async",
            )
        except StripeApiError as error:
            return render(session_id, error=error.message, card_number=card_number, status=error.status)
        target = _after_checkout(done["success_url"], session_id)
        if target:
            return RedirectResponse(target, status_code=303)
        return HTMLResponse(pages.message_page("Thank you", "Your payment is complete."))

    @app.get("/receipts/{charge_id}")
    async def receipt(charge_id: str) -> Response:
        charge = sim.find(charge_id)
        if charge is None or charge["object"] != "charge" or charge["receipt_url"] is None:
            return HTMLResponse(pages.message_page("Not found", "There is no such receipt."), 404)
        return HTMLResponse(pages.receipt_page(charge))


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
    """JSON values as the string parameters the core reads."""
    return {name: str(body[name]) for name in names if body.get(name) is not None}


async def _control(request: Request, operation: Callable[[dict[str, Any]], Any]) -> Response:
    try:
        result = operation(await _body(request))
    except StripeApiError as error:
        return Response(json.dumps(error.body()), status_code=error.status, media_type="application/json")
    except (ValueError, TypeError) as error:
        bad = StripeApiError(400, f"Invalid request: {error}")
        return Response(json.dumps(bad.body()), status_code=400, media_type="application/json")
    return Response(json.dumps(result), media_type="application/json")


def _add_test_routes(app: FastAPI, sim: Simulator) -> None:
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
        """``{"payment_intent" | "charge": id, "amount"?: minor units, "reason"?}``."""
        return await _control(
            request,
            lambda body: sim.open_dispute(_form_params(body, "payment_intent", "charge", "amount", "reason")),
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
        """Events, oldest first (``?type=``), each with its delivery attempts."""
        attempts: dict[str, list[JsonObject]] = {}
        for attempt in sim.webhooks.attempts:
            attempts.setdefault(attempt.event_id, []).append(attempt.as_json())
        data = [
            {**event, "deliveries": attempts.get(event["id"], [])}
            for event in sim.events(request.query_params.get("type"))
        ]
        return Response(json.dumps({"data": data}), media_type="application/json")

    @app.post("/test/drain")
    async def drain() -> Response:
        """Wait (up to 10 s) until pending deliveries are done."""
        with contextlib.suppress(TimeoutError):
            await sim.drain()
        status = 200 if sim.webhooks.pending == 0 else 504
        return Response(
            json.dumps({"pending": sim.webhooks.pending}), status_code=status, media_type="application/json"
        )
