"""``python -m bench.live [--seconds 20] [--subscribers 1000] [--wallets 100] [--rate 100]``: live
updates under load. Run by hand (not in CI); it prints a table and writes bench/results/live.json.

The bench's seeded database (``--wallets`` organizations, each with an API key that has
tokens.view and tokens.consume), one server (uvicorn, 1 worker), and wrk's many-wallet
consumption workload (bench/lua/graphql.lua: 1 token, a random organization per request),
in this order (the runs without subscribers take half the seconds each, and come before and
after those with subscribers, so that a drift over the run, e.g. the ledger growing, weighs on
both sides alike):

- ``no trigger``: ``wallets_live`` disabled: what a consumption cost before live updates;
- ``0 subscribers``: the trigger on, nobody watching: what every consumption pays now;
- ``N subscribers``: ``--subscribers`` WebSocket connections (graphql-transport-ws, each with
  one ``walletUpdated { balance }`` on one of the wallets, spread evenly), open in this
  process and reading all along;
- ``N subs @ R/s``: the same at a fixed ``--rate`` (bench/lua/paced.lua), below what the
  server sustains: the delivery latency of a server that is not saturated;
- ``0 subscribers`` and ``no trigger`` again.

Commit to delivery: each consumption takes 1 token, so a message's balance names the ledger
entry that produced it; the entry's ``created_at`` (the database's ``now()``: the start of the
consuming transaction, a little before its commit, so the figure errs long) is compared with
the time this process received the message, on the same machine's clock.

Then the trigger's own price, without HTTP: ``ledger_consume`` called back to back on one
connection (``synchronous_commit`` off there, so that the WAL flush does not drown it), for
wallets without a watch, and for watched wallets (``live_watch``, and a listener: each call
NOTIFYs), against the trigger disabled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from websockets.asyncio.client import connect

from bench import database
from bench import env as bench_env
from bench import wrk as wrk_runner
from bench.database import Database, Org
from bench.server import Server

HERE = Path(__file__).resolve().parent
TRIGGER = "wallets_live"
SUBSCRIPTION = "subscription($org: ID!) { walletUpdated(organizationId: $org) { balance } }"
THREADS, CONNECTIONS = 2, 16  # wrk's, as in the main bench's profiles
WARMUP_S = 3.0
SQL_CALLS = 2000  # ledger_consume calls per run in the SQL measurement
SQL_ORDER = ("no trigger", "unwatched", "watched", "watched", "unwatched", "no trigger") * 2
_CONSUME = "SELECT (ledger_consume($1::uuid, 1, $2, NULL, NULL, 'bench', now())).outcome"
# Every wallet watched (for an hour) by a process of the bench's, or not.
_WATCH_ALL = (
    "SELECT live_watch(w, $2, CASE WHEN $3 THEN now() + interval '1 hour' END) FROM unnest($1::uuid[]) w"
)


@dataclass
class Phase:
    name: str
    trigger: bool
    subscribers: int
    seconds: float
    rate: int | None = None  # paced: requests/s
    requests: int = 0
    ok: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_ms: float | None = None  # per consumption
    pg_cpu_ms: float | None = None
    client_cpu_ms: float | None = None  # this process (the subscribers), per consumption
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Received:
    n: int  # the organization (wallet) number
    balance: int
    at: float  # time.time() on receipt


class Subscribers:
    """``count`` WebSocket subscriptions, ``count / len(orgs)`` per organization."""

    def __init__(self, url: str, orgs: list[Org], count: int) -> None:
        self.url = url.replace("http://", "ws://") + "/graphql"
        self.plan = [orgs[i % len(orgs)] for i in range(count)]
        self.received: list[Received] = []
        self.recording = False
        self.ready = 0
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._all_ready = asyncio.Event()

    async def open(self) -> None:
        self._tasks = [asyncio.create_task(self._one(org)) for org in self.plan]
        async with asyncio.timeout(120):
            await self._all_ready.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, org: Org) -> None:
        try:
            async with connect(self.url, subprotocols=["graphql-transport-ws"], open_timeout=60) as ws:  # type: ignore[list-item]
                init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {org.api_key}"}}
                await ws.send(json.dumps(init))
                assert json.loads(await ws.recv())["type"] == "connection_ack"
                message = {"query": SUBSCRIPTION, "variables": {"org": org.global_id}}
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": message}))
                first = True
                async for raw in ws:
                    at = time.time()
                    received = json.loads(raw)
                    if received["type"] != "next" or received["payload"].get("errors"):
                        raise RuntimeError(f"unexpected message: {str(received)[:300]}")
                    if first:
                        first = False
                        self.ready += 1
                        if self.ready == len(self.plan):
                            self._all_ready.set()
                    elif self.recording:
                        balance = int(received["payload"]["data"]["walletUpdated"]["balance"])
                        self.received.append(Received(org.n, balance, at))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failures.append(f"{type(error).__name__}: {error}")
            self._all_ready.set()  # do not wait for the others: report it


async def _set_trigger(dsn: str, enabled: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET lock_timeout = '30s'")
        await conn.execute(f"ALTER TABLE wallets {'ENABLE' if enabled else 'DISABLE'} TRIGGER {TRIGGER}")
    finally:
        await conn.close()


async def _latencies(dsn: str, received: list[Received], since: float) -> list[float]:
    """Milliseconds from each delivered state's entry (its created_at) to its receipt."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT w.id AS wallet_id, e.balance_after, extract(epoch FROM e.created_at) AS at
            FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id
            WHERE e.kind = 'consumption' AND e.created_at >= to_timestamp($1)
            """,
            since,
        )
    finally:
        await conn.close()
    committed = {(r["wallet_id"], r["balance_after"]): float(r["at"]) for r in rows}
    out = []
    for r in received:
        at = committed.get((database.wallet_id(r.n), r.balance))
        if at is not None:
            out.append((r.at - at) * 1000)
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _sql_cost(dsn: str, orgs: list[Org]) -> dict[str, Any]:
    """Per ``ledger_consume`` (autocommit, one connection, back to back): the CPU of the calling
    backend plus the listening one (what a NOTIFY costs is also the listener's to read), wall
    time, and the trigger function's own time (``pg_stat_user_functions``); with the trigger
    disabled, on with no watch, on with a watch and a listener (each call NOTIFYs). In the order
    of SQL_ORDER (each state four times: a drift weighs on all alike), after a warm-up. CPU
    time is the figure to read on a busy machine: wall time counts the waits for a CPU."""
    conn = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    heard = 0

    def hear(*_args: object) -> None:
        nonlocal heard
        heard += 1

    await listener.add_listener("live_wallet", hear)
    await conn.execute("SET synchronous_commit = off")
    try:
        await conn.execute("SET track_functions = 'pl'")  # a superuser's setting
        timed = True
    except asyncpg.InsufficientPrivilegeError:
        timed = False
    backends = (conn.get_server_pid(), listener.get_server_pid())
    wallets = [o.wallet_id for o in orgs]
    hub = uuid.uuid4()
    cpu: dict[str, list[float]] = {"no trigger": [], "unwatched": [], "watched": []}
    wall: dict[str, list[float]] = {"no trigger": [], "unwatched": [], "watched": []}
    function: dict[str, list[float]] = {"unwatched": [], "watched": []}
    try:
        for i in range(SQL_CALLS):  # warm-up
            await conn.fetchval(_CONSUME, wallets[i % len(wallets)], f"sql-warm-{i}")
        for state in SQL_ORDER:
            verb = "DISABLE" if state == "no trigger" else "ENABLE"
            await conn.execute(f"ALTER TABLE wallets {verb} TRIGGER {TRIGGER}")
            await conn.execute(_WATCH_ALL, wallets, hub, state == "watched")
            before = await _function_stats(conn)
            nonce = secrets.token_hex(4)
            cpu_before, started = _cpu(backends), time.perf_counter()
            for i in range(SQL_CALLS):
                await conn.fetchval(_CONSUME, wallets[i % len(wallets)], f"sql-{nonce}-{i}")
            wall[state].append((time.perf_counter() - started) / SQL_CALLS * 1e6)
            await asyncio.sleep(0.2)  # the listener's backend has sent the last NOTIFYs
            cpu[state].append((_cpu(backends) - cpu_before) / SQL_CALLS * 1e6)
            if state != "no trigger" and timed:
                calls, own_ms = (a - b for a, b in zip(await _function_stats(conn), before, strict=True))
                function[state].append(own_ms * 1000 / calls if calls else 0.0)
        await conn.execute(_WATCH_ALL, wallets, hub, False)
        await conn.execute(f"ALTER TABLE wallets ENABLE TRIGGER {TRIGGER}")
    finally:
        await listener.close()
        await conn.close()

    def summary(values: dict[str, list[float]]) -> dict[str, Any]:
        means = {state: statistics.mean(v) for state, v in values.items()}
        return {"runs": {s: [round(x, 1) for x in v] for s, v in values.items()}} | {
            "mean": {s: round(m, 1) for s, m in means.items()}
        }

    cpu_us, wall_us = summary(cpu), summary(wall)
    return {
        "calls_per_run": SQL_CALLS,
        "backend_cpu_us": cpu_us,
        "wall_us": wall_us,
        "trigger_function_us": summary(function),
        "unwatched_extra_cpu_us": round(cpu_us["mean"]["unwatched"] - cpu_us["mean"]["no trigger"], 1),
        "watched_extra_cpu_us": round(cpu_us["mean"]["watched"] - cpu_us["mean"]["no trigger"], 1),
        "notifies_heard": heard,
        "notifies_expected": SQL_ORDER.count("watched") * SQL_CALLS,
    }


async def _function_stats(conn: asyncpg.Connection) -> tuple[float, float]:
    """(calls, self time in ms) of the trigger's function so far, this backend's flushed."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(
        "SELECT calls, self_time FROM pg_stat_user_functions WHERE funcname = 'live_wallet_changed'"
    )
    return (float(row["calls"]), float(row["self_time"])) if row else (0.0, 0.0)


def _cpu(pids: tuple[int, ...]) -> float:
    """CPU seconds of these (local) processes."""
    return sum(bench_env.tree_cpu_seconds(pid) or 0.0 for pid in pids)


class LiveBench:
    def __init__(self, args: argparse.Namespace, wrk: str, workdir: Path) -> None:
        self.args = args
        self.wrk = wrk
        self.workdir = workdir
        self.db: Database | None = None
        self.phases: list[Phase] = []
        self.notes: list[str] = []

    def say(self, message: str) -> None:
        print(f"[bench.live {time.strftime('%H:%M:%S')}] {message}", flush=True)

    async def run(self) -> dict[str, Any]:
        args = self.args
        url = os.environ.get("ORGWALLET_DATABASE_URL") or None
        self.say(
            f"database ({'ORGWALLET_DATABASE_URL' if url else 'embedded'}), {args.wallets} organizations"
        )
        self.db = db = await asyncio.to_thread(database.start, self.workdir, url)
        seeded = await database.seed(db.dsn, args.wallets)
        data = seeded.write_lua_data(self.workdir)["many"]
        env = {
            "ORGWALLET_DATABASE_URL": db.url,
            "ORGWALLET_HOME": str(self.workdir / "home"),
            "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
            "ORGWALLET_DATABASE_POOL_SIZE": str(max(10, CONNECTIONS)),
        }
        server = Server(workers=1, env=env, log=self.workdir / "server.log")
        self.say(f"server: {server.url}")
        await asyncio.to_thread(server.start)
        try:
            await asyncio.to_thread(
                wrk_runner.run,
                self.wrk,
                server.url,
                "graphql.lua",
                ["prime", str(data), "prime", "1"],
                threads=THREADS,
                connections=CONNECTIONS,
                seconds=120,
                done_lines=THREADS,
            )
            half = args.seconds / 2
            await self.phase(server, data, Phase("no trigger", False, 0, half))
            await self.phase(server, data, Phase("0 subscribers", True, 0, half))
            subscribers = Subscribers(server.url, seeded.many, args.subscribers)
            self.say(f"opening {args.subscribers} subscriptions")
            opened = time.monotonic()
            await subscribers.open()
            if subscribers.failures:
                raise RuntimeError(f"subscriptions failed: {subscribers.failures[:3]}")
            self.notes.append(f"{args.subscribers} subscriptions open in {time.monotonic() - opened:.1f} s")
            try:
                watched = Phase(f"{args.subscribers} subscribers", True, args.subscribers, args.seconds)
                await self.phase(server, data, watched, subscribers)
                paced = Phase(
                    f"{args.subscribers} subs @ {args.rate}/s",
                    True,
                    args.subscribers,
                    args.seconds,
                    args.rate,
                )
                await self.phase(server, data, paced, subscribers)
            finally:
                await subscribers.close()
            await self.phase(server, data, Phase("0 subscribers", True, 0, half))
            await self.phase(server, data, Phase("no trigger", False, 0, half))
        finally:
            await asyncio.to_thread(server.stop)
        self.say("the trigger's own cost, in SQL")
        sql = await _sql_cost(db.dsn, seeded.many)
        rps = {
            name: statistics.mean(p.rps for p in self.phases if p.name == name)
            for name in ("no trigger", "0 subscribers", f"{args.subscribers} subscribers")
        }
        return {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": bench_env.machine(),
            "settings": {
                "seconds": args.seconds,
                "warmup_s": WARMUP_S,
                "wallets": args.wallets,
                "subscribers": args.subscribers,
                "paced_rate": args.rate,
                "wrk": {"threads": THREADS, "connections": CONNECTIONS},
                "postgres": db.settings,
            },
            "phases": [asdict(p) for p in self.phases],
            "throughput_ratio": {  # of the mean consumptions/s of the runs of each name
                "0 subscribers / no trigger": round(rps["0 subscribers"] / rps["no trigger"], 3),
                f"{args.subscribers} subscribers / 0 subscribers": round(
                    rps[f"{args.subscribers} subscribers"] / rps["0 subscribers"], 3
                ),
            },
            "sql_cost": sql,
            "notes": self.notes,
        }

    async def consumptions(
        self, server: Server, args: list[str], seconds: float, rate: int | None = None
    ) -> dict[str, Any]:
        """wrk's consumption workload, at ``rate`` when given (in a thread: the subscribers
        keep reading meanwhile)."""
        script, args = ("paced.lua", [*args, str(rate), str(THREADS)]) if rate else ("graphql.lua", args)
        return await asyncio.to_thread(
            wrk_runner.run,
            self.wrk,
            server.url,
            script,
            args,
            threads=THREADS,
            connections=CONNECTIONS,
            seconds=seconds,
        )

    async def phase(
        self, server: Server, data: Path, phase: Phase, subscribers: Subscribers | None = None
    ) -> None:
        assert self.db is not None
        seconds = phase.seconds
        await _set_trigger(self.db.dsn, phase.trigger)
        self.say(f"{phase.name}: warm-up {WARMUP_S:.0f} s, then {seconds:.0f} s of consumptions")
        nonce = secrets.token_hex(4)
        await self.consumptions(server, ["consume", str(data), f"w{nonce}"], WARMUP_S, phase.rate)
        since = time.time()
        if subscribers is not None:
            subscribers.received, subscribers.recording = [], True
        app0, pg0, me0 = server.cpu_seconds(), bench_env.tree_cpu_seconds(self.db.postmaster_pid), _own_cpu()
        result = await self.consumptions(server, ["consume", str(data), nonce], seconds, phase.rate)
        app1, pg1, me1 = server.cpu_seconds(), bench_env.tree_cpu_seconds(self.db.postmaster_pid), _own_cpu()
        requests = int(result["requests"])
        phase.requests, phase.ok = requests, int(result["ok"])
        phase.rps = round(requests / (result["duration_us"] / 1e6), 1)
        phase.p50_ms = result["latency_us"]["p50"] / 1000
        phase.p99_ms = result["latency_us"]["p99"] / 1000
        phase.server_cpu_ms = _per(app0, app1, requests)
        phase.pg_cpu_ms = _per(pg0, pg1, requests)
        if subscribers is not None:
            await asyncio.sleep(1.0)  # the last deliveries of the run arrive
            subscribers.recording = False
            phase.client_cpu_ms = _per(me0, me1, requests)
            latencies = await _latencies(self.db.dsn, subscribers.received, since)
            per_subscriber = len(subscribers.received) / len(subscribers.plan)
            phase.extra = {
                "messages": len(subscribers.received),
                "matched": len(latencies),
                "messages_per_subscriber": round(per_subscriber, 1),
                # Each wallet had ok / wallets consumptions; fewer messages: states coalesced.
                "consumptions_per_wallet": round(phase.ok / self.args.wallets, 1),
                "delivery_p50_ms": _round(_percentile(latencies, 0.5)),
                "delivery_p90_ms": _round(_percentile(latencies, 0.9)),
                "delivery_p99_ms": _round(_percentile(latencies, 0.99)),
                "delivery_max_ms": _round(max(latencies) if latencies else None),
            }
        self.phases.append(phase)
        self.say(
            f"  {phase.rps:.0f} consumptions/s, p50 {phase.p50_ms:.1f} ms, p99 {phase.p99_ms:.1f} ms,"
            f" {phase.ok}/{requests} ok {phase.extra or ''}"
        )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per(before: float | None, after: float | None, requests: int) -> float | None:
    if before is None or after is None or not requests:
        return None
    return round((after - before) * 1000 / requests, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'phase':<22} {'cons/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'app ms':>7} {'pg ms':>6}"
        f" {'deliv p50':>9} {'deliv p99':>9} {'msgs/sub':>8}"
    ]
    for p in results["phases"]:
        e = p["extra"]
        lines.append(
            f"{p['name']:<22} {p['rps']:>8.0f} {p['p50_ms']:>7.1f} {p['p99_ms']:>7.1f}"
            f" {p['server_cpu_ms'] or 0:>7.3f} {p['pg_cpu_ms'] or 0:>6.3f}"
            f" {e.get('delivery_p50_ms') or '-':>9} {e.get('delivery_p99_ms') or '-':>9}"
            f" {e.get('messages_per_subscriber') or '-':>8}"
        )
    lines.append(f"throughput ratios: {results['throughput_ratio']}")
    sql = results["sql_cost"]
    lines.append(
        f"ledger_consume in SQL, PostgreSQL CPU µs/call: {sql['backend_cpu_us']['mean']}: the trigger adds"
        f" {sql['unwatched_extra_cpu_us']} µs unwatched, {sql['watched_extra_cpu_us']} µs watched (NOTIFY);"
        f" its function's own time: {sql['trigger_function_us']['mean']} µs"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--wallets", type=int, default=100)
    parser.add_argument("--rate", type=int, default=100, help="consumptions/s of the paced phase")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "live.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log, data)")
    args = parser.parse_args(argv)
    wrk = bench_env.ensure_wrk()
    if wrk is None:
        print("SKIPPED: wrk is not available (apt-get install wrk)", file=sys.stderr)
        return 77
    workdir = Path(tempfile.mkdtemp(prefix="orgwallet-bench-live-"))
    bench = LiveBench(args, wrk, workdir)
    try:
        results = asyncio.run(bench.run())
    finally:
        if bench.db is not None:
            bench.db.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(results))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
