"""The machine, the versions, the load generator, and CPU time of process trees."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "fastapi",
    "starlette",
    "strawberry-graphql",
    "graphql-core",
    "uvicorn",
    "uvloop",
    "httptools",
    "sqlalchemy",
    "asyncpg",
    "orjson",
    "pydantic",
    "pgserver",
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def ensure_wrk() -> str | None:
    """The path of ``wrk``, installed from Debian's packages when it is missing and we may
    (root and apt-get). None when it cannot be had."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        print("wrk is missing and cannot be installed here (needs root and apt-get)", file=sys.stderr)
        return None
    print("wrk is missing: apt-get install wrk ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run([apt, "update", "-qq"], env=env, check=False, timeout=300, capture_output=True)
        done = subprocess.run(
            [apt, "install", "-y", "-qq", "wrk"], env=env, check=False, timeout=300, capture_output=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"could not install wrk: {exc}", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"could not install wrk: {done.stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
    return shutil.which("wrk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "memory_mb": int(mem.group(1)) // 1024 if mem else None,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def _version_of(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def versions(wrk: str | None, pgbench: str | None) -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "packages": packages,
        "wrk": _version_of([wrk, "--version"]) if wrk else None,
        "pgbench": _version_of([pgbench, "--version"]) if pgbench else None,
    }


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks: own + reaped children) of a live process."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return ppid, utime + stime + cutime + cstime


def tree_cpu_seconds(root: int | None) -> float | None:
    """CPU seconds used by ``root`` and all its descendants, including children that already
    exited (their time is in their parent's cutime/cstime once reaped)."""
    if root is None:
        return None
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            got = _stat(int(entry))
            if got is not None:
                stats[int(entry)] = got
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total / CLOCK_TICKS
