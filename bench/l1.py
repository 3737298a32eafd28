"""L1: the consumption statement through raw asyncpg, in one Python process.

python -m bench.l1 <json arguments>   prints one JSON line with the counts and latencies.

What the app sends for one consumption, minus the app: ``SELECT * FROM ledger_consume(...)``
as a prepared statement on a connection of its own per client, in autocommit (one round
trip), for ``seconds``; the key is unique per call.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from typing import Any

import asyncpg

CONSUME = "SELECT * FROM ledger_consume($1, $2, $3, NULL, NULL, $4, now())"


async def client(
    dsn: str, wallets: list[str], actor: str, nonce: str, n: int, deadline: float, out: dict[str, Any]
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        statement = await conn.prepare(CONSUME)
        counter = 0
        while time.perf_counter() < deadline:
            counter += 1
            wallet = wallets[random.randrange(len(wallets))]
            started = time.perf_counter()
            row = await statement.fetchrow(wallet, 1, f"{nonce}-{n}-{counter}", actor)
            out["latencies"].append(time.perf_counter() - started)
            out["outcomes"][row["outcome"]] = out["outcomes"].get(row["outcome"], 0) + 1
    finally:
        await conn.close()


async def drive(args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "outcomes": {}}
    started = time.perf_counter()
    deadline = started + float(args["seconds"])
    await asyncio.gather(
        *(
            client(args["dsn"], args["wallets"], args["actor"], args["nonce"], n, deadline, out)
            for n in range(int(args["clients"]))
        )
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(out["latencies"])
    usage = resource.getrusage(resource.RUSAGE_SELF)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "outcomes": out["outcomes"],
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(drive(args))))


if __name__ == "__main__":
    main()
