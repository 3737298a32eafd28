"""The FastAPI application: /graphql, /webhooks/stripe, /healthz, /readyz; in development,
/_stripe (the offline Stripe simulator, when no real Stripe key is configured) and /_mail (the
e-mail outbox, when no SMTP server is configured). Unless ``ORGWALLET_WORKER=off``, a job
worker runs in the server's process, started and stopped with the app."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL

from orgwallet.auth.principals import Anonymous
from orgwallet.config import Settings
from orgwallet.errors import Unauthenticated
from orgwallet.jobs.worker import run as run_worker
from orgwallet.mailpage import outbox_route
from orgwallet.runtime import Runtime
from orgwallet.schema.context import Context
from orgwallet.schema.schema import build_schema
from orgwallet.services.audit import request_id_var
from orgwallet.webhooks import stripe_webhook_route

log = logging.getLogger(__name__)


class GraphQLEndpoint(GraphQL[Context, None]):
    """/graphql: Strawberry's plain ASGI view, routed to directly. FastAPI's router and its
    dependency injection cost more per request than most of our resolvers (about a fifth of
    a balance read's CPU), and the endpoint needs neither. JSON is read and written with
    orjson (a page of 100 ledger entries is some 20 KB of JSON). The request's context
    (principal, read connection) is closed when the response has been sent."""

    def __init__(self, runtime: Runtime, **options: Any) -> None:
        super().__init__(build_schema(runtime.settings), **options)
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            context = scope.get("state", {}).pop(_CONTEXT, None)
            if context is not None:
                await context.close()

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        auth_error: str | None = None
        try:
            principal = await self.runtime.authenticate(request.headers.get("authorization"))
        except Unauthenticated as error:
            principal, auth_error = Anonymous(), error.message
        context = Context(
            settings=self.runtime.settings,
            runtime=self.runtime,
            principal=principal,
            request_id=request_id_var.get() or "",
            auth_error=auth_error,
        )
        request.scope.setdefault("state", {})[_CONTEXT] = context
        return context

    def decode_json(self, data: str | bytes) -> object:
        return orjson.loads(data)

    def encode_json(self, data: object) -> bytes:
        try:
            return orjson.dumps(data)
        except TypeError:  # what orjson refuses (an integer past 64 bits...), json writes
            return json.dumps(data, separators=(",", ":")).encode()


_CONTEXT = "orgwallet.context"


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

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What exists at start-up (modules, the schema, the models: some 150,000 objects) lives
        # as long as the process. Frozen out of the garbage collector's reach, it no longer makes
        # each full collection a pause of ~100 ms in the middle of requests (it was the p99).
        gc.freeze()
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
    app.router.routes.append(
        stripe_webhook_route(runtime.driver, runtime.sessions, runtime.gateway, lambda: runtime.clock.now())
    )
    if not settings.smtp_url:
        app.router.routes.append(outbox_route(runtime.driver))

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
