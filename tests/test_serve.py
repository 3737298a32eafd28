"""The README's serve command, as a user runs it: the embedded PostgreSQL in a fresh home,
ready, answering GraphQL with a minted token; stopped and started again on the same home,
with the data kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 120.0  # the first start runs initdb and the migrations
STOP_TIMEOUT = 30.0


def orgwallet_command() -> list[str]:
    """What ``uv run orgwallet`` runs: the project's console script (or ``-m`` without it)."""
    script = Path(sys.executable).with_name("orgwallet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orgwallet"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, home: Path, log: Path, host: str = "127.0.0.1") -> None:
        self.home = home
        self.log_path = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORGWALLET_", "STRIPE_"))}
        self.env = env | {"ORGWALLET_HOME": str(home)}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [*orgwallet_command(), "serve", "--host", host, "--port", str(self.port)],
                cwd=home.parent,  # no .env of the developer's checkout
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited with {self.process.returncode}:\n{self.log()}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"/readyz did not answer 200 within {START_TIMEOUT} s:\n{self.log()}")

    def token(self, subject: str, email: str | None = None) -> str:
        done = subprocess.run(
            [*orgwallet_command(), "token", "--sub", subject, *(["--email", email] if email else [])],
            cwd=self.home.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()

    def graphql(self, query: str, token: str) -> dict[str, object]:
        response = httpx.post(
            f"{self.base}/graphql",
            json={"query": query},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert not body.get("errors"), body
        data: dict[str, object] = body["data"]
        return data

    def stop(self, how: signal.Signals = signal.SIGINT) -> int:
        """Ctrl-C, as a user stops it (or SIGTERM, as a service manager does); a kill only if
        it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


def postmaster_pid(home: Path) -> int | None:
    """The pid of the embedded PostgreSQL running on ``home``, if any."""
    try:
        pid = int((home / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None
    return pid


def wait_postgres_stopped(home: Path, within: float = STOP_TIMEOUT) -> bool:
    deadline = time.monotonic() + within
    while postmaster_pid(home) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def home(embedded_home: Path) -> Iterator[Path]:
    home = embedded_home
    yield home
    # Whatever happened, leave no PostgreSQL of ours running.
    pid = postmaster_pid(home)
    if pid is not None:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown
        if not wait_postgres_stopped(home, 15):
            os.kill(pid, signal.SIGKILL)


VIEWER = "{ viewer { subject isPlatformAdmin memberships { role organization { slug } } } }"


def test_serve_starts_answers_and_starts_again_with_the_data_kept(home: Path, tmp_path: Path) -> None:
    first = Server(home, tmp_path / "serve-1.log")
    try:
        first.wait_ready()
        assert (home / "pg").is_dir()
        token = first.token("alice")
        assert first.graphql(VIEWER, token)["viewer"] == {
            "subject": "alice",
            "isPlatformAdmin": False,
            "memberships": [],
        }
        created = first.graphql(
            'mutation { createOrganization(input: {name: "Kept", slug: "kept"}) { __typename } }', token
        )
        assert created["createOrganization"] == {"__typename": "OrganizationCreated"}
        # The worker inside serve tells the owner, and the mail lands in the outbox page.
        owner = first.token("olga", email="olga@example.com")
        made = first.graphql(
            'mutation { createOrganization(input: {name: "Told"}) {'
            " ... on OrganizationCreated { organization { id } } } }",
            owner,
        )
        org = made["createOrganization"]["organization"]["id"]  # type: ignore[index]
        first.graphql(
            f'mutation {{ addBalanceAlert(input: {{organizationId: "{org}", threshold: 10}})'
            " { alert { id } } }",
            owner,
        )
        deadline = time.monotonic() + 30
        while "[Told] Balance below 10 tokens" not in (page := httpx.get(f"{first.base}/_mail").text):
            assert time.monotonic() < deadline, f"no mail in the outbox:\n{page[-2000:]}\n{first.log()}"
            time.sleep(0.2)
        assert "olga@example.com" in page
    finally:
        code = first.stop()
    assert code == 0, first.log()
    assert wait_postgres_stopped(home), "the embedded PostgreSQL outlived serve"

    second = Server(home, tmp_path / "serve-2.log")
    try:
        second.wait_ready()
        token = second.token("alice")
        viewer = second.graphql(VIEWER, token)["viewer"]
        assert viewer == {
            "subject": "alice",
            "isPlatformAdmin": False,
            "memberships": [{"role": "OWNER", "organization": {"slug": "kept"}}],
        }
    finally:
        code = second.stop()
    assert code == 0, second.log()


def test_sigterm_stops_the_postgres_serve_started_and_leaves_one_it_found_running(
    home: Path, tmp_path: Path
) -> None:
    first = Server(home, tmp_path / "serve-1.log")
    try:
        first.wait_ready()
        postgres = postmaster_pid(home)
        assert postgres is not None
    finally:
        code = first.stop(signal.SIGTERM)
    assert code in (0, 128 + signal.SIGTERM), first.log()
    assert wait_postgres_stopped(home), f"the embedded PostgreSQL outlived serve:\n{first.log()}"
    assert "embedded PostgreSQL stopped" in first.log()

    # A PostgreSQL already running on the home (another serve's) is reused, said so, and left.
    from orgwallet.db.engine import start_embedded_postgres

    running = start_embedded_postgres(home)
    assert running.started
    second = Server(home, tmp_path / "serve-2.log")
    try:
        second.wait_ready()
    finally:
        second.stop(signal.SIGTERM)
    assert f"was running already (pid {running.pid}): reused, and left running" in second.log()
    assert postmaster_pid(home) == running.pid
    running.stop()
    assert wait_postgres_stopped(home)


def test_serve_beyond_loopback_with_the_simulator_says_so_loudly(home: Path, tmp_path: Path) -> None:
    server = Server(home, tmp_path / "serve.log", host="0.0.0.0")  # noqa: S104 (the case under test)
    try:
        server.wait_ready()
    finally:
        server.stop()
    log = server.log()
    assert "WARNING: serving on 0.0.0.0" in log and "OFFLINE STRIPE SIMULATOR" in log, log
    assert wait_postgres_stopped(home)
