"""The composition root: what a process of orgwallet needs, built one way for the web app, the
CLI and the job worker.

``Runtime.build(settings)`` makes the database engine and its two pools (SQLAlchemy's, and
asyncpg's for the hot paths), the consumption batcher, the API-key cache, the JWT verifier,
the clock, the Stripe gateway (with the offline simulator when no key is configured), the
mail transport and the hub of live updates (which listens from its first subscriber on).
``app=`` is given by the web app only: the simulator is then mounted on it and reached in
process; a worker without an app reaches the simulator of the running server over HTTP
(``ORGWALLET_PUBLIC_URL``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from orgwallet.auth import api_keys as key_secrets
from orgwallet.auth.principals import Anonymous, Principal
from orgwallet.auth.tokens import JwtVerifier
from orgwallet.clock import Clock, clock_for
from orgwallet.config import Settings
from orgwallet.db.engine import DriverPool, create_engine, session_factory
from orgwallet.errors import Unauthenticated
from orgwallet.ledger.batching import ConsumptionBatcher
from orgwallet.live import LiveHub
from orgwallet.payments.gateway import StripeGateway
from orgwallet.payments.runtime import StripeConnection, connect_stripe
from orgwallet.payments.simulator import Simulator
from orgwallet.services import api_keys as key_service
from orgwallet.services.mail import MailTransport, transport_for

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    driver: DriverPool
    jwt: JwtVerifier
    stripe: StripeConnection
    clock: Clock
    mail: MailTransport
    sessions: async_sessionmaker[AsyncSession] = field(init=False)
    read_sessions: async_sessionmaker[AsyncSession] = field(init=False)
    batcher: ConsumptionBatcher = field(init=False)
    principals: key_service.PrincipalCache = field(init=False)
    live: LiveHub = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = session_factory(self.engine)
        # Sessions for reads: autocommit, the connection taken at the first statement.
        self.read_sessions = session_factory(self.engine.execution_options(isolation_level="AUTOCOMMIT"))
        self.batcher = ConsumptionBatcher(self.driver)
        self.principals = key_service.PrincipalCache(self.driver)
        self.live = LiveHub(self.driver, self.sessions, lease_seconds=self.settings.live_lease_seconds)

    @classmethod
    def build(cls, settings: Settings, *, app: FastAPI | None = None) -> Runtime:
        if not settings.database_url:
            raise RuntimeError("ORGWALLET_DATABASE_URL is not set (`orgwallet serve` sets it up)")
        engine = create_engine(settings.database_url, pool_size=settings.database_pool_size)
        return cls(
            settings=settings,
            engine=engine,
            driver=DriverPool(settings.database_url, settings.database_pool_size),
            jwt=JwtVerifier(settings),
            stripe=connect_stripe(settings, app),
            clock=clock_for(settings.clock_file),
            mail=transport_for(settings),
        )

    @property
    def gateway(self) -> StripeGateway:
        return self.stripe.gateway

    @property
    def simulator(self) -> Simulator | None:
        """The offline Stripe, when it is the one in use and mounted here (tests drive it)."""
        return self.stripe.simulator

    async def close(self) -> None:
        await self.live.close()
        await self.stripe.close()
        await self.driver.close()
        await self.engine.dispose()

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
            async with self.driver.acquire() as connection:
                principal = await key_service.authenticate(connection, token)
            self.principals.remember(secret_hash, principal, version)
            return principal
        return self.jwt.verify(token)
