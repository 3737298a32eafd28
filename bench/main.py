"""``python -m bench [--quick | --smoke]``: the whole benchmark, one table, bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import baselines, database, report, topups, webhooks
from bench import env as bench_env
from bench import wrk as wrk_runner
from bench.database import Database, Seeded
from bench.server import Server

HERE = Path(__file__).resolve().parent
EXIT_SKIPPED = 77  # the load generator is missing and cannot be installed: nothing was measured


@dataclass(frozen=True)
class Profile:
    name: str
    organizations: int
    seconds: float  # of measured load per workload
    warmup: float  # of unmeasured load before it (0: none)
    workers: tuple[int, ...]
    connections: int
    threads: int
    balance_rate: int  # requests/s of the paced balance read
    history_rate: int  # requests/s of the paced history read
    storage_entries: int
    webhook_events: int  # deliveries in the burst, duplicates included
    webhook_workers: tuple[int, ...]  # the server configurations that get the burst
    duplicate_share: float = 0.3
    crossing_wallets: int = 100  # organizations with an automatic top-up in the threshold crossing


PROFILES = {
    "smoke": Profile("smoke", 50, 1, 0, (1,), 4, 1, 100, 50, 1_000, 100, (1,), crossing_wallets=50),
    "quick": Profile("quick", 1000, 3, 1, (1, 2), 16, 2, 500, 100, 10_000, 1000, (2,)),
    "full": Profile("full", 1000, 12, 3, (1, 2), 16, 2, 500, 100, 20_000, 1000, (1, 2)),
}

#: The wallet-change signal's cost: label, Lua mode, data file (the workloads of the plan's
#: "many wallets: consumeTokens" and "hot wallet: consumeTokens").
SIGNAL_PLAN = (("many wallets", "consume", "many"), ("hot wallet", "hot", "hot"))
#: The trigger's state run by run, per workload: off, on, on, off (ABBA), so that a drift over
#: the phase weighs on both states alike and each state is measured twice.
SIGNAL_ORDER = (False, True, True, False)
#: The phase's time at most (about): past it, each run measures half the profile's seconds
#: (its warm-up unchanged). The estimate counts, per run, the warm-up, the measured seconds
#: and what surrounds them (wrk's start, the entries settling, the ledger check, the trigger).
SIGNAL_BUDGET_S = 120.0
SIGNAL_RUN_OVERHEAD_S = 1.5


#: The threshold-crossing workload's row: the many-wallet consumption over the wallets that have
#: an automatic top-up (its threshold just below the balance), on the run's smallest server.
CROSSING_ROW = "many wallets: crossing thresholds"
#: How long the top-ups started by the crossings may take to be paid and credited after the load.
CROSSING_QUIET_S = 60.0


def signal_seconds(profile: Profile) -> float:
    """The measured seconds of each signal-cost run: the profile's, or half of them when the
    phase would take more than SIGNAL_BUDGET_S (the full profile: 8 runs of 3 + 12 s)."""
    runs = len(SIGNAL_PLAN) * len(SIGNAL_ORDER)
    estimate = runs * (profile.warmup + profile.seconds + SIGNAL_RUN_OVERHEAD_S)
    return profile.seconds if estimate <= SIGNAL_BUDGET_S else profile.seconds / 2


@dataclass
class Row:
    """One measured workload."""

    name: str
    kind: str  # app | L0 | L1 | floor | signal (the app with the wallet-change signal off or on)
    #          | crossing (the many-wallet consumption crossing the thresholds of automatic top-ups)
    workers: int | None
    mode: str
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    app_cpu_ms: float | None = None  # server (or client, for L0/L1) CPU per request
    pg_cpu_ms: float | None = None
    ok: int = 0
    bad: int = 0
    rate: int | None = None  # paced: the requested rate
    extra: dict[str, Any] = field(default_factory=dict)


class BenchFailed(RuntimeError):
    pass


class Bench:
    def __init__(
        self, profile: Profile, *, wrk: str, pgbench: str | None, workdir: Path, output: Path
    ) -> None:
        self.profile = profile
        self.wrk = wrk
        self.pgbench = pgbench
        self.workdir = workdir
        self.output = output
        self.rows: list[Row] = []
        self.checks: list[database.Check] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.webhook: dict[str, Any] = {}
        self.storage: dict[str, Any] = {}
        self.signal: dict[str, Any] = {}
        self.crossing: dict[str, Any] = {}
        self.db: Database | None = None
        self.seeded: Seeded | None = None
        self.lua_data: dict[str, Path] = {}
        self.webhook_secret = f"whsec_bench_{secrets.token_hex(16)}"
        self.checked_at: Any = None  # database clock at the start of the last check

    # ------------------------------------------------------------ helpers

    def say(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def pg_cpu(self) -> float | None:
        assert self.db is not None
        return bench_env.tree_cpu_seconds(self.db.postmaster_pid)

    def check(self, after: str, *, full: bool = False) -> None:
        """The invariants after a step: on every wallet when ``full``, else on the wallets
        written since the previous check began (less a margin for transactions that were in
        flight then); full checks close every phase, so nothing escapes."""
        assert self.db is not None
        since = None if full or self.checked_at is None else self.checked_at - dt.timedelta(seconds=5)
        result, self.checked_at = asyncio.run(database.check(self.db.dsn, after, since))
        self.checks.append(result)
        if not result.ok:
            message = (
                f"INVARIANT BROKEN after {after}: {len(result.violations)} wallets with violations "
                f"{list(result.violations.items())[:3]}, {result.duplicate_credits} duplicate credits"
            )
            self.failures.append(message)
            print("!" * 80 + f"\n{message}\n" + "!" * 80, file=sys.stderr, flush=True)

    def entries(self) -> int:
        assert self.db is not None
        return int(asyncio.run(database.count_entries(self.db.dsn)))

    def settled_entries(self, timeout: float = 5.0) -> int:
        """The entry count once the requests still in flight (a warm-up's last ones, which wrk
        abandons but the server completes) have landed: two equal counts 0.3 s apart."""
        count, deadline = self.entries(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            again = self.entries()
            if again == count:
                break
            count = again
        return count

    # ------------------------------------------------------------ phases

    def setup(self) -> None:
        p = self.profile
        self.say(f"profile {p.name}: PostgreSQL ({'ORGWALLET_DATABASE_URL' if _env_url() else 'embedded'})")
        self.db = database.start(self.workdir, _env_url())
        self.say(f"database {self.db.name}: {self.db.settings.get('version', '')[:60]}")
        self.say(f"seeding {p.organizations} organizations, the hot wallet, the history wallet, past events")
        self.seeded = asyncio.run(database.seed(self.db.dsn, p.organizations))
        self.lua_data = self.seeded.write_lua_data(self.workdir)
        self.check("seed", full=True)
        self.say(f"storage: {p.storage_entries} consumptions between two VACUUM FULLs")
        self.storage = asyncio.run(database.bytes_per_entry(self.db.dsn, self.seeded.many, p.storage_entries))
        self.check("storage")

    def baselines(self) -> None:
        assert self.db is not None and self.seeded is not None
        p = self.profile
        hot_n = self.seeded.hot.n
        for hot in (False, True):
            mode = "hot" if hot else "many"
            if self.pgbench is None:
                self.notes.append("L0 skipped: no pgbench binary found")
            else:
                l0 = functools.partial(
                    baselines.pgbench,
                    self.pgbench,
                    self.db,
                    hot=hot,
                    wallets=p.organizations,
                    hot_n=hot_n,
                    clients=p.connections,
                    threads=p.threads,
                )
                self.say(f"L0 pgbench {mode}: {p.connections} clients, {p.seconds}s")
                self.baseline(f"L0 pgbench, {mode}", "L0", mode, l0, in_flight=p.connections)
            self.say(f"L1 asyncpg {mode}: {p.connections} clients, {p.seconds}s")
            orgs = [self.seeded.hot] if hot else self.seeded.many
            l1 = functools.partial(baselines.asyncpg_l1, self.db, orgs, clients=p.connections)
            self.baseline(f"L1 asyncpg, {mode}", "L1", mode, l1, in_flight=0)

    def baseline(
        self, name: str, kind: str, mode: str, run: Callable[..., dict[str, Any]], *, in_flight: int
    ) -> None:
        """Warms up, measures, records one baseline row and checks the ledger. pgbench counts
        its failed transactions; L1 counts the outcome of each call (``outcomes``)."""
        if self.profile.warmup:
            run(seconds=self.profile.warmup)
        before_entries, pg_before = self.settled_entries(), self.pg_cpu()
        result = run(seconds=self.profile.seconds)
        written = self.entries() - before_entries
        requests = result["requests"]
        outcomes = result.get("outcomes")
        ok = int(outcomes.get("ok", 0)) if outcomes is not None else requests - result["failed"]
        row = Row(
            name,
            kind,
            None,
            mode,
            requests=requests,
            rps=result["rps"],
            p50_ms=result["p50_ms"],
            p99_ms=result["p99_ms"],
            app_cpu_ms=_per(result["client_cpu_seconds"], requests),
            pg_cpu_ms=_per(_delta(pg_before, self.pg_cpu()), requests),
            ok=ok,
            bad=requests - ok,
            extra={"entries_written": written} | ({"outcomes": outcomes} if outcomes is not None else {}),
        )
        self._recorded(row, written, in_flight=in_flight)
        self.rows.append(row)
        self.check(row.name)

    def _recorded(self, row: Row, written: int, *, in_flight: int) -> None:
        """Every answered consumption has its entry; at most the requests in flight when the
        load stopped were written without being answered."""
        expected = row.ok if row.mode in ("many", "hot") else 0
        if written < expected or written > expected + in_flight + row.bad:
            message = f"{row.name}: {row.ok} consumptions answered ok but {written} entries written"
            self.failures.append(message)
            print(f"!!! {message}", file=sys.stderr, flush=True)

    def server_env(self) -> dict[str, str]:
        assert self.db is not None
        return {
            "ORGWALLET_DATABASE_URL": self.db.url,
            "ORGWALLET_HOME": str(self.workdir / "home"),
            "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "ORGWALLET_DATABASE_POOL_SIZE": str(max(10, self.profile.connections)),
        }

    def app(self, workers: int) -> None:
        p = self.profile
        server = Server(workers=workers, env=self.server_env(), log=self.workdir / f"server-{workers}.log")
        self.say(f"server: uvicorn, {workers} worker(s), {server.url}")
        try:
            server.start()
            self.prime(server, workers)
            plan: list[tuple[str, str, str, str, int | None]] = [
                # name, kind, mode, data, paced rate
                ("floor: GET /healthz", "floor", "healthz", "-", None),
                ("floor: { __typename }", "floor", "typename", "-", None),
                ("many wallets: consumeTokens", "app", "consume", "many", None),
                ("hot wallet: consumeTokens", "app", "hot", "hot", None),
                ("insufficient balance", "app", "insufficient", "many", None),
                ("balance read", "app", "balance", "many", None),
                (f"balance read @ {p.balance_rate}/s", "app", "balance", "many", p.balance_rate),
                ("history page of 100", "app", "history", "history", None),
                (f"history page @ {p.history_rate}/s", "app", "history", "history", p.history_rate),
            ]
            buyers = None
            if workers == min(p.workers) == 1:
                buyers = self.crossing_setup(server)
            elif workers == min(p.workers):
                detail = "measured once per run, on the 1-worker server"
                self.crossing = {"status": "not measured", "detail": detail}
            for name, kind, mode, data, rate in plan:
                self.workload(server, workers, name, kind, mode, data, rate)
                if mode == "consume" and buyers:
                    self.threshold_crossing(server, workers, buyers)
            if workers == min(p.workers):
                self.signal_cost(server, workers)
            if workers in p.webhook_workers:
                self.webhook_burst(server, workers)
        finally:
            server.stop()

    def prime(self, server: Server, workers: int) -> None:
        """Every organization's balance read, walked by each wrk thread (three times over when
        there are several processes, whose connections wrk spreads at random), so that every
        server process knows every API key, as one that has been up a while does. Not measured."""
        p = self.profile
        started = time.monotonic()
        walks = 1 if workers == 1 else 3
        result = wrk_runner.run(
            self.wrk,
            server.url,
            "graphql.lua",
            ["prime", str(self.lua_data["many"]), "prime", str(walks)],
            threads=p.threads,
            connections=p.connections,
            seconds=120,
            done_lines=p.threads,
        )
        self.notes.append(
            f"{workers} worker(s): primed with {result['requests']} balance reads"
            f" ({walks} walk(s) over the organizations per wrk thread) in {time.monotonic() - started:.1f}s"
        )
        self.say(f"  primed: {result['requests']} balance reads, {result['ok']} ok")

    def workload(
        self,
        server: Server,
        workers: int,
        name: str,
        kind: str,
        mode: str,
        data: str,
        rate: int | None,
        *,
        seconds: float | None = None,
        before_measure: Callable[[], None] | None = None,
    ) -> None:
        """One workload: the profile's warm-up, ``before_measure`` (not measured), then
        ``seconds`` (default: the profile's) of measured load, the row recorded and the ledger
        checked."""
        p = self.profile
        seconds = p.seconds if seconds is None else seconds
        nonce = secrets.token_hex(4)
        data_file = str(self.lua_data[data]) if data != "-" else "-"
        script, args = (
            ("paced.lua", [mode, data_file, nonce, str(rate), str(p.threads)])
            if rate
            else ("graphql.lua", [mode, data_file, nonce])
        )
        connections = p.connections
        if p.warmup:
            wrk_runner.run(
                self.wrk,
                server.url,
                script,
                [*args[:2], f"w{nonce}", *args[3:]],
                threads=p.threads,
                connections=connections,
                seconds=p.warmup,
            )
        if before_measure is not None:
            before_measure()
        writes = mode in ("consume", "hot", "insufficient")
        before_entries = self.settled_entries() if writes else 0
        app_before, pg_before = server.cpu_seconds(), self.pg_cpu()
        result = wrk_runner.run(
            self.wrk, server.url, script, args, threads=p.threads, connections=connections, seconds=seconds
        )
        app_after, pg_after = server.cpu_seconds(), self.pg_cpu()
        requests = int(result["requests"])
        bad = requests - int(result["ok"])
        socket_errors = sum(result["errors"].values())
        lat = result["latency_us"]
        row = Row(
            name,
            kind,
            workers,
            mode if mode not in ("consume",) else "many",
            requests=requests,
            rps=requests / (result["duration_us"] / 1e6),
            p50_ms=lat["p50"] / 1000,
            p99_ms=lat["p99"] / 1000,
            app_cpu_ms=_per(_delta(app_before, app_after), requests),
            pg_cpu_ms=_per(_delta(pg_before, pg_after), requests),
            ok=int(result["ok"]),
            bad=bad,
            rate=rate,
            extra={
                "duration_s": result["duration_us"] / 1e6,
                "user_errors": result["user_errors"],
                "graphql_errors": result["graphql_errors"],
                "http_errors": result["http_errors"],
                "socket_errors": result["errors"],
                "latency_us": lat,
                "late_sends": result.get("late"),
                "max_lag_ms": result.get("max_lag_ms"),
                "sample": result.get("sample", ""),
            },
        )
        if writes:
            written = self.entries() - before_entries
            row.extra["entries_written"] = written
            self._recorded(row, written, in_flight=connections + socket_errors)
        if requests == 0 or row.ok == 0 or bad > max(1, requests // 100):
            message = (
                f"{name} ({workers} worker(s)): {bad} of {requests} answers unexpected: {row.extra['sample']}"
            )
            self.failures.append(message)
            print(f"!!! {message}", file=sys.stderr, flush=True)
        self.rows.append(row)
        self.say(
            f"  {name:<32} {row.rps:9.1f} req/s  p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms"
            f"  app {_fmt(row.app_cpu_ms)} ms/req  pg {_fmt(row.pg_cpu_ms)} ms/req  unexpected {bad}"
        )
        self.check(f"{name} ({workers}w)")

    def signal_cost(self, server: Server, workers: int) -> None:
        """What the wallet-change signal (trigger ``wallets_signal``, on every write of a
        balance) costs the write path: the many-wallet and hot-wallet consumptions, each run
        four times back to back on the same server with the trigger off, on, on, off (ABBA:
        a drift over the phase weighs on both states alike), each run with the profile's
        warm-up and ``signal_seconds`` of load (rows of kind "signal": the existing rows,
        ratios and targets do not see them), ledger checked after each. Each state's rate is
        its two runs' requests over their seconds. The seeded balances stay inside their watch
        bands, so the trigger's WHEN clause is evaluated on every write and never fires: the
        common case, the one measured. The trigger is enabled again whatever happens."""
        assert self.db is not None
        dsn = self.db.dsn
        before = asyncio.run(database.signal_status(dsn))
        if before["enabled"] is None:
            detail = f"no trigger {database.SIGNAL_TRIGGER} on wallets (migration 0007)"
            self.signal = {"status": "not available", "detail": detail}
            self.say(f"  wallet-change signal: not available ({detail})")
            return
        seconds = signal_seconds(self.profile)
        order = ", ".join("on" if enabled else "off" for enabled in SIGNAL_ORDER)
        self.say(
            f"  wallet-change signal: trigger {database.SIGNAL_TRIGGER} {order} per workload,"
            f" {self.profile.warmup:g}s warm-up + {seconds:g}s each"
        )
        started = time.monotonic()
        measured: list[Row] = []
        try:
            for label, mode, data in SIGNAL_PLAN:
                runs = {"off": 0, "on": 0}
                for position, enabled in enumerate(SIGNAL_ORDER, start=1):
                    state = "on" if enabled else "off"
                    runs[state] += 1
                    name = f"{label}: signal {state} ({runs[state]})"
                    asyncio.run(database.set_signal(dsn, enabled=enabled))
                    jobs_before = asyncio.run(database.signal_status(dsn))["enqueued"]
                    self.workload(server, workers, name, "signal", mode, data, None, seconds=seconds)
                    jobs = asyncio.run(database.signal_status(dsn))["enqueued"] - jobs_before
                    row = self.rows[-1]
                    row.extra["signal"] = state
                    row.extra["signal_run"] = runs[state]
                    row.extra["signal_position"] = position
                    row.extra["signals_enqueued"] = jobs
                    measured.append(row)
        finally:
            try:
                asyncio.run(database.set_signal(dsn, enabled=True))
            except Exception as exc:
                self.failures.append(f"{database.SIGNAL_TRIGGER} could not be enabled again: {exc}")
        after = asyncio.run(database.signal_status(dsn))
        if not after["enabled"]:
            self.failures.append(f"{database.SIGNAL_TRIGGER} is still disabled after the signal-cost runs")
        self.signal = report.signal_cost(
            self.rows, measured, after["bands"], workers=workers, enabled_after=after["enabled"]
        )
        self.signal["seconds"], self.signal["warmup"] = seconds, self.profile.warmup
        self.signal["elapsed_s"] = round(time.monotonic() - started, 1)
        self.notes.append(self.signal["note"])
        self.say(f"  {report.signal_line(self.signal)}")

    def crossing_setup(self, server: Server) -> list[topups.Buyer] | None:
        """Before the threshold crossing, not measured: the last ``crossing_wallets`` seeded
        organizations (away from the webhook burst's buyers, the first 20) get a key that may
        buy and configure, and a card saved through the real flow on this server (the way a
        customer saves one); their wallets go into the Lua data "crossing"."""
        assert self.db is not None and self.seeded is not None
        count = min(self.profile.crossing_wallets, len(self.seeded.many))
        orgs = self.seeded.many[-count:]
        started = time.monotonic()
        self.say(f"  threshold crossing: saving a card for {count} organizations (setupPaymentMethod)")
        try:
            buyers = asyncio.run(topups.issue_keys(self.db.dsn, orgs))
            asyncio.run(topups.save_cards(server.url, buyers))
            saved = asyncio.run(topups.wait_cards(self.db.dsn, orgs))
        except topups.NotAvailable as exc:
            self.crossing = {"status": "not available", "detail": str(exc)[:500]}
            self.say(f"  threshold crossing: not available ({self.crossing['detail']})")
            return None
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"[:500]
            self.crossing = {"status": "failed", "detail": f"saving the cards: {detail}"}
            self.failures.append(f"threshold crossing: saving the cards failed: {detail}")
            self.say(f"  threshold crossing: {self.crossing['detail']}")
            return None
        if saved != count:
            self.crossing = {"status": "failed", "detail": f"{saved} of {count} cards saved within 60 s"}
            self.failures.append(f"threshold crossing: {self.crossing['detail']}")
            return None
        path = self.workdir / "orgs-crossing.txt"
        path.write_text("".join(f"{o.global_id} {o.api_key}\n" for o in orgs))
        self.lua_data["crossing"] = path
        self.crossing = {"setup_s": round(time.monotonic() - started, 1), "cards_saved": saved}
        self.say(f"  threshold crossing: {saved} cards saved in {self.crossing['setup_s']}s")
        return buyers

    def threshold_crossing(self, server: Server, workers: int, buyers: list[topups.Buyer]) -> None:
        """The many-wallet consumption over the wallets with a saved card, each of which gets,
        after the warm-up and before the measured load, an automatic top-up: threshold 1 to
        ``spread`` tokens below its balance, FIXED ``topups.TOP_UP_TOKENS`` (about half the
        wallets cross, at most once each, at times spread over the load, and are lifted well
        above). Measured like the other workloads (row CROSSING_ROW, kind
        "crossing"). Then, within CROSSING_QUIET_S, no signal or top-up job may be queued or
        running and no top-up pending; every wallet must have as many top-ups as crossings, each
        PAID and credited once, and the ledger must hold: else the run fails. The policies are
        turned off afterwards and the bands set again, so that the workloads after see the
        seeded state."""
        assert self.db is not None
        dsn = self.db.dsn
        orgs = [b.org for b in buyers]
        watched: list[topups.Watched] = []
        armed: dict[str, Any] = {}

        # About twice what one wallet spends in the load (at the plain many-wallet rate): about
        # half the wallets cross, spread over the load.
        plain = next(
            (r for r in self.rows if r.name == "many wallets: consumeTokens" and r.workers == workers), None
        )
        per_wallet = (plain.rps if plain else 100.0) * self.profile.seconds / max(1, len(buyers))
        spread = max(2, round(2 * per_wallet))

        def arm() -> None:
            self.settled_entries()  # the warm-up's last consumptions land before the balances are read
            t0 = time.monotonic()
            watched.extend(asyncio.run(topups.set_policies(server.url, buyers, dsn, spread=spread)))
            armed.update(asyncio.run(topups.wait_bands(dsn, watched)))
            armed["set_s"] = round(time.monotonic() - t0, 2)
            if not armed["quiet"] or armed["unwatched"]:
                raise BenchFailed(f"threshold crossing: the policies' bands were not set: {armed}")
            armed["started_at"] = asyncio.run(topups.now(dsn))
            armed["cpu_before"] = (server.cpu_seconds(), self.pg_cpu())

        self.say(
            f"  threshold crossing: {len(buyers)} wallets, threshold = balance - 1..{spread} (about"
            f" {per_wallet:.0f} consumptions per wallet), FIXED {topups.TOP_UP_TOKENS:,} tokens"
        )
        try:
            self.workload(
                server, workers, CROSSING_ROW, "crossing", "consume", "crossing", None, before_measure=arm
            )
            row = self.rows[-1]
            quiet = asyncio.run(topups.wait_quiet(dsn, orgs, CROSSING_QUIET_S))
            cpu = {
                "app": _delta(armed["cpu_before"][0], server.cpu_seconds()),
                "pg": _delta(armed["cpu_before"][1], self.pg_cpu()),
            }
            self.check("threshold crossing: top-ups settled", full=True)
            verified = asyncio.run(topups.verify(dsn, watched, armed["started_at"]))
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"[:500]
            self.crossing |= {"status": "failed", "detail": detail}
            self.failures.append(f"threshold crossing: {detail}")
            self.say(f"  threshold crossing: FAILED: {detail}")
            if watched:
                self._crossing_cleanup(server, buyers)
            return
        self.crossing = report.threshold_crossing(
            self.rows,
            row,
            verified,
            setup=self.crossing
            | {
                "threshold": f"balance - 1..{spread} (seeded) when set (after the warm-up)",
                "top_up_tokens": topups.TOP_UP_TOKENS,
                "policies_set_s": armed["set_s"],
                "quiet": quiet,
            },
            cpu_to_quiet=cpu,
        )
        if not quiet["quiet"]:
            self.failures.append(
                f"threshold crossing: top-ups still at work {CROSSING_QUIET_S:g}s after the load:"
                f" {quiet['left']}"
            )
        if not verified["matched"]:
            self.failures.append(f"threshold crossing: {report.top_ups_line(verified)}")
        self.crossing["cleanup"] = self._crossing_cleanup(server, buyers)
        self.say(f"  {report.crossing_line(self.crossing)}")

    def _crossing_cleanup(self, server: Server, buyers: list[topups.Buyer]) -> dict[str, Any]:
        """The policies turned off (``disableAutoTopUp``) and each wallet signalled again, so
        that its band is the alerts' alone: the workloads after see the seeded state."""
        assert self.db is not None
        dsn = self.db.dsn
        orgs = [b.org for b in buyers]
        try:
            asyncio.run(topups.disable_policies(server.url, buyers))
            asyncio.run(topups.resignal(dsn, orgs))
            quiet = asyncio.run(topups.wait_quiet(dsn, orgs, 30))
            left = asyncio.run(topups.bands(dsn, orgs))
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"[:500]
            self.notes.append(f"threshold crossing: turning the policies off failed: {detail}")
            return {"ok": False}
        watching = sum(1 for below, _ in left.values() if (below or 0) > database.LOW_ALERT_TOKENS)
        if watching or not quiet["quiet"]:
            self.notes.append(
                f"threshold crossing: after turning the policies off, {watching} wallets still watch a"
                f" threshold (jobs: {quiet['left']})"
            )
        self.check("threshold crossing: policies off")
        ok = not watching and quiet["quiet"]
        return {"ok": ok, "seconds": quiet["seconds"], "still_watching": watching}

    def webhook_burst(self, server: Server, workers: int) -> None:
        assert self.db is not None and self.seeded is not None
        p = self.profile
        key = f"{workers}"
        status = webhooks.probe(server.url)
        if status in (404, 405):
            self.webhook[key] = {
                "status": "not available",
                "detail": f"POST /webhooks/stripe answered {status}",
            }
            self.say(f"  webhook burst: not available (POST /webhooks/stripe answered {status})")
            return
        unique = round(p.webhook_events * (1 - p.duplicate_share))
        try:
            buyers = asyncio.run(webhooks.purchase_keys(self.db, self.seeded.many[:20]))
            stripe_key = webhooks.simulator_key(self.workdir / "home")
            bodies, purchases = webhooks.prepare(server.url, buyers, unique, stripe_key)
        except Exception as exc:  # the route exists but this bench cannot feed it (yet)
            self.webhook[key] = {"status": "not measured", "detail": f"{type(exc).__name__}: {exc}"[:500]}
            self.say(f"  webhook burst: not measured: {self.webhook[key]['detail']}")
            return
        deliveries = webhooks.burst(bodies, duplicate_share=p.duplicate_share, secret=self.webhook_secret)
        events_file = self.workdir / f"events-{workers}.txt"
        webhooks.write_events(events_file, deliveries)
        since = asyncio.run(_db_now(self.db))
        threads = min(8, max(2, p.connections // 2))
        result = wrk_runner.run(
            self.wrk,
            server.url,
            "webhook.lua",
            [str(events_file), str(threads)],
            threads=threads,
            connections=threads,
            seconds=60,
            done_lines=threads,
        )
        time.sleep(0.5)  # handlers that answer before they credit
        credited = asyncio.run(webhooks.credits_since(self.db, since, purchases))
        summary = webhooks.summarize(result, unique, credited)
        self.webhook[key] = summary
        self.say(
            f"  webhook burst: {summary['deliveries']} deliveries, {summary['events_per_s']:.0f} events/s,"
            f" {summary['duplicate_credits']} duplicate credits, {summary['missing_credits']} missing"
        )
        if summary["duplicate_credits"]:
            self.failures.append(
                f"webhook burst ({workers}w): {summary['duplicate_credits']} duplicate credits"
            )
        self.check(f"webhook burst ({workers}w)")

    # ------------------------------------------------------------ all

    def run(self) -> int:
        started = time.time()
        machine = bench_env.machine()
        try:
            self.setup()
            self.baselines()
            for workers in self.profile.workers:
                self.app(workers)
                self.check(f"all workloads on {workers} worker(s)", full=True)
        except BenchFailed as exc:
            self.failures.append(str(exc))
        except Exception as exc:
            traceback.print_exc()
            self.failures.append(f"the bench itself failed: {type(exc).__name__}: {exc}")
        finally:
            if self.db is not None:
                self.db.stop()
        results = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "machine": machine,
            "versions": bench_env.versions(self.wrk, self.pgbench),
            "settings": {
                "profile": asdict(self.profile),
                "postgres": self.db.settings if self.db else {},
                "database": "ORGWALLET_DATABASE_URL" if _env_url() else "embedded pgserver",
            },
            "rows": [asdict(r) for r in self.rows],
            "ratios": report.ratios(self.rows),
            "storage": self.storage,
            "webhook_burst": self.webhook,
            "signal_cost": self.signal,
            "threshold_crossing": self.crossing,
            "checks": [c.as_json() for c in self.checks],
            "targets": report.targets(self.rows, self.storage, self.webhook, self.signal, self.crossing),
            "notes": self.notes,
            "failures": self.failures,
            "ok": not self.failures,
        }
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print()
        print(report.table(results))
        print(f"\nresults: {self.output}")
        if self.failures:
            print("\nFAILED:\n  " + "\n  ".join(self.failures), file=sys.stderr)
            return 1
        return 0


async def _db_now(db: Database) -> Any:
    import asyncpg

    conn = await asyncpg.connect(db.dsn)
    try:
        return await conn.fetchval("SELECT now()")
    finally:
        await conn.close()


def _env_url() -> str | None:
    return os.environ.get("ORGWALLET_DATABASE_URL") or None


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _per(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else seconds * 1000 / requests


def _fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:5.2f}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a run of about two minutes")
    group.add_argument(
        "--smoke", action="store_true", help="a few seconds, for CI: it runs, the ledger holds"
    )
    parser.add_argument("--output", type=Path, help="where to write the results (JSON)")
    parser.add_argument("--connections", type=int, help="wrk connections = pgbench/L1 clients")
    parser.add_argument("--seconds", type=float, help="measured seconds per workload")
    parser.add_argument("--workers", type=str, help="uvicorn worker counts to run, e.g. 1,2")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    overrides: dict[str, Any] = {}
    if args.connections:
        overrides["connections"] = args.connections
    if args.seconds:
        overrides["seconds"] = args.seconds
    if args.workers:
        workers = tuple(int(w) for w in args.workers.split(","))
        overrides["workers"] = workers
        overrides["webhook_workers"] = (
            tuple(w for w in profile.webhook_workers if w in workers) or workers[-1:]
        )
    if overrides:
        profile = Profile(**{**asdict(profile), **overrides})
    output = args.output or (HERE / "results" / "smoke.json" if args.smoke else HERE / "results.json")
    wrk = bench_env.ensure_wrk()
    if wrk is None:
        print("SKIPPED: wrk is not available (apt-get install wrk); nothing was measured.", file=sys.stderr)
        return EXIT_SKIPPED
    workdir = Path(tempfile.mkdtemp(prefix="orgwallet-bench-"))
    try:
        return Bench(
            profile, wrk=wrk, pgbench=baselines.pgbench_binary(), workdir=workdir, output=output
        ).run()
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
