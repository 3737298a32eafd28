"""The CSV export of a big ledger, measured over HTTP (run by hand, not in CI):

    uv run python -m bench.exports [--entries 1000000] [--runs 2] [--output FILE]

It starts a bench database (embedded, or a new database on ORGWALLET_DATABASE_URL's server),
seeds one organization whose wallet has ``--entries`` consumptions (written with
``generate_series``: the ledger's functions would take minutes), starts the server
(``uvicorn --factory orgwallet.app:create_app``, one process, no job worker), asks for a LEDGER
export with the organization's API key (``createExport``), and downloads it ``--runs`` times.
For each download: the time to the first byte, rows and megabytes per second, and the server
process's memory: its resident set before, the peak sampled every 10 ms during the download,
and ``VmHWM`` (the process's high-water mark) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg
import httpx

from bench import database
from bench.env import machine
from bench.server import Server

CREATE_EXPORT = "mutation($org: ID!) { createExport(input: {organizationId: $org, kind: LEDGER}) { url } }"


@dataclass
class Download:
    rows: int
    megabytes: float
    first_byte_ms: float
    seconds: float
    rows_per_second: float
    megabytes_per_second: float
    rss_before_mb: float
    rss_peak_mb: float
    hwm_before_mb: float
    hwm_after_mb: float


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler(threading.Thread):
    """The process's resident set, sampled every 10 ms until stopped: its peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = _status_kb(pid, "VmRSS")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak_kb


async def seed_history(dsn: str, wallet_id: object, entries: int) -> None:
    """``entries`` consumptions of 1 token, newest last, the wallet's balance and counters
    moved to match (its lots are left as they were: this history is for reading only)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                """
                WITH w AS (
                    UPDATE wallets SET entry_seq = entry_seq + $2, balance = balance - $2,
                                       lifetime_consumed = lifetime_consumed + $2
                    WHERE id = $1 RETURNING id, entry_seq - $2 AS seq, balance + $2 AS balance
                )
                INSERT INTO ledger_entries (wallet_id, seq, kind, amount, balance_after, reserved_after,
                                            reason, metadata, actor, created_at)
                SELECT w.id, w.seq + i, 'consumption', -1, w.balance - i, 0, 'bench history',
                       CASE WHEN i % 10 = 0 THEN jsonb_build_object('job', i, 'model', 'large') END,
                       'bench', now() - make_interval(secs => $2 - i)
                FROM w, generate_series(1, $2::int) AS i
                """,
                wallet_id,
                entries,
            )
        await conn.execute("VACUUM ANALYZE ledger_entries")
    finally:
        await conn.close()


async def download(base: str, path: str, pid: int) -> Download:
    hwm_before = _status_kb(pid, "VmHWM")
    sampler = RssSampler(pid)
    rss_before = sampler.peak_kb
    sampler.start()
    size = rows = 0
    first_byte: float | None = None
    async with httpx.AsyncClient(base_url=base, timeout=600) as browser:
        started = time.perf_counter()
        async with browser.stream("GET", path) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw():
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                size += len(chunk)
                rows += chunk.count(b"\r\n")
        seconds = time.perf_counter() - started
    peak = sampler.stop()
    rows -= 1  # the header
    return Download(
        rows=rows,
        megabytes=round(size / 1e6, 1),
        first_byte_ms=round((first_byte or 0.0) * 1000, 1),
        seconds=round(seconds, 2),
        rows_per_second=round(rows / seconds),
        megabytes_per_second=round(size / 1e6 / seconds, 1),
        rss_before_mb=round(rss_before / 1024, 1),
        rss_peak_mb=round(peak / 1024, 1),
        hwm_before_mb=round(hwm_before / 1024, 1),
        hwm_after_mb=round(_status_kb(pid, "VmHWM") / 1024, 1),
    )


def run(entries: int, runs: int, workdir: Path) -> dict[str, object]:
    db = database.start(workdir, os.environ.get("ORGWALLET_DATABASE_URL") or None)
    try:
        seeded = asyncio.run(database.seed(db.dsn, 1))
        org = seeded.many[0]
        started = time.perf_counter()
        asyncio.run(seed_history(db.dsn, org.wallet_id, entries))
        seed_seconds = time.perf_counter() - started
        env = {
            "ORGWALLET_DATABASE_URL": db.url,
            "ORGWALLET_HOME": str(workdir / "home"),
            "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
            "ORGWALLET_WORKER": "off",
        }
        server = Server(workers=1, env=env, log=workdir / "server.log")
        server.start()
        try:
            assert server.process is not None
            pid = server.process.pid
            response = httpx.post(
                f"{server.url}/graphql",
                json={"query": CREATE_EXPORT, "variables": {"org": org.global_id}},
                headers={"Authorization": f"Bearer {org.api_key}"},
                timeout=30,
            )
            body = response.json()
            assert not body.get("errors"), body
            path = "/" + body["data"]["createExport"]["url"].split("/", 3)[3]
            downloads = [asyncio.run(download(server.url, path, pid)) for _ in range(runs)]
        finally:
            server.stop()
    finally:
        db.stop()
    return {
        "entries": entries,
        "seed_seconds": round(seed_seconds, 1),
        "machine": machine(),
        "downloads": [asdict(d) for d in downloads],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exports", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="orgwallet-bench-exports-"))
    try:
        results = run(args.entries, args.runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    for d in results["downloads"]:  # type: ignore[attr-defined]
        print(
            f"{d['rows']:,} rows, {d['megabytes']} MB: first byte {d['first_byte_ms']} ms, "
            f"{d['rows_per_second']:,} rows/s, server RSS {d['rss_before_mb']} -> peak {d['rss_peak_mb']} MB",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
