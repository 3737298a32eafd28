"""The ``orgwallet`` command: serve, migrate, token, and ledger upkeep."""

from __future__ import annotations

import os
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
    typer.echo(f"GraphiQL:  http://{host}:{port}/graphql")
    typer.echo("a token:   uv run orgwallet token --sub alice --email alice@example.com")
    typer.echo('           then in GraphiQL headers: {"Authorization": "Bearer <token>"}')
    uvicorn.run(
        "orgwallet.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=None if reload else workers,
        reload=reload,
        log_level="info",
    )


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


@cli.command("print-schema")
def print_schema_command() -> None:
    """Print the GraphQL schema (SDL)."""
    from orgwallet.schema.schema import print_schema

    typer.echo(print_schema(), nl=False)


def main() -> None:
    cli()
