"""The offline purchase flow in a real browser, as the README tells a developer to try it:
`orgwallet serve` (embedded PostgreSQL, Stripe simulator), startCheckout over HTTP GraphQL
with the README's success URL, the checkout page in headless Chromium with the test card
already there, Pay clicked, the simulator's "payment received" page and the receipt, and the
wallet balance then shows the tokens (credited by the simulator's signed webhook).

Needs Debian's ``chromium`` (``.ci/run`` installs it); driven by Playwright with that
executable (Playwright never downloads a browser here)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from orgwallet.auth.tokens import mint_token
from orgwallet.config import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 120.0  # initdb and the migrations on the first start
JWT_SECRET = "browser-test-secret-" + "y" * 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orgwallet_command() -> list[str]:
    script = Path(sys.executable).with_name("orgwallet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orgwallet"]


@dataclass
class Served:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _stop_postgres(home: Path) -> None:
    try:
        pid = int((home / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def served(tmp_path: Path, embedded_home: Path) -> Iterator[Served]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser test skipped: Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        )
    pytest.importorskip("playwright.async_api", reason="browser test skipped: playwright is not installed")
    home = embedded_home
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORGWALLET_", "STRIPE_"))}
    env |= {"ORGWALLET_HOME": str(home), "ORGWALLET_JWT_SECRET": JWT_SECRET}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*orgwallet_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{server.output()}"
            try:
                if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve did not get ready:\n{server.output()}"
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        _stop_postgres(home)


async def graphql(http: httpx.AsyncClient, query: str, variables: dict[str, Any], token: str) -> Any:
    response = await http.post(
        "/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body.get("errors"), body
    return body["data"]


CREATE_ORG = """mutation { createOrganization(input: {name: "Browser Co"}) {
  ... on OrganizationCreated { organization { id } } } }"""
PACKAGES = "query($org: ID!) { packages(organizationId: $org) { id code } }"
START = """mutation($input: StartCheckoutInput!) { startCheckout(input: $input) {
  __typename
  ... on CheckoutStarted { checkoutUrl purchase { id reference status } }
  ... on UserError { code message } } }"""
WALLET = "query($org: ID!) { organization(id: $org) { wallet { balance } } }"
STATE = """query($org: ID!, $purchase: ID!) {
  organization(id: $org) { wallet { balance } }
  purchase(id: $purchase) { status receiptUrl }
}"""


def day(at: datetime) -> str:
    """A date as the receipt writes it."""
    return f"{at.day} {at:%B %Y}"


async def test_pay_on_the_checkout_page_in_chromium(served: Served) -> None:
    """As the README says: the card is already there, Pay, the simulator's own "payment
    received" page, and its receipt."""
    from playwright.async_api import async_playwright

    token = mint_token(Settings(jwt_secret=JWT_SECRET), subject="browser-buyer", email=None, admin=False)
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        org = (await graphql(http, CREATE_ORG, {}, token))["createOrganization"]["organization"]["id"]
        packages = (await graphql(http, PACKAGES, {"org": org}, token))["packages"]
        [package] = [p["id"] for p in packages if p["code"] == "tokens-50"]
        before = await graphql(http, WALLET, {"org": org}, token)
        start = {
            "organizationId": org,
            "packageId": package,
            "successUrl": f"{served.base}/_stripe/done/{{CHECKOUT_SESSION_ID}}",
            "cancelUrl": f"{served.base}/_stripe/cancelled",
        }
        started = (await graphql(http, START, {"input": start}, token))["startCheckout"]
        assert started["__typename"] == "CheckoutStarted", started
        url = started["checkoutUrl"]
        reference = started["purchase"]["reference"]
        assert url.startswith(f"{served.base}/_stripe/checkout/cs_test_"), url
        session_id = url.rsplit("/", 1)[-1]

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = await browser.new_page()
                await page.goto(url)
                assert "$45.00" in await page.inner_text("#amount")
                assert await page.input_value("#card_number") == "4242 4242 4242 4242"
                assert "Browser Co" in await page.inner_text("main")
                assert await page.inner_text("#test-mode") == "TEST MODE"
                paid_from = datetime.now(UTC)
                await page.click("#pay")
                await page.wait_for_url(f"{served.base}/_stripe/done/{session_id}", timeout=15_000)
                done = await page.inner_text("main")
                assert "Payment received" in done
                assert "50 tokens for Browser Co" in done and reference in done

                await page.click("#receipt")
                await page.wait_for_url(f"{served.base}/_stripe/receipts/ch_*", timeout=15_000)
                receipt_url = page.url
                paid_at = await page.inner_text("#date-paid")
                assert any(day(at) in paid_at for at in (paid_from, datetime.now(UTC))), paid_at
                assert await page.inner_text("#reference") == reference
                assert await page.inner_text("#tokens") == "50"
                assert "4242" in await page.inner_text("#payment-method")
            finally:
                await browser.close()

        balance_before = int(before["organization"]["wallet"]["balance"])
        deadline = time.monotonic() + 15
        while True:
            state = await graphql(http, STATE, {"org": org, "purchase": started["purchase"]["id"]}, token)
            if int(state["organization"]["wallet"]["balance"]) == balance_before + 50:
                break
            assert time.monotonic() < deadline, f"no tokens after paying: {state}"
            await asyncio.sleep(0.2)
        assert state["purchase"]["status"] == "PAID"
        assert state["purchase"]["receiptUrl"] == receipt_url
