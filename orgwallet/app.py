"""The FastAPI application: /graphql, /webhooks/stripe, /healthz, /readyz, /metrics (for the
holder of ORGWALLET_METRICS_TOKEN); in development, /_stripe (the offline Stripe simulator, when
no real Stripe key is configured) and /_mail (the e-mail outbox, when no SMTP server is
configured). Unless ``ORGWALLET_WORKER=off``, a job worker runs in the server's process,
started and stopped with the app."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from cross_web import HTTPException
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter, GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, MULTIPART_SUBSCRIPTION_PROTOCOL
from strawberry.types.unset import UnsetType

from orgwallet.auth.principals import Anonymous
from orgwallet.config import Settings
from orgwallet.errors import Unauthenticated
from orgwallet.jobs.worker import HANDLERS as WORKER_HANDLERS
from orgwallet.jobs.worker import run as run_worker
from orgwallet.mailpage import outbox_route
from orgwallet.metrics import metrics_route
from orgwallet.runtime import Runtime
from orgwallet.schema.context import Context
from orgwallet.schema.limits import BodyTooLarge, DocumentCache, bounded, declared_length
from orgwallet.schema.schema import build_schema
from orgwallet.services import subscriptions
from orgwallet.services.audit import request_id_var
from orgwallet.services.exports import export_route
from orgwallet.webhooks import stripe_webhook_route

log = logging.getLogger(__name__)


class TextWebSocket(ASGIWebSocketAdapter):
    """Sends each graphql-transport-ws message as a text frame: ``encode_json`` gives bytes,
    which Strawberry would send as binary frames, and a browser's client parses text only."""

    async def send_json(self, message: Mapping[str, object]) -> None:
        try:
            await self.ws.send_text(self.view.encode_json_string(message))
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc


class GraphQLEndpoint(GraphQL[Context, None]):
    """/graphql: Strawberry's plain ASGI view, routed to directly. FastAPI's router and its
    dependency injection cost more per request than most of our resolvers (about a fifth of
    a balance read's CPU), and the endpoint needs neither. JSON is read and written with
    orjson (a page of 100 ledger entries is some 20 KB of JSON). The request's context
    (principal, read connection) is closed when the response has been sent.

    A request it refuses (malformed, too large, a failure of ours) is answered with a JSON
    error (``{"errors": [{"message", "extensions": {"code"}}]}``), never a traceback; a body
    over ``max_request_bytes`` is refused before it is read (413).

    Subscriptions: over a WebSocket (graphql-transport-ws; the credentials in connection_init's
    payload, as a browser cannot set headers on a WebSocket), or as a multipart HTTP response
    (``Accept: multipart/mixed;subscriptionSpec=1.0``). A page of another origin may open a
    WebSocket only when it is one of ``cors_origins``."""

    websocket_adapter_class = TextWebSocket

    def __init__(self, runtime: Runtime, **options: Any) -> None:
        self.documents = DocumentCache()
        super().__init__(
            build_schema(runtime.settings, self.documents),
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, MULTIPART_SUBSCRIPTION_PROTOCOL),
            allowed_origins=runtime.settings.cors_origins,
            **options,
        )
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["type"] != "http":
                await super().__call__(scope, receive, send)
                return
            response = await self._respond(scope, receive)
            await response(scope, receive, send)
        finally:
            context = scope.get("state", {}).pop(_CONTEXT, None)
            if context is not None:
                await context.close()

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        auth_error: str | None = None
        try:
            principal = await self.runtime.authenticate(request.headers.get("authorization"))
        except Unauthenticated as error:
            # One line: a forged or stale credential is the caller's doing, not an incident.
            log.warning("authentication failed: %s", error.message)
            principal, auth_error = Anonymous(), error.message
        context = Context(
            settings=self.runtime.settings,
            runtime=self.runtime,
            principal=principal,
            request_id=request_id_var.get() or "",
            auth_error=auth_error,
            credential=request.headers.get("authorization"),
            per_use=isinstance(request, WebSocket) or "multipart/mixed" in request.headers.get("accept", ""),
        )
        request.scope.setdefault("state", {})[_CONTEXT] = context
        return context

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        """graphql-transport-ws's connection_init: the credential is its payload's
        ``Authorization`` (else the handshake's header). None, or a bad one: the connection is
        closed (4403)."""
        params = context.connection_params or {}
        given = next((v for k, v in params.items() if k.lower() == "authorization"), None)
        credential = given if isinstance(given, str) else context.credential
        try:
            principal = await self.runtime.authenticate(credential)
        except Unauthenticated as error:
            log.warning("authentication failed: %s", error.message)
            raise ConnectionRejectionError from error
        if isinstance(principal, Anonymous):
            raise ConnectionRejectionError
        context.principal, context.credential, context.auth_error = principal, credential, None
        return UnsetType()  # a connection_ack without payload

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        limit = self.runtime.settings.max_request_bytes
        too_large = _request_error(413, f"the request body is larger than {limit} bytes")
        if (declared_length(Headers(scope=scope)) or 0) > limit:
            return too_large
        try:
            return await self.run(Request(scope, receive=bounded(receive, limit)))
        except HTTPException as error:
            return _request_error(error.status_code, error.reason)
        except BodyTooLarge:
            return too_large
        except Exception:
            log.exception("the GraphQL request failed")
            return _request_error(500, "Unexpected error.")

    def decode_json(self, data: str | bytes) -> object:
        value = orjson.loads(data)
        if not isinstance(value, dict | list):  # a list is a batch, refused as such
            raise HTTPException(400, "expected a JSON object")
        return value

    def encode_json(self, data: object) -> bytes:
        try:
            return orjson.dumps(data)
        except TypeError:  # what orjson refuses (an integer past 64 bits...), json writes
            return json.dumps(data, separators=(",", ":")).encode()

    @property
    def graphql_ide_html(self) -> str:
        """GraphiQL with its scripts served from the package (``/_graphiql``), not a CDN."""
        return _GRAPHIQL_PAGE


_CONTEXT = "orgwallet.context"
_REQUEST_ERRORS = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}


def _request_error(status: int, message: str) -> Response:
    """A request refused before any operation ran, in the shape of a GraphQL error."""
    code = _REQUEST_ERRORS.get(status, "INTERNAL_SERVER_ERROR")
    body = {"errors": [{"message": message, "extensions": {"code": code}}]}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


#: GraphiQL's page and assets (see its NOTICE.md), served at /_graphiql when GraphiQL is on.
GRAPHIQL_ASSETS = Path(__file__).parent / "static" / "graphiql"
_GRAPHIQL_PAGE = (GRAPHIQL_ASSETS / "index.html").read_text(encoding="utf-8")


class RequestIdMiddleware:
    """Gives every request an id (or keeps the caller's X-Request-ID) for logs and audit rows."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:100]
        request_id = given or uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        # Not reset when the app raises: the error's lines (the 500 and its traceback, written by
        # Starlette and uvicorn outside this middleware) carry the id. A request is a task of
        # its own under uvicorn, so the id goes no further.
        await self.app(scope, receive, send_with_id)
        request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What exists at start-up (modules, the schema, the models: some 150,000 objects) lives
        # as long as the process. Frozen out of the garbage collector's reach, it no longer makes
        # each full collection a pause of ~100 ms in the middle of requests (it was the p99).
        gc.freeze()
        await runtime.stripe.start()  # the offline Stripe resumes deliveries a dead process left
        stop = asyncio.Event()
        worker = None
        if settings.worker == "embedded":
            worker = asyncio.create_task(run_worker(runtime, stop), name="orgwallet-worker")
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                await _stopped(worker)
            await runtime.close()

    app = FastAPI(title="orgwallet", lifespan=lifespan)
    runtime = Runtime.build(settings, app=app)
    app.state.runtime = runtime

    graphql = GraphQLEndpoint(runtime, graphql_ide="graphiql" if settings.graphiql else None)
    # An ASGI app as a route's endpoint: Starlette calls it as it is (typed for functions only).
    app.add_route("/graphql", graphql, methods=["GET", "POST"])  # type: ignore[arg-type]
    app.router.add_websocket_route("/graphql", graphql)  # type: ignore[arg-type]
    if settings.graphiql:
        app.mount("/_graphiql", StaticFiles(directory=GRAPHIQL_ASSETS), name="graphiql")
    app.router.routes.append(
        stripe_webhook_route(
            runtime.driver,
            runtime.sessions,
            runtime.gateway,
            lambda: runtime.clock.now(),
            subscriptions.grace_period(runtime),
        )
    )
    app.router.routes.append(
        export_route(runtime.driver, lambda: settings.signing_secret, lambda: runtime.clock.now())
    )
    if not settings.smtp_url:
        app.router.routes.append(outbox_route(runtime.driver))
    if settings.metrics_token:  # else no /metrics at all (404): it must not be open to anyone
        app.router.routes.append(metrics_route(runtime, settings.metrics_token, WORKER_HANDLERS))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            async with runtime.sessions() as session:
                await session.execute(text("SELECT 1"))
        except Exception:
            log.exception("readiness check failed")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
        )
    app.add_middleware(RequestIdMiddleware)
    return app


async def _stopped(worker: asyncio.Task[None]) -> None:
    """Waits for the embedded worker to finish its jobs in flight (it was told to stop)."""
    try:
        await asyncio.wait_for(worker, timeout=30)
    except TimeoutError:
        log.warning("the embedded worker did not stop within 30 s: cancelled")
    except Exception:
        log.exception("the embedded worker failed")
