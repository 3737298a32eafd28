"""The ``orgwallet`` command: serve, worker, migrate, token, and ledger upkeep."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from orgwallet.config import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="orgwallet: prepaid token wallets")


@cli.callback()
def _logging() -> None:
    # Every command logs the same way (ORGWALLET_LOG_FORMAT); `serve` hands it to uvicorn too.
    from orgwallet.logs import configure_logging

    configure_logging(Settings().log_format)


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The database URL to use, migrated to the current schema: the configured one, or the
    embedded PostgreSQL. An embedded PostgreSQL started here is stopped on the way out; one
    that was running already (another ``serve``) is reused and left running."""
    from orgwallet.db.migrate import upgrade

    if settings.database_url:
        upgrade(settings.database_url)
        yield settings.database_url
        return
    from orgwallet.db.engine import embedded_database_url, start_embedded_postgres

    embedded = start_embedded_postgres(settings.home)
    if embedded.started:
        typer.echo(f"embedded PostgreSQL: {embedded.pgdata} (stopped when this command ends)")
    else:
        typer.echo(
            f"embedded PostgreSQL: {embedded.pgdata} was running already (pid {embedded.pid}): "
            "reused, and left running"
        )
    try:
        url = embedded_database_url(embedded.server)
        upgrade(url)
        yield url
    finally:
        if embedded.started:
            embedded.stop()
            typer.echo("embedded PostgreSQL stopped")


def _exit_on_sigterm() -> None:
    """SIGTERM ends the process as Ctrl-C does, through ``finally`` blocks (uvicorn hands the
    signal on to this handler once it has shut down), so that what was started is stopped."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development)")] = False,
) -> None:
    """Run the API server (on the embedded PostgreSQL unless ORGWALLET_DATABASE_URL is set)."""
    import uvicorn

    from orgwallet.logs import log_config

    settings = Settings()
    _exit_on_sigterm()
    with database(settings) as url:
        os.environ["ORGWALLET_DATABASE_URL"] = url
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
            if host not in _LOOPBACK:
                _warn_simulator_exposed(host, port)
        if settings.worker == "embedded":
            typer.echo(
                "jobs:      a worker runs in the server (ORGWALLET_WORKER=off to run `orgwallet worker`s)"
            )
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
            log_config=log_config(settings.log_format),
        )


def _warn_simulator_exposed(host: str, port: int) -> None:
    """Said loudly: the stand-in for Stripe is meant for one machine."""
    rule = "!" * 78
    typer.secho(
        f"{rule}\n"
        f"WARNING: serving on {host}:{port}, beyond this machine, with the OFFLINE STRIPE SIMULATOR.\n"
        "  No real payment can be made: every 'payment' is simulated, and tokens bought through it\n"
        "  are free. Its checkout and receipt pages are open to anyone who can reach this port\n"
        "  (its API and test controls need this installation's key). Set STRIPE_SECRET_KEY and\n"
        "  STRIPE_WEBHOOK_SECRET for real payments, or bind to 127.0.0.1.\n"
        f"{rule}",
        err=True,
        fg=typer.colors.RED,
        bold=True,
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
    import signal

    from orgwallet.jobs.worker import run
    from orgwallet.runtime import Runtime

    async def main(settings: Settings) -> None:
        runtime = Runtime.build(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(runtime, stop)
        finally:
            await runtime.close()

    settings = Settings()
    with database(settings) as url:
        typer.echo("worker: running jobs until SIGINT or SIGTERM")
        asyncio.run(main(settings.model_copy(update={"database_url": url})))


@cli.command()
def migrate() -> None:
    """Apply the database migrations."""
    with database(Settings()):
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

    with database(Settings()) as url:
        broken = asyncio.run(_check(url))
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
    """Sweep expired credit lots and reservations now: the job worker does it every five minutes
    (the ``ledger.sweep`` duty); this is for a database without one."""
    import asyncio

    with database(Settings()) as url:
        settled = asyncio.run(_expire(url))
    typer.echo(f"settled {settled} wallet(s)")


@cli.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A run of about two minutes")] = False,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="A few seconds, for CI: it runs, the ledger holds")
    ] = False,
    output: Annotated[str | None, typer.Option(help="Where to write the results (JSON)")] = None,
) -> None:
    """Load benchmark against PostgreSQL's own limit (pgbench in the same run): prints one table
    and writes bench/results.json; README.md, section "Benchmark", explains each workload. Run
    it from the repository. Starts its own PostgreSQL unless ORGWALLET_DATABASE_URL is set."""
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
