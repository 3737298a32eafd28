"""CPU per request inside the application, without HTTP: the bench's database and seed, the ASGI
app called directly, one request after another. A quick, repeatable number for one change.

python -m bench.inproc [consume|hot|insufficient|balance|history|typename|healthz] [-n 2000] [--profile]

It leaves out uvicorn's HTTP parsing and the event loop's socket work (the same for every
request): what it shows is the application's own share. ``--profile`` prints cProfile's top
functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import database

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


async def run(mode: str, n: int, profile: bool, workdir: Path, db_url: str, seeded: database.Seeded) -> None:
    os.environ.update(
        {
            "ORGWALLET_DATABASE_URL": db_url,
            "ORGWALLET_HOME": str(workdir / "home"),
            "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
        }
    )
    from orgwallet.app import create_app

    app = create_app()
    orgs = {"hot": [seeded.hot], "history": [seeded.history]}.get(mode, seeded.many)
    expect = {"insufficient": b"INSUFFICIENT_TOKENS", "healthz": b"ok"}.get(mode, b"")

    def request(i: int) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
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
        # Warm-up: every API key known, caches filled.
        for i in range(min(len(orgs), 1000) + 50):
            await call(app, *request(i))
        sample = await call(app, *request(0))
        print(sample[:300].decode(errors="replace"))
        if expect:
            assert expect in sample, sample
        elif b'"errors"' in sample:
            raise SystemExit(f"errors in the answer: {sample[:500]!r}")
        profiler = cProfile.Profile() if profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for i in range(n):
            await call(app, *request(i))
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"{mode}: {n} requests, {1000 * cpu / n:.3f} CPU ms/request, "
            f"{1000 * wall / n:.3f} wall ms/request"
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
        choices=["consume", "hot", "insufficient", "balance", "history", "typename", "healthz"],
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
            asyncio.run(run(mode, args.n, args.profile, workdir, db.url, seeded))
    finally:
        db.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
