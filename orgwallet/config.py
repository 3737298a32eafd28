"""Settings, read from the environment (prefix ``ORGWALLET_``) and from ``.env``.

Stripe keys keep the names Stripe users already know (``STRIPE_SECRET_KEY``,
``STRIPE_WEBHOOK_SECRET``). With no database URL the embedded PostgreSQL of
``pgserver`` is used, with its data and the generated JWT secret kept in
``home`` (``./.orgwallet`` by default).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORGWALLET_", env_file=".env", extra="ignore", populate_by_name=True
    )

    home: Path = Path(".orgwallet")
    database_url: str | None = None
    database_pool_size: int = 20

    # Authentication. HS256 with `jwt_secret`, or RS256 with keys from `jwt_jwks_url`.
    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_jwks_url: str | None = None
    jwt_issuer: str = "orgwallet"
    jwt_audience: str = "orgwallet"
    jwt_leeway_seconds: int = 30
    jwt_admin_claim: str | None = "orgwallet_admin"
    platform_admins: list[str] = Field(default_factory=list)

    cors_origins: list[str] = Field(default_factory=list)
    graphiql: bool = True
    max_query_depth: int = 12
    max_query_tokens: int = 2000
    # Limits against abuse of /graphql (orgwallet/schema/limits.py). The price of a query:
    # each field counts 1, times the size of the lists it is in (a connection's first/last);
    # a dashboard's queries cost some hundreds to a few thousand.
    max_query_cost: int = 10_000
    # A bigger request body is refused (413) before it is read.
    max_request_bytes: int = 1_000_000
    # What a client may store in `metadata`: its size as JSON (UTF-8), its nesting depth.
    max_metadata_bytes: int = 8192
    max_metadata_depth: int = 5

    # Ledger defaults.
    trial_tokens: int = 3
    trial_days: int = 30

    stripe_secret_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_SECRET_KEY", "ORGWALLET_STRIPE_SECRET_KEY"),
    )
    stripe_webhook_secret: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "ORGWALLET_STRIPE_WEBHOOK_SECRET"),
    )
    # Where a browser reaches this server: the offline Stripe simulator's checkout pages are
    # served under <public_url>/_stripe. `orgwallet serve` sets it from its host and port.
    public_url: str = "http://127.0.0.1:8000"

    # Buying tokens.
    currency: str = "USD"
    min_custom_tokens: int = 1
    max_custom_tokens: int = 100_000

    # Background work. `serve` runs one job worker in its process unless this is "off";
    # `orgwallet worker` runs more, in processes of their own, against the same database.
    worker: Literal["embedded", "off"] = "embedded"
    worker_concurrency: int = 10
    # A job whose worker stopped sending heartbeats (killed) is run again after this long.
    worker_heartbeat_seconds: float = 30.0
    # How often every worker checks for due periodic duties (a cron expression; six fields
    # count seconds). Each duty still runs once per its own period, however many workers tick.
    duty_tick_cron: str = "* * * * *"
    # A file holding the current time for every process that reads it (tests only).
    clock_file: Path | None = None

    # Notifications and e-mail. With no SMTP server, mail is kept in the outbox that
    # `serve` shows at /_mail.
    smtp_url: str | None = None  # smtp://user:password@host:587 (STARTTLS) or smtps://host:465
    mail_from: str = "orgwallet <no-reply@orgwallet.localhost>"
    smtp_timeout_seconds: float = 30.0
    expiring_reminder_days: int = 7
    max_balance_alerts: int = 20

    # Automatic top-ups: at most this many per wallet in 24 hours, whatever happens.
    auto_top_up_max_per_day: int = 5
    # Subscriptions: how long a past-due subscription keeps its plan before it is canceled and
    # the wallet suspended, and how many days before each renewal the organization is told.
    subscription_grace_days: float = Field(default=7.0, gt=0)
    subscription_reminder_days: float = Field(default=3.0, ge=0)
    # A CSV export's link (createExport) opens the download for this long.
    export_link_seconds: int = 300
    # Where the single-page app lives: a payment page opened for the customer (a card asking
    # for authentication) returns there. Unset: the server's own address.
    app_url: str | None = None

    # Live updates (GraphQL subscriptions). Each subscription re-checks its caller's access at
    # least this often (a removed member or a revoked key stops receiving within it), and
    # before it delivers a change when the last check is older.
    live_recheck_seconds: float = 5.0
    # How long a process's watch of a wallet (what makes the database NOTIFY its changes)
    # outlives the process: renewed every third of it while someone watches.
    live_lease_seconds: float = 60.0

    # Operations. Log lines as text or as one JSON object each. /metrics (Prometheus) is
    # served only with this bearer token; unset, there is no /metrics.
    log_format: Literal["text", "json"] = "text"
    metrics_token: str | None = None

    @cached_property
    def signing_secret(self) -> str:
        """The HS256 secret: configured, or generated once and kept under ``home``."""
        if self.jwt_secret:
            return self.jwt_secret
        return self._home_secret("jwt-secret", lambda: secrets.token_urlsafe(48))

    @cached_property
    def webhook_secret(self) -> str:
        """The Stripe webhook signing secret: configured, or (for the offline simulator, which
        signs with it) generated once and kept under ``home``."""
        if self.stripe_webhook_secret:
            return self.stripe_webhook_secret
        return self._home_secret("stripe-webhook-secret", lambda: "whsec_" + secrets.token_hex(24))

    @cached_property
    def simulator_secret_key(self) -> str:
        """The only API key the offline Stripe simulator accepts (as Stripe accepts only
        yours): generated once and kept under ``home``, shared by every process of the
        installation (servers, workers)."""
        return self._home_secret("stripe-simulator-secret-key", lambda: "sk_test_" + secrets.token_hex(24))

    def _home_secret(self, name: str, make: Callable[[], str]) -> str:
        path = self.home / name
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: of several processes starting at once, exactly one writes the secret.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(make())
        return path.read_text().strip()


def get_settings() -> Settings:
    return Settings()
