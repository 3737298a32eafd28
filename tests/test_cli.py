"""The command line: `orgwallet check` names a broken wallet and fails; `token` mints."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import jwt
from sqlalchemy import text
from typer.testing import CliRunner

from orgwallet.cli import cli
from orgwallet.db.engine import create_engine, session_factory, transaction


def run_sql(database_url: str, *statements: str) -> list[object]:
    """Runs statements in one transaction and returns each one's first column of the first row."""

    async def go() -> list[object]:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with transaction(session_factory(engine)) as s:
                results = [await s.execute(text(sql)) for sql in statements]
                return [r.scalar() if r.returns_rows else None for r in results]
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_check_passes_then_names_a_broken_wallet(database_url: str) -> None:
    runner = CliRunner()
    env = {"ORGWALLET_DATABASE_URL": database_url}
    [_, wallet, _] = run_sql(
        database_url,
        "INSERT INTO organizations (name, slug) VALUES ('A', 'a')",
        "INSERT INTO wallets (organization_id) SELECT id FROM organizations RETURNING id",
        "SELECT outcome FROM ledger_credit((SELECT id FROM wallets), 'admin_grant', 'admin', 5, 10::smallint,"
        " NULL, NULL, NULL, 'k', 'r', NULL, 'test', NULL, now())",
    )
    ok = runner.invoke(cli, ["check"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "ledger ok" in ok.output
    run_sql(database_url, "UPDATE wallets SET balance = 6")
    broken = runner.invoke(cli, ["check"], env=env)
    assert broken.exit_code == 1
    assert f"wallet {wallet}" in broken.output and "sum of lots remaining" in broken.output


def test_token_mints_a_verifiable_jwt() -> None:
    out = subprocess.run(
        ["uv", "run", "orgwallet", "token", "--sub", "alice", "--email", "a@x.io", "--admin", "--ttl", "60"],
        capture_output=True,
        text=True,
        env={"ORGWALLET_JWT_SECRET": "s" * 40, "PATH": os.environ["PATH"]},
        check=True,
        timeout=60,
    )
    claims = jwt.decode(out.stdout.strip(), "s" * 40, algorithms=["HS256"], audience="orgwallet")
    assert claims["sub"] == "alice" and claims["email"] == "a@x.io" and claims["orgwallet_admin"] is True
    assert claims["exp"] - claims["iat"] == 60


def _orgwallet(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ORGWALLET_", "STRIPE_", "XDG_"))}
    return subprocess.run(
        ["uv", "run", "--project", str(REPOSITORY), "orgwallet", *args],
        capture_output=True,
        text=True,
        env=base | env,
        cwd=cwd,
        check=False,
        timeout=180,
    )


REPOSITORY = Path(__file__).resolve().parents[1]


def test_help_names_what_exists(tmp_path: Path) -> None:
    bench = _orgwallet("bench", "--help", env={}, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert "PERFORMANCE.md" not in bench.stdout  # not in this repository
    assert "README.md" in bench.stdout and (REPOSITORY / "README.md").exists()
    expire = _orgwallet("expire", "--help", env={}, cwd=tmp_path)
    assert "ledger.sweep" in expire.stdout and "will do it" not in expire.stdout


def test_a_command_on_the_embedded_postgres_is_quiet_and_stops_what_it_started(
    tmp_path: Path, embedded_home: Path
) -> None:
    """No XDG_RUNTIME_DIR warning (unset, as on most servers), and the PostgreSQL that
    `migrate` started for itself is not left running."""
    home = embedded_home
    done = _orgwallet("migrate", env={"ORGWALLET_HOME": str(home)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "migrations applied" in done.stdout
    assert "XDG_RUNTIME_DIR" not in done.stderr + done.stdout
    assert "embedded PostgreSQL stopped" in done.stdout
    assert not (home / "pg" / "postmaster.pid").exists()
