"""Profile one workload: the bench's database and server, wrk's load, py-spy on the server.

python -m bench.profile [consume|hot|insufficient|balance|history|typename|healthz] [--seconds 10]

Needs py-spy (``uvx py-spy`` works: pass ``--py-spy "uvx py-spy"``). Prints the functions with
the most samples (inclusive and self) and keeps the collapsed stacks (for flamegraph tools).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import database
from bench import env as bench_env
from bench import wrk as wrk_runner
from bench.server import Server

DATA = {"consume": "many", "insufficient": "many", "balance": "many", "hot": "hot", "history": "history"}


def summarize(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("mode", choices=[*DATA, "typename", "healthz"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--organizations", type=int, default=1000)
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy command, e.g. 'uvx py-spy'")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile.txt"))
    args = parser.parse_args()
    wrk = bench_env.ensure_wrk()
    assert wrk, "wrk is needed"
    workdir = Path(tempfile.mkdtemp(prefix="orgwallet-profile-"))
    db = database.start(workdir, None)
    server = None
    try:
        seeded = asyncio.run(database.seed(db.dsn, args.organizations))
        data = seeded.write_lua_data(workdir)
        server = Server(
            workers=args.workers,
            env={
                "ORGWALLET_DATABASE_URL": db.url,
                "ORGWALLET_HOME": str(workdir / "home"),
                "ORGWALLET_JWT_SECRET": secrets.token_urlsafe(48),
                "ORGWALLET_DATABASE_POOL_SIZE": str(args.connections),
            },
            log=workdir / "server.log",
        )
        server.start()
        assert server.process is not None
        data_file = str(data[DATA[args.mode]]) if args.mode in DATA else "-"
        script_args = [args.mode, data_file, secrets.token_hex(4)]
        conn = args.connections
        wrk_runner.run(wrk, server.url, "graphql.lua", script_args, threads=2, connections=conn, seconds=2)
        collapsed = workdir / "stacks.txt"
        spy = subprocess.Popen(
            [
                *shlex.split(args.py_spy),
                "record",
                "--pid",
                str(server.process.pid),
                "--subprocesses",
                "--duration",
                str(args.seconds),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(collapsed),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        script_args[2] = secrets.token_hex(4)
        result = wrk_runner.run(
            wrk, server.url, "graphql.lua", script_args, threads=2, connections=conn, seconds=args.seconds - 1
        )
        spy.wait(timeout=args.seconds + 60)
        rps = result["requests"] / (result["duration_us"] / 1e6)
        text = f"{args.mode}: {rps:.1f} req/s, ok {result['ok']}\n\n" + summarize(collapsed, args.top)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        shutil.copy(collapsed, args.out.with_suffix(".collapsed"))
        print(text)
    finally:
        if server is not None:
            server.stop()
        db.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
