"""The ``orgwallet`` command: serve, worker, migrate, token, and ledger upkeep."""

from __future__ import annotations

import os
import uuid
from typing import Annotated

import typer

from orgwallet.config import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="orgwallet: prepaid token wallets")


def prepare_database(settings: Settings) -> str:
    """The database URL to use: the configured one, or the embedded PostgreSQL (started here).
    Migrations are applied either way, so every start is on the current schema."""
    from orgwallet.db.migrate import upgrade

    url = settings.database_url
    if not url:
        from orgwallet.db.engine import embedded_database_url, start_embedded_postgres

        server = start_embedded_postgres(settings.home)
        url = embedded_database_url(server)
        typer.echo(f"embedded PostgreSQL: {(settings.home / 'pg').resolve()}")
    upgrade(url)
    return url


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development)")] = False,
) -> None:
    """Run the API server (on the embedded PostgreSQL unless ORGWALLET_DATABASE_URL is set)."""
    import uvicorn

    settings = Settings()
    os.environ["ORGWALLET_DATABASE_URL"] = prepare_database(settings)
    if not settings.jwt_secret and not settings.jwt_jwks_url:
        # Generate the development secret before workers start, so they all share it.
        os.environ["ORGWALLET_JWT_SECRET"] = settings.signing_secret
    public_url = os.environ.get("ORGWALLET_PUBLIC_URL") or f"http://{_browsable(host)}:{port}"
    os.environ["ORGWALLET_PUBLIC_URL"] = public_url
    typer.echo(f"GraphiQL:  {public_url}/graphql")
    typer.echo("a token:   uv run orgwallet token --sub alice --email alice@example.com")
    typer.echo('           then in GraphiQL headers: {"Authorization": "Bearer <token>"}')
    if not settings.stripe_secret_key:
        os.environ["STRIPE_WEBHOOK_SECRET"] = settings.webhook_secret
        typer.echo(f"Stripe:    offline simulator at {public_url}/_stripe (no STRIPE_SECRET_KEY)")
        typer.echo("           pay on its checkout page with the test card 4242 4242 4242 4242")
        if workers > 1:
            typer.echo("           it keeps its state in memory: use --workers 1 with it", err=True)
    if settings.worker == "embedded":
        typer.echo("jobs:      a worker runs in the server (ORGWALLET_WORKER=off to run `orgwallet worker`s)")
    if not settings.smtp_url:
        typer.echo(f"e-mail:    kept in the outbox at {public_url}/_mail (no ORGWALLET_SMTP_URL)")
    uvicorn.run(
        "orgwallet.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=None if reload else workers,
        reload=reload,
        log_level="info",
    )


def _browsable(host: str) -> str:
    """An address a browser on this machine can open for a bind address."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (not binding: naming what was bound)
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@cli.command()
def worker() -> None:
    """Run background jobs (a job worker; start as many as you like against one database)."""
    import asyncio
    import logging
    import signal

    from orgwallet.jobs.worker import run
    from orgwallet.runtime import Runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    settings = settings.model_copy(update={"database_url": _database_url()})

    async def main() -> None:
        runtime = Runtime.build(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(runtime, stop)
        finally:
            await runtime.close()

    typer.echo("worker: running jobs until SIGINT or SIGTERM")
    asyncio.run(main())


@cli.command()
def migrate() -> None:
    """Apply the database migrations."""
    prepare_database(Settings())
    typer.echo("migrations applied")


@cli.command()
def token(
    sub: Annotated[str, typer.Option(help="Subject (user id)")],
    email: Annotated[str | None, typer.Option(help="E-mail claim")] = None,
    admin: Annotated[bool, typer.Option(help="Platform administrator")] = False,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 3600,
) -> None:
    """Print a JWT signed with the configured secret, for GraphiQL or curl."""
    from orgwallet.auth.tokens import mint_token

    typer.echo(mint_token(Settings(), subject=sub, email=email, admin=admin, ttl_seconds=ttl))


def _database_url() -> str:
    settings = Settings()
    if settings.database_url:
        return settings.database_url
    return prepare_database(settings)


async def _check(url: str) -> dict[uuid.UUID, list[str]]:
    from orgwallet import ledger
    from orgwallet.db.engine import create_engine, session_factory

    engine = create_engine(url, pool_size=1)
    try:
        async with session_factory(engine)() as session:
            return await ledger.violations(session)
    finally:
        await engine.dispose()


@cli.command()
def check() -> None:
    """Verify the ledger invariants of every wallet; exit 1 naming each broken wallet."""
    import asyncio

    broken = asyncio.run(_check(_database_url()))
    for wallet_id, problems in broken.items():
        for problem in problems:
            typer.echo(f"wallet {wallet_id}: {problem}", err=True)
    if broken:
        typer.echo(f"{len(broken)} wallet(s) broken", err=True)
        raise typer.Exit(1)
    typer.echo("ledger ok")


async def _expire(url: str) -> int:
    from orgwallet.db.engine import create_engine, session_factory
    from orgwallet.services.wallets import sweep_expired

    engine = create_engine(url, pool_size=1)
    try:
        return await sweep_expired(session_factory(engine))
    finally:
        await engine.dispose()


@cli.command()
def expire() -> None:
    """Sweep expired credit lots and reservations now (the worker will do it on a schedule)."""
    import asyncio

    settled = asyncio.run(_expire(_database_url()))
    typer.echo(f"settled {settled} wallet(s)")


@cli.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A run of about two minutes")] = False,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="A few seconds, for CI: it runs, the ledger holds")
    ] = False,
    output: Annotated[str | None, typer.Option(help="Where to write the results (JSON)")] = None,
) -> None:
    """Load benchmark against PostgreSQL's own limit (bench/, PERFORMANCE.md): one table and
    bench/results.json. Starts its own PostgreSQL unless ORGWALLET_DATABASE_URL is set."""
    import importlib

    try:
        # Imported by name: bench/ is tooling beside the package, not part of it (nor of mypy's run).
        run_bench = importlib.import_module("bench.main").main
    except ImportError as exc:  # an installed wheel carries no bench/: it lives in the repository
        raise typer.BadParameter("run it from the repository (bench/ is not installed)") from exc
    argv = ["--quick"] if quick else ["--smoke"] if smoke else []
    if output:
        argv += ["--output", output]
    raise typer.Exit(run_bench(argv))


@cli.command("print-schema")
def print_schema_command() -> None:
    """Print the GraphQL schema (SDL)."""
    from orgwallet.schema.schema import print_schema

    typer.echo(print_schema(), nl=False)


def main() -> None:
    cli()
