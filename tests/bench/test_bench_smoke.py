"""The benchmark in smoke mode: it runs end to end and the ledger holds. Nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.env import ensure_wrk
from bench.main import EXIT_SKIPPED

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
