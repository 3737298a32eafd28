"""Runs wrk with one of the Lua scripts and reads the line its done() prints."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

LUA = Path(__file__).with_name("lua")


class WrkFailed(RuntimeError):
    pass


def run(
    wrk: str,
    url: str,
    script: str,
    args: list[str],
    *,
    threads: int,
    connections: int,
    seconds: float,
    timeout_s: int = 10,
    done_lines: int | None = None,
) -> dict[str, Any]:
    """One wrk run, bounded in time: ``seconds`` of load (wrk's own clock), killed if it
    overstays by a wide margin. With ``done_lines``, wrk is interrupted (SIGINT: it reports and
    exits) once its threads have printed that many "BENCH_THREAD_DONE" lines."""
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(LUA / script),
        url,
        "--",
        *args,
    ]
    if done_lines is None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
        except subprocess.TimeoutExpired as exc:
            raise WrkFailed(f"wrk overstayed: {' '.join(command)}") from exc
        stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
    else:
        stdout, stderr, returncode = _run_until_done(command, done_lines, seconds + timeout_s + 30)
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    raise WrkFailed(f"wrk printed no result (exit {returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")


def _run_until_done(command: list[str], done_lines: int, timeout: float) -> tuple[str, str, int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    lines, seen = [], 0
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("BENCH_THREAD_DONE"):
                seen += 1
                if seen == done_lines:
                    process.send_signal(signal.SIGINT)  # wrk's handler: stop, report, exit
        stderr = process.stderr.read() if process.stderr else ""
        return "".join(lines), stderr, process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
