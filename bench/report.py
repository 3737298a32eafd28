"""The table, the ratios and the targets of PERFORMANCE.md, from the measured rows."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "many_vs_L0": 0.5,
    "hot_vs_L0_hot": 1.0,
    "balance_p99_ms": 5.0,
    "history_p50_ms": 10.0,
    "webhook_events_per_s": 500.0,
    "bytes_per_entry": 600.0,
}


def _get(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, dict) else getattr(row, name)


def _find(rows: list[Any], kind: str, mode: str, *, paced: bool = False) -> list[Any]:
    return [
        r
        for r in rows
        if _get(r, "kind") == kind and _get(r, "mode") == mode and (_get(r, "rate") is not None) == paced
    ]


def _best(rows: list[Any]) -> Any | None:
    return max(rows, key=lambda r: _get(r, "rps"), default=None)


def _ratio(a: Any | None, b: Any | None) -> float | None:
    if a is None or b is None or not _get(b, "rps"):
        return None
    return round(_get(a, "rps") / _get(b, "rps"), 3)


def ratios(rows: list[Any]) -> dict[str, Any]:
    l0 = {m: _best(_find(rows, "L0", m)) for m in ("many", "hot")}
    l1 = {m: _best(_find(rows, "L1", m)) for m in ("many", "hot")}
    out: dict[str, Any] = {
        "L0_hot/many": _ratio(l0["hot"], l0["many"]),
        "L1_hot/many": _ratio(l1["hot"], l1["many"]),
    }
    workers = sorted({_get(r, "workers") for r in rows if _get(r, "kind") == "app"})
    for w in workers:
        app = {
            m: _best([r for r in _find(rows, "app", m) if _get(r, "workers") == w]) for m in ("many", "hot")
        }
        out[f"app{w}w_many/L0"] = _ratio(app["many"], l0["many"])
        out[f"app{w}w_hot/L0_hot"] = _ratio(app["hot"], l0["hot"])
        out[f"app{w}w_many/L1"] = _ratio(app["many"], l1["many"])
        out[f"app{w}w_hot/L1_hot"] = _ratio(app["hot"], l1["hot"])
        out[f"app{w}w_hot/many"] = _ratio(app["hot"], app["many"])
    return out


def targets(rows: list[Any], storage: dict[str, Any], webhook: dict[str, Any]) -> dict[str, Any]:
    r = ratios(rows)
    many = [v for k, v in r.items() if k.endswith("_many/L0") and v is not None]
    hot = [v for k, v in r.items() if k.endswith("_hot/L0_hot") and v is not None]
    balance = [_get(x, "p99_ms") for x in _find(rows, "app", "balance", paced=True)]
    history = [_get(x, "p50_ms") for x in _find(rows, "app", "history", paced=True)]
    ran = [w for w in webhook.values() if w.get("status") == "ran"]

    def verdict(value: float | None, target: float, *, at_least: bool) -> dict[str, Any]:
        if value is None:
            return {"value": None, "target": target, "met": None}
        return {
            "value": round(value, 3),
            "target": target,
            "met": value >= target if at_least else value <= target,
        }

    out = {
        "many_vs_L0": verdict(max(many, default=None), TARGETS["many_vs_L0"], at_least=True),
        "hot_vs_L0_hot": verdict(max(hot, default=None), TARGETS["hot_vs_L0_hot"], at_least=True),
        "balance_p99_ms_at_rate": verdict(
            min(balance, default=None), TARGETS["balance_p99_ms"], at_least=False
        ),
        "history_p50_ms": verdict(min(history, default=None), TARGETS["history_p50_ms"], at_least=False),
        "webhook_events_per_s": verdict(
            max((w["events_per_s"] for w in ran), default=None),
            TARGETS["webhook_events_per_s"],
            at_least=True,
        ),
        "bytes_per_entry": verdict(
            storage.get("bytes_per_entry"), TARGETS["bytes_per_entry"], at_least=False
        ),
    }
    out["webhook_duplicate_credits"] = {
        "value": sum(w["duplicate_credits"] for w in ran) if ran else None,
        "target": 0,
        "met": (sum(w["duplicate_credits"] for w in ran) == 0) if ran else None,
    }
    return out


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """The one table (Markdown, readable in a terminal too) with what is around it."""
    rows = results["rows"]
    l0 = {m: _best(_find(rows, "L0", m)) for m in ("many", "hot")}
    l1 = {m: _best(_find(rows, "L1", m)) for m in ("many", "hot")}
    header = ["workload", "workers", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "PG CPU ms/req"]
    header += ["unexpected", "vs L0", "vs L1"]
    cells: list[list[str]] = []
    for r in rows:
        base = r["mode"] if r["mode"] in ("many", "hot") and r["kind"] != "L0" else None
        vs_l0 = _ratio(r, l0[base]) if base else None
        vs_l1 = _ratio(r, l1[base]) if base and r["kind"] != "L1" else None
        measured = [_n(r["rps"]), _n(r["p50_ms"], 2), _n(r["p99_ms"], 2), _n(r["app_cpu_ms"], 2)]
        measured += [_n(r["pg_cpu_ms"], 2), str(r["bad"]), _n(vs_l0, 2), _n(vs_l1, 2)]
        cells.append([r["name"], str(r["workers"] or "-"), *measured])
    for workers, burst in sorted(results["webhook_burst"].items()):
        if burst.get("status") == "ran":
            name = f"webhook burst ({burst['deliveries']} deliveries, {burst['unique_events']} events)"
            rejected = burst["status_4xx"] + burst["status_5xx"]
            rate = f"{_n(burst['events_per_s'])} ev/s"
            cells.append([name, workers, rate, _n(burst["p50_ms"], 2), _n(burst["p99_ms"], 2), "-", "-"])
            cells[-1] += [str(rejected), "-", "-"]
        else:
            cells.append([f"webhook burst: {burst['status']} ({burst['detail']})", workers] + [""] * 8)
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    machine = results["machine"]
    storage = results.get("storage") or {}
    out = [
        f"orgwallet bench ({results['settings']['profile']['name']}), {results['date']}, "
        f"{machine['nproc']} CPUs {machine['cpu_model']}, {machine['memory_mb']} MB, "
        f"PostgreSQL {results['settings']['postgres'].get('server_version', '?')} "
        f"(fsync {results['settings']['postgres'].get('fsync', '?')}), "
        f"{results['settings']['profile']['connections']} connections/clients",
        "",
        *lines,
        "",
        "- ratios: " + ", ".join(f"{k} {_n(v, 2)}" for k, v in results["ratios"].items()),
        f"- storage: {_n(storage.get('bytes_per_entry'))} bytes per ledger entry (entry + allocation"
        f" + indexes, {storage.get('entries', '?')} entries, VACUUM FULL before and after)",
    ]
    checks = results["checks"]
    broken = [c for c in checks if not c["ok"]]
    full = sum(1 for c in checks if c.get("scope", "all wallets") == "all wallets")
    out.append(
        f"- invariants: checked after each of {len(checks)} steps ({full} on every wallet, the others on"
        " the wallets written since the check before): "
        + ("all hold, 0 duplicate credits" if not broken else f"BROKEN after {[c['after'] for c in broken]}")
    )
    out.append(
        "- targets: "
        + ", ".join(
            f"{k} {_n(v['value'], 2)} (target {v['target']}: "
            f"{'met' if v['met'] else 'not measured' if v['met'] is None else 'MISSED'})"
            for k, v in results["targets"].items()
        )
    )
    return "\n".join(out)
