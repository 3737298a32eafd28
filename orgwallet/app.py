"""The FastAPI application: /graphql, /webhooks/stripe, /healthz, /readyz (and /_stripe, the
offline Stripe simulator, when no real Stripe key is configured)."""

from __future__ import annotations

import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL

from orgwallet.auth import api_keys as key_secrets
from orgwallet.auth.principals import Anonymous, Principal
from orgwallet.auth.tokens import JwtVerifier
from orgwallet.config import Settings
from orgwallet.db.engine import create_engine, dispose, driver_pool, session_factory
from orgwallet.errors import Unauthenticated
from orgwallet.payments.gateway import StripeGateway
from orgwallet.payments.runtime import StripeConnection, connect_stripe
from orgwallet.payments.simulator import Simulator
from orgwallet.schema.context import Context
from orgwallet.schema.schema import build_schema
from orgwallet.services import api_keys as key_service
from orgwallet.services.audit import request_id_var
from orgwallet.webhooks import stripe_webhook_route

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Process-wide collaborators, built once at start-up."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    jwt: JwtVerifier
    stripe: StripeConnection
    principals: key_service.PrincipalCache = field(init=False)
    read_sessions: async_sessionmaker[AsyncSession] = field(init=False)

    def __post_init__(self) -> None:
        self.principals = key_service.PrincipalCache(self.engine)
        # Sessions for reads: autocommit, the connection taken at the first statement.
        self.read_sessions = session_factory(self.engine.execution_options(isolation_level="AUTOCOMMIT"))

    @property
    def gateway(self) -> StripeGateway:
        return self.stripe.gateway

    @property
    def simulator(self) -> Simulator | None:
        """The offline Stripe, when it is the one in use (tests drive it directly)."""
        return self.stripe.simulator

    async def close(self) -> None:
        await self.stripe.close()
        await dispose(self.engine)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            return Anonymous()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization must be 'Bearer <token>'")
        token = token.strip()
        if key_secrets.looks_like_api_key(token):
            secret_hash = key_secrets.hash_secret(token)
            cached = await self.principals.get(secret_hash)
            if cached is not None:
                return cached
            version = self.principals.version
            # One statement, atomic on its own: no BEGIN and COMMIT round trips around it.
            async with driver_pool(self.engine).acquire() as connection:
                principal = await key_service.authenticate(connection, token)
            self.principals.remember(secret_hash, principal, version)
            return principal
        return self.jwt.verify(token)


class GraphQLEndpoint(GraphQL[Context, None]):
    """/graphql: Strawberry's plain ASGI view, routed to directly. FastAPI's router and its
    dependency injection cost more per request than most of our resolvers (about a fifth of
    a balance read's CPU), and the endpoint needs neither. JSON is read and written with
    orjson (a page of 100 ledger entries is some 20 KB of JSON). The request's context
    (principal, read connection) is closed when the response has been sent."""

    def __init__(self, services: Services, **options: Any) -> None:
        super().__init__(build_schema(services.settings), **options)
        self.services = services

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
            principal = await self.services.authenticate(request.headers.get("authorization"))
        except Unauthenticated as error:
            principal, auth_error = Anonymous(), error.message
        context = Context(
            settings=self.services.settings,
            services=self.services,
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
    if not settings.database_url:
        raise RuntimeError("ORGWALLET_DATABASE_URL is not set (`orgwallet serve` sets it up)")
    engine = create_engine(settings.database_url, pool_size=settings.database_pool_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What exists at start-up (modules, the schema, the models: some 150,000 objects) lives
        # as long as the process. Frozen out of the garbage collector's reach, it no longer makes
        # each full collection a pause of ~100 ms in the middle of requests (it was the p99).
        gc.freeze()
        yield
        await services.close()

    app = FastAPI(title="orgwallet", lifespan=lifespan)
    services = Services(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        jwt=JwtVerifier(settings),
        stripe=connect_stripe(app, settings),
    )
    app.state.services = services
    app.state.simulator = services.simulator

    graphql = GraphQLEndpoint(services, graphql_ide="graphiql" if settings.graphiql else None)
    # An ASGI app as a route's endpoint: Starlette calls it as it is (typed for functions only).
    app.add_route("/graphql", graphql, methods=["GET", "POST"])  # type: ignore[arg-type]
    app.router.routes.append(stripe_webhook_route(engine, services.sessions, services.gateway))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            async with services.sessions() as session:
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
