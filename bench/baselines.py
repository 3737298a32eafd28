"""L0 (pgbench) and L1 (raw asyncpg): the consumption statement without the app."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.database import WALLET_PREFIX, Database, Org

#: One consumption as the app sends it: the ledger function, one statement, one round trip.
#: The wallet id is built from pgbench's integer (see database.WALLET_PREFIX); the key is
#: unique per transaction (client id and a 63-bit random); the actor is as long as an API
#: key's ("apikey:<uuid>").
PGBENCH_SCRIPT = f"""\\set n random(1, :wallets)
\\set k random(1, 9000000000000000000)
SELECT * FROM ledger_consume(('{WALLET_PREFIX}' || lpad(to_hex(:n::int), 12, '0'))::uuid, 1, \
  'pgb' || :nonce || '-' || :client_id || '-' || :k, NULL, NULL, \
  'apikey:00000000-0000-4000-8000-00000000beef', now());
"""

PGBENCH_HOT_SCRIPT = PGBENCH_SCRIPT.replace("\\set n random(1, :wallets)", "\\set n :hot")


def pgbench_binary() -> str | None:
    """The pgbench shipped with the embedded PostgreSQL (same version as the server)."""
    try:
        import pgserver._commands as commands

        candidate = Path(commands.POSTGRES_BIN_PATH) / "pgbench"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    from shutil import which

    return which("pgbench")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pgbench(
    binary: str,
    db: Database,
    *,
    hot: bool,
    wallets: int,
    hot_n: int,
    clients: int,
    threads: int,
    seconds: float,
) -> dict[str, Any]:
    """pgbench -M prepared with the consumption script; latencies from its per-transaction log."""
    nonce = secrets.token_hex(3)
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        script = Path(tmp) / "consume.sql"
        script.write_text(PGBENCH_HOT_SCRIPT if hot else PGBENCH_SCRIPT)
        command = [
            binary,
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(min(threads, clients)),
            "-T",
            str(max(1, round(seconds))),
            "-D",
            f"wallets={wallets}",
            "-D",
            f"hot={hot_n}",
            "-D",
            f"nonce={nonce}",
            "-f",
            str(script),
            "-l",
            f"--log-prefix={tmp}/tx",
        ]
        cpu_before = _children_cpu()
        done = subprocess.run(
            command,
            env={**os.environ, **db.libpq_env()},
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        client_cpu = _children_cpu() - cpu_before
        if done.returncode != 0:
            raise RuntimeError(
                f"pgbench failed ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
            )
        latencies = []
        for log in Path(tmp).glob("tx*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3:
                    latencies.append(int(fields[2]))
    stats = _pgbench_stats(done.stdout)
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000 if latencies else None

    return {
        "requests": stats["transactions"],
        "rps": stats["tps"],
        "failed": stats.get("failed", 0),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "client_cpu_seconds": client_cpu,
        "key_prefix": f"pgb{nonce}-",
    }


def _pgbench_stats(stdout: str) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("number of transactions actually processed:"):
            stats["transactions"] = int(line.split(":")[1].split("/")[0])
        elif line.startswith("number of failed transactions:"):
            stats["failed"] = int(line.split(":")[1].split()[0])
        elif line.startswith("tps =") and "without initial connection time" in line:
            stats["tps"] = float(line.split("=")[1].split()[0])
    if "transactions" not in stats or "tps" not in stats:
        raise RuntimeError(f"cannot read pgbench's output:\n{stdout[-1500:]}")
    return stats


def asyncpg_l1(db: Database, orgs: list[Org], *, clients: int, seconds: float) -> dict[str, Any]:
    """L1 in a process of its own (``python -m bench.l1``), so its CPU time is its own."""
    args = {
        "dsn": db.dsn,
        "wallets": [str(o.wallet_id) for o in orgs],
        "actor": orgs[0].actor,
        "nonce": f"l1{secrets.token_hex(3)}",
        "clients": clients,
        "seconds": seconds,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.l1", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"L1 failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["client_cpu_seconds"] = result.pop("cpu_seconds")
    return result
