"""The benchmark in smoke mode: it runs end to end and the ledger holds. Nothing about speed.

And how the threshold crossing counts the crossings that must each have one top-up."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench.env import ensure_wrk
from bench.main import EXIT_SKIPPED
from bench.topups import crossings

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path: Path) -> None:
    if ensure_wrk() is None:
        pytest.skip("bench smoke skipped: wrk is missing and cannot be installed (needs root and apt-get)")
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode == EXIT_SKIPPED:
        pytest.skip(f"bench smoke skipped: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads(output.read_text())
    assert results["ok"], results["failures"]
    assert results["checks"] and all(check["ok"] for check in results["checks"])
    measured = {(row["kind"], row["mode"]) for row in results["rows"] if row["ok"] > 0}
    assert {("L0", "many"), ("L0", "hot"), ("L1", "many"), ("L1", "hot")} <= measured
    assert {("app", m) for m in ("many", "hot", "insufficient", "balance", "history")} <= measured
    assert results["storage"]["bytes_per_entry"] > 0
    # The wallet-change signal's cost: both workloads with the trigger off, on, on, off, each
    # state's rate pooled over its two runs, the trigger enabled again, and (the seeded
    # balances inside their watch bands) no signal fired.
    signal = results["signal_cost"]
    assert signal["status"] == "ran" and signal["trigger_enabled_after"] is True
    assert signal["signals_enqueued"] == 0
    for mode in ("many", "hot"):
        cost = signal[mode]
        assert cost["off_rps"] > 0 and cost["on_rps"] > 0
        assert len(cost["off_runs_rps"]) == len(cost["on_runs_rps"]) == 2
        assert [(run["signal"], run["run"]) for run in cost["runs"]] == [
            ("off", 1),
            ("on", 1),
            ("on", 2),
            ("off", 2),
        ]
        off = [run for run in cost["runs"] if run["signal"] == "off"]
        pooled = sum(run["requests"] for run in off) / sum(run["seconds"] for run in off)
        assert abs(pooled - cost["off_rps"]) <= 0.1 + 1e-4 * pooled
    order = [(row["mode"], row["extra"]["signal"]) for row in results["rows"] if row["kind"] == "signal"]
    assert order == [(m, s) for m in ("many", "hot") for s in ("off", "on", "on", "off")]
    assert {"signal_cost_many", "signal_cost_hot"} <= results["targets"].keys()
    # The threshold crossing: the many-wallet consumption over wallets with a saved card and an
    # automatic top-up (threshold just below the balance), measured right after the plain
    # many-wallet row on the 1-worker server, its ratios reported; then exactly one PAID top-up,
    # credited once, per crossing, nothing left in flight, and the policies turned off again
    # (the signal-cost runs after it saw no signal: asserted above).
    crossing = results["threshold_crossing"]
    assert crossing["status"] == "ran", crossing
    app_rows = [(row["kind"], row["name"]) for row in results["rows"] if row["workers"] == 1]
    plain = app_rows.index(("app", "many wallets: consumeTokens"))
    assert app_rows[plain + 1] == ("crossing", "many wallets: crossing thresholds")
    [row] = [row for row in results["rows"] if row["kind"] == "crossing"]
    assert row["ok"] > 0 and row["bad"] == 0 and row["mode"] == "many"
    assert crossing["rps"] > 0 and crossing["vs_L0"] > 0 and crossing["vs_many"] > 0
    assert crossing["ratio_fall"] == pytest.approx(1 - crossing["vs_many"], abs=2e-3)
    assert crossing["wallets"] == crossing["cards_saved"] == 50
    top_ups = crossing["top_ups"]
    assert top_ups["matched"], top_ups
    assert top_ups["crossings"] > 0 and top_ups["max_crossings_per_wallet"] == 1
    assert top_ups["top_ups"] == top_ups["crossings"] == top_ups["paid"] == top_ups["wallets_crossed"]
    assert top_ups["duplicates"] == top_ups["missing"] == 0
    assert not top_ups["not_paid"] and not top_ups["bad_credits"] and not top_ups["mismatched_wallets"]
    assert crossing["quiet"]["quiet"] and crossing["cleanup"]["ok"]
    targets = results["targets"]
    assert targets["threshold_crossing_cost"]["value"] == pytest.approx(crossing["ratio_fall"], abs=1e-3)
    assert targets["threshold_crossing_top_up_mismatches"] == {"value": 0, "target": 0, "met": True}
    assert {"crossing1w/L0", "crossing1w/many"} <= results["ratios"].keys()


def _entry(kind: str, balance_after: int, reference: uuid.UUID | None = None) -> dict[str, Any]:
    return {"kind": kind, "balance_after": balance_after, "reference_id": reference}


def test_crossings_are_counted_while_no_top_up_is_in_flight() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    entries = [
        _entry("consumption", 100),  # at the threshold: not below
        _entry("consumption", 99),  # crosses: a top-up is asked for
        _entry("consumption", 98),  # below, the top-up in flight
        _entry("purchase", 1098, first),  # its credit
        _entry("consumption", 1097),
        _entry("purchase", 1107, uuid.uuid4()),  # another purchase (not a top-up)
    ]
    assert [e["balance_after"] for e in crossings(100, 101, entries, {first})] == [99]
    assert crossings(100, 101, entries[:1], set()) == []
    # A credit that leaves the balance below the threshold: the next top-up is asked for.
    short = [_entry("consumption", 99), _entry("purchase", 99, first), _entry("purchase", 150, second)]
    assert [e["kind"] for e in crossings(100, 100, short, {first, second})] == ["consumption", "purchase"]
    # A second crossing after the first top-up's credit counts again.
    again = [_entry("consumption", 99), _entry("purchase", 120, first), _entry("consumption", 99)]
    assert len(crossings(100, 100, again, {first})) == 2
