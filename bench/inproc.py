"""CPU per request inside the application, without HTTP: the bench's database and seed, the ASGI
app called directly, one request after another. A quick, repeatable number for one change.

python -m bench.inproc [consume|hot|insufficient|balance|history|typename|healthz|webhook] [-n 2000]
                      [--profile]

It leaves out uvicorn's HTTP parsing and the event loop's socket work (the same for every
request): what it shows is the application's own share. ``--profile`` prints cProfile's top
functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import database, webhooks
from bench import env as bench_env

QUERIES = {
    "consume": "mutation Consume($org: ID!, $amount: BigInt!, $key: String!) { consumeTokens(input: "
    "{organizationId: $org, amount: $amount, idempotencyKey: $key}) { __typename ... on TokensConsumed "
    "{ entry { id balanceAfter } wallet { balance } } ... on UserError { code } } }",
    "balance": "query Balance($org: ID!) { organization(id: $org) { wallet { balance reserved } } }",
    "history": "query History($org: ID!) { organization(id: $org) { wallet { ledger(first: 100) { edges "
    "{ cursor node { id kind amount balanceAfter reason idempotencyKey createdAt } } pageInfo "
    "{ hasNextPage endCursor } } } } }",
    "typename": "query Floor { __typename }",
}


async def call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = False
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return b"".join(chunks)


Request = tuple[str, str, list[tuple[bytes, bytes]], bytes]


async def webhook_requests(
    app: Any, db: database.Database, seeded: database.Seeded, n: int, secret: str
) -> list[Request]:
    """``n`` signed checkout.session.completed deliveries (30% repeated), as bench/webhooks.py
    makes them, but through the app in process."""

    buyers = await webhooks.purchase_keys(db, seeded.many[:20])
    stripe_key = f"Bearer {app.state.runtime.settings.simulator_secret_key}".encode()
    bodies = []
    for i in range(round(n * 0.7)):
        org, key = buyers[i % len(buyers)]
        answer = orjson.loads(
            await call(
                app,
                "POST",
                "/graphql",
                [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())],
                orjson.dumps(
                    {
                        "query": webhooks.START_CHECKOUT,
                        "variables": {"org": org.global_id, "tokens": 10, "key": f"w-{secrets.token_hex(8)}"},
                    }
                ),
            )
        )
        url = answer["data"]["startCheckout"]["checkoutUrl"]
        session_id = webhooks.SESSION_ID.search(url).group(0)  # type: ignore[union-attr]
        session = orjson.loads(
            await call(
                app,
                "GET",
                f"/_stripe/v1/checkout/sessions/{session_id}",
                [(b"authorization", stripe_key)],
                b"",
            )
        )
        bodies.append(webhooks.paid_event(session))
    deliveries = webhooks.burst(bodies, duplicate_share=0.3, secret=secret)
    return [
        (
            "POST",
            "/webhooks/stripe",
            [(b"stripe-signature", sig.encode()), (b"content-type", b"application/json")],
            body,
        )
        for sig, body in deliveries
    ]


async def run(
    mode: str, n: int, profile: bool, workdir: Path, db: database.Database, seeded: database.Seeded
) -> None:
    webhook_secret = f"whsec_inproc_{secrets.token_hex(16)}"
    os.environ.update(
        {
            "ORGWALLET_DATABASE_URL": db.url,
            "ORGWALLET_HOME": str(workdir / "home"),
            "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
            "STRIPE_WEBHOOK_SECRET": webhook_secret,
        }
    )
    from orgwallet.app import create_app

    app = create_app()
    orgs = {"hot": [seeded.hot], "history": [seeded.history]}.get(mode, seeded.many)
    expect = {"insufficient": b"INSUFFICIENT_TOKENS", "healthz": b"ok"}.get(mode, b"")

    def request(i: int) -> Request:
        if mode == "healthz":
            return "GET", "/healthz", [], b""
        org = orgs[i % len(orgs)]
        headers = [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {org.api_key}".encode()),
        ]
        query = QUERIES["consume" if mode in ("hot", "insufficient") else mode]
        variables: dict[str, Any] = {"org": org.global_id}
        if mode in ("consume", "hot", "insufficient"):
            variables["amount"] = 2**53 - 1 if mode == "insufficient" else 1
            variables["key"] = f"inproc-{secrets.token_hex(4)}-{i}"
        return "POST", "/graphql", headers, orjson.dumps({"query": query, "variables": variables})

    async with app.router.lifespan_context(app):
        if mode == "webhook":
            # Each delivery once: the first 100 warm up, the rest (30% repeats) are measured.
            deliveries = await webhook_requests(app, db, seeded, n + 100, webhook_secret)
            warm_up, measured = deliveries[:100], deliveries[100:]
            n = len(measured)
        else:
            # Every API key known, caches filled.
            warm_up = [request(i) for i in range(min(len(orgs), 1000) + 50)]
            measured = [request(i) for i in range(n)]
        for delivery in warm_up:
            await call(app, *delivery)
        sample = await call(app, *warm_up[-1])
        print(sample[:300].decode(errors="replace"))
        if expect:
            assert expect in sample, sample
        elif b'"errors"' in sample:
            raise SystemExit(f"errors in the answer: {sample[:500]!r}")
        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        started: list[float] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses[info["generation"]].append(time.perf_counter() - started.pop())

        gc.callbacks.append(on_gc)
        profiler = cProfile.Profile() if profile else None
        stats_connection = await asyncpg.connect(db.dsn)
        stats_before = await _database_stats(stats_connection)
        pg_cpu = bench_env.tree_cpu_seconds(db.postmaster_pid) or 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for delivery in measured:
            await call(app, *delivery)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        pg_cpu = (bench_env.tree_cpu_seconds(db.postmaster_pid) or 0.0) - pg_cpu
        gc.callbacks.remove(on_gc)
        print(
            "  garbage collections:",
            ", ".join(
                f"gen{g} {len(p)} (longest {1000 * max(p, default=0):.2f} ms, total {1000 * sum(p):.1f} ms)"
                for g, p in pauses.items()
            ),
        )
        stats_after = await _database_stats(stats_connection)
        await stats_connection.close()
        print(
            "  per request:",
            ", ".join(
                f"{k} {(stats_after[k] - stats_before[k]) / n:.2f}"
                for k in stats_before
                if not k.startswith("seq ") or stats_after[k] != stats_before[k]
            ),
        )
        print(
            f"{mode}: {n} requests, {1000 * cpu / n:.3f} CPU ms/request, "
            f"{1000 * pg_cpu / n:.3f} PostgreSQL CPU ms/request, {1000 * wall / n:.3f} wall ms/request"
        )
        if profiler:
            stats = pstats.Stats(profiler)
            by_package: dict[str, float] = {}
            for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
                package = _package(filename)
                by_package[package] = by_package.get(package, 0.0) + tottime
            total = sum(by_package.values())
            for package, seconds in sorted(by_package.items(), key=lambda kv: -kv[1]):
                print(f"  {100 * seconds / total:5.1f}%  {1000 * seconds / n:6.3f} ms/request  {package}")
            for order in ("cumulative", "tottime"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(45)
                print(out.getvalue())


async def _database_stats(connection: Any) -> dict[str, int]:
    """pg_stat_database's counters, and the sequential scans of each table ("seq <table>")."""
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    row = await connection.fetchrow(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated,"
        " blks_hit FROM pg_stat_database WHERE datname = current_database()"
    )
    scans = await connection.fetch("SELECT relname, seq_scan FROM pg_stat_user_tables")
    return dict(row) | {f"seq {r['relname']}": r["seq_scan"] for r in scans}


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/orgwallet/" in filename:
        return "orgwallet." + filename.split("/orgwallet/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in filename:
        return "stdlib." + filename.rsplit("/", 1)[-1].removesuffix(".py")
    return filename


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc")
    parser.add_argument(
        "modes",
        nargs="+",
        choices=["consume", "hot", "insufficient", "balance", "history", "typename", "healthz", "webhook"],
    )
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--organizations", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="orgwallet-inproc-"))
    db = database.start(workdir, None)
    try:
        seeded = asyncio.run(database.seed(db.dsn, args.organizations))
        for mode in args.modes:
            asyncio.run(run(mode, args.n, args.profile, workdir, db, seeded))
    finally:
        db.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
