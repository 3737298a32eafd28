"""Operations: /metrics (Prometheus) behind its bearer token, counting real traffic; log lines
as JSON objects carrying the request id; an authentication failure logged as one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from strawberry.relay import GlobalID

from orgwallet import metrics
from orgwallet.app import create_app
from orgwallet.auth.principals import UserPrincipal
from orgwallet.config import Settings
from orgwallet.db.engine import transaction
from orgwallet.logs import JsonFormatter
from orgwallet.metrics import OperationNames
from orgwallet.payments.simulator.delivery import encode_event
from orgwallet.runtime import Runtime
from orgwallet.services import wallets as wallet_service
from tests.helpers import GraphQLClient, create_org
from tests.jobs.conftest import drain
from tests.purchasing import Shop, shop
from tests.test_serve import free_port, orgwallet_command

__all__ = ["shop"]  # the fixture

TOKEN = "scrape-" + "s" * 40
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests' settings, with /metrics on."""
    return settings.model_copy(update={"metrics_token": TOKEN})


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    """The sum of a metric's samples over all their labels."""
    return sum(v for (sample, _), v in samples.items() if sample == name)


class Moved:
    """How much each sample moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


class TestTheEndpoint:
    async def test_there_is_no_metrics_without_a_token(self, settings: Settings) -> None:
        app = create_app(settings.model_copy(update={"metrics_token": None}))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert response.status_code == 404
        finally:
            await app.state.runtime.close()

    @pytest.mark.parametrize(
        "authorization",
        [None, "", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer "],
    )
    async def test_anything_but_the_token_is_refused(
        self, client: GraphQLClient, authorization: str | None
    ) -> None:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = await client.http.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert "orgwallet_" not in response.text

    async def test_the_pools_are_read_when_scraped(self, client: GraphQLClient, settings: Settings) -> None:
        await create_org(client, "alice")
        samples = await scrape(client.http)
        size = settings.database_pool_size
        assert value(samples, "orgwallet_db_pool_size", pool="sqlalchemy") == size
        assert value(samples, "orgwallet_db_pool_size", pool="asyncpg") == size
        for pool in ("sqlalchemy", "asyncpg"):
            opened = sum(
                value(samples, "orgwallet_db_pool_connections", pool=pool, state=state)
                for state in ("idle", "in_use")
            )
            assert 1 <= opened <= 2 * size, (pool, samples)
        # The scrape itself holds an asyncpg connection while it reads the job queue, not after.
        assert value(samples, "orgwallet_db_pool_connections", pool="asyncpg", state="in_use") == 0


VIEWER = "query Viewer { viewer { subject } }"
CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename ... on TokensConsumed { replayed }
  }
}"""
RESERVE = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  reserveTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename ... on TokensReserved { reservation { id } }
  }
}"""
CAPTURE = """
mutation($id: ID!) {
  captureReservation(input: {reservationId: $id}) { __typename }
}"""
ADD_ALERT = """mutation($org: ID!, $threshold: BigInt!) {
  addBalanceAlert(input: {organizationId: $org, threshold: $threshold}) { alert { id } } }"""


@pytest.fixture
def fresh_operation_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's operation-name labels start empty, as in a new server: the tests before
    this one (in the same process) may have used up the slots."""
    monkeypatch.setattr(metrics, "_operation_names", metrics.OperationNames(metrics.MAX_OPERATION_NAMES))


@pytest.mark.usefixtures("fresh_operation_names")
class TestTrafficMovesTheCounters:
    async def test_graphql_operations_by_name_and_outcome(self, client: GraphQLClient) -> None:
        before = await scrape(client.http)
        await client.data(VIEWER, as_="alice")
        await client.data(VIEWER, as_="bob")
        anonymous = await client.raw(VIEWER)  # the viewer needs a signed-in caller
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        await client.data("{ viewer { subject } }", as_="alice")
        # The operation name is the client's: one that is not a GraphQL name is "other".
        response = await client.http.post(
            "/graphql", json={"query": VIEWER, "operationName": "no such operation!"}
        )
        assert response.status_code == 400, response.text
        moved = Moved(before, await scrape(client.http))

        assert moved("orgwallet_graphql_requests_total", operation="Viewer", outcome="ok") == 2
        assert moved("orgwallet_graphql_requests_total", operation="Viewer", outcome="user_error") == 1
        assert moved("orgwallet_graphql_requests_total", operation="anonymous", outcome="ok") == 1
        assert moved("orgwallet_graphql_requests_total", operation="other", outcome="user_error") == 1
        assert moved("orgwallet_graphql_requests_total", operation="Viewer", outcome="error") == 0
        assert moved("orgwallet_graphql_request_duration_seconds_count", operation="Viewer") == 3
        assert moved("orgwallet_graphql_request_duration_seconds_sum", operation="Viewer") > 0
        assert moved("orgwallet_graphql_request_duration_seconds_bucket", operation="Viewer", le="+Inf") == 3

    async def test_consumptions_by_path_and_outcome_and_the_batch_sizes(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, "alice")  # its trial grant: 3 tokens
        before = await scrape(client.http)

        async def consume(amount: int, key: str) -> dict[str, Any]:
            data = await client.data(CONSUME, {"org": org, "amount": amount, "key": key}, as_="alice")
            result: dict[str, Any] = data["consumeTokens"]
            return result

        assert await consume(1, "a") == {"__typename": "TokensConsumed", "replayed": False}
        assert await consume(1, "a") == {"__typename": "TokensConsumed", "replayed": True}
        assert (await consume(100, "b"))["__typename"] == "InsufficientTokens"
        reserved = await client.data(RESERVE, {"org": org, "amount": 1, "key": "r"}, as_="alice")
        reservation = reserved["reserveTokens"]["reservation"]["id"]
        short = await client.data(RESERVE, {"org": org, "amount": 100, "key": "s"}, as_="alice")
        assert short["reserveTokens"]["__typename"] == "InsufficientTokens"
        captured = await client.data(CAPTURE, {"id": reservation}, as_="alice")
        assert captured["captureReservation"]["__typename"] == "ReservationCaptured"
        # The unit-of-work path (a service's consumption inside a larger transaction).
        runtime: Runtime = app.state.runtime
        alice = UserPrincipal(subject="alice", email=None, name=None, is_platform_admin=False)
        org_id = uuid.UUID(GlobalID.from_id(org).node_id)
        async with transaction(runtime.sessions) as session:
            await wallet_service.consume_tokens(session, alice, org_id, amount=1, key="c")
        moved = Moved(before, await scrape(client.http))

        consumed = {
            (path, outcome): moved("orgwallet_consumptions_total", path=path, outcome=outcome)
            for path in ("batched", "consume", "reserve", "capture")
            for outcome in ("ok", "replayed", "insufficient", "error")
        }
        assert {k: v for k, v in consumed.items() if v} == {
            ("batched", "ok"): 1,
            ("batched", "replayed"): 1,
            ("batched", "insufficient"): 1,
            ("reserve", "ok"): 1,
            ("reserve", "insufficient"): 1,
            ("capture", "ok"): 1,
            ("consume", "ok"): 1,
        }
        # Three group-commit transactions, one consumption each (they came one after another).
        assert moved("orgwallet_consumption_batch_size_count") == 3
        assert moved("orgwallet_consumption_batch_size_sum") == 3
        assert moved("orgwallet_consumption_batch_size_bucket", le="1.0") == 3

    async def test_stripe_events_by_type_and_outcome(self, shop: Shop) -> None:
        http = shop.client.http
        before = await scrape(http)
        _, url = await shop.checkout(package="tokens-50")
        await shop.pay(url)  # the simulator delivers its events to /webhooks/stripe
        [event] = await shop.simulator.events("checkout.session.completed")
        await shop.simulator.redeliver(event["id"])
        await shop.drain()
        forged = await http.post(
            "/webhooks/stripe", content=encode_event(event), headers={"Stripe-Signature": "t=1,v1=00"}
        )
        assert forged.status_code == 400
        moved = Moved(before, await scrape(http))

        completed = "checkout.session.completed"
        assert moved("orgwallet_stripe_webhook_events_total", type=completed, outcome="processed") == 1
        assert moved("orgwallet_stripe_webhook_events_total", type=completed, outcome="duplicate") == 1
        assert moved("orgwallet_stripe_webhook_events_total", type=completed, outcome="failed") == 0
        assert moved("orgwallet_stripe_webhook_events_total", type="unverified", outcome="bad_signature") == 1
        # Every event Stripe sent was counted once (types we do not handle: "other").
        events = "orgwallet_stripe_webhook_events_total"
        counted = total(moved.after, events) - total(before, events)
        assert counted == len(await shop.simulator.events()) + 2  # and the copy, and the forgery

    async def test_the_job_queue_when_scraped_and_the_jobs_run_here(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        runtime: Runtime = app.state.runtime
        org = await create_org(client, "alice")
        # An alert asks for the wallet to be evaluated: one wallet.signal job is queued.
        await client.data(ADD_ALERT, {"org": org, "threshold": 10}, as_="alice")
        async with runtime.driver.acquire() as connection:
            await connection.execute(
                "UPDATE pgqueuer SET execute_after = now() - interval '90 seconds'"
                " WHERE entrypoint = 'wallet.signal'"
            )
        queued = await scrape(client.http)
        assert value(queued, "orgwallet_jobs", entrypoint="wallet.signal", status="queued") == 1
        assert value(queued, "orgwallet_jobs", entrypoint="wallet.signal", status="picked") == 0
        waited = value(queued, "orgwallet_jobs_oldest_queued_age_seconds", entrypoint="wallet.signal")
        assert 90 <= waited < 150
        # Every entrypoint is listed, at 0 when it has no job.
        assert ("orgwallet_jobs", frozenset({("entrypoint", "top_up.start"), ("status", "queued")})) in queued

        await drain(runtime)
        moved = Moved(queued, await scrape(client.http))
        assert moved("orgwallet_jobs_run_total", entrypoint="wallet.signal", outcome="ok") == 1
        assert moved("orgwallet_jobs_run_total", entrypoint="wallet.signal", outcome="failed") == 0
        assert value(moved.after, "orgwallet_jobs", entrypoint="wallet.signal", status="queued") == 0
        assert value(moved.after, "orgwallet_jobs_oldest_queued_age_seconds", entrypoint="wallet.signal") == 0


class TestOperationNames:
    def test_a_client_cannot_grow_the_label_set(self) -> None:
        names = OperationNames(limit=2)
        assert [names.label(n) for n in ("A", "B", "C", "A", None, "", "x" * 65, "a b")] == [
            "A",
            "B",
            "other",
            "A",
            "anonymous",
            "anonymous",
            "other",
            "other",
        ]


# ---------------------------------------------------------------- logs


def forged_jwt(settings: Settings) -> str:
    claims = {"sub": "mallory", "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "exp": 2**31}
    return jwt.encode(claims, "not-the-secret-" + "x" * 40, algorithm="HS256")


BAD_API_KEY = "owk_0123456789ab_" + "x" * 43


class TestAuthenticationFailures:
    @pytest.mark.parametrize("credential", ["forged jwt", "bad api key"])
    async def test_one_line_with_the_request_id_and_no_traceback(
        self, client: GraphQLClient, settings: Settings, caplog: pytest.LogCaptureFixture, credential: str
    ) -> None:
        bearer = forged_jwt(settings) if credential == "forged jwt" else BAD_API_KEY
        caplog.set_level(logging.DEBUG)
        caplog.handler.setFormatter(JsonFormatter())
        body = await client.raw(VIEWER, bearer=bearer, headers={"X-Request-ID": "req-auth"})
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "asyncio"))]
        assert len(ours) == 1, [(r.name, r.getMessage()) for r in ours]
        [record] = ours
        assert record.levelno == logging.WARNING
        assert record.getMessage().startswith("authentication failed: ")
        assert record.exc_info is None
        [line] = [json.loads(text) for text in caplog.text.splitlines() if "authentication failed" in text]
        assert line["request_id"] == "req-auth"
        assert "Traceback" not in caplog.text


class ServeProcess:
    """``orgwallet serve`` on the test's database, its standard output and error kept apart."""

    def __init__(self, settings: Settings, tmp_path: Path, **env: str) -> None:
        assert settings.database_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out, self.err = tmp_path / "serve.out", tmp_path / "serve.err"
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("ORGWALLET_", "STRIPE_"))}
        environment |= {
            "ORGWALLET_DATABASE_URL": settings.database_url,
            "ORGWALLET_HOME": str(settings.home),
            "ORGWALLET_JWT_SECRET": settings.signing_secret,
            **env,
        }
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [*orgwallet_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=tmp_path,
                env=environment,
                stdout=out,
                stderr=err,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.err.read_text()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"serve did not get ready:\n{self.err.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.process.returncode


@pytest.fixture
def json_server(settings: Settings, tmp_path: Path) -> Iterator[ServeProcess]:
    server = ServeProcess(settings, tmp_path, ORGWALLET_LOG_FORMAT="json")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class TestJsonLogs:
    def test_every_line_is_a_json_object_with_the_request_id(
        self, json_server: ServeProcess, settings: Settings
    ) -> None:
        token = jwt.encode(
            {"sub": "alice", "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "exp": 2**31},
            settings.signing_secret,
            algorithm="HS256",
        )
        calls = {
            "abc": f"Bearer {token}",
            "forged-jwt": f"Bearer {forged_jwt(settings)}",
            "bad-key": f"Bearer {BAD_API_KEY}",
        }
        for request_id, authorization in calls.items():
            response = httpx.post(
                f"{json_server.base}/graphql",
                json={"query": VIEWER},
                headers={"Authorization": authorization, "X-Request-ID": request_id},
                timeout=30,
            )
            assert response.status_code == 200
            assert response.headers["x-request-id"] == request_id
        assert json_server.stop() == 0

        text = json_server.err.read_text()
        assert "Traceback" not in text
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # each one parses
        assert lines, "no log lines"
        for line in lines:
            assert set(line) >= {"time", "level", "logger", "message", "request_id"}, line
            assert line["time"].endswith("+00:00"), line  # ISO 8601, UTC
        loggers = {line["logger"] for line in lines}
        assert {"uvicorn.error", "uvicorn.access"} <= loggers, loggers

        def of(request_id: str) -> list[dict[str, Any]]:
            return [line for line in lines if line["request_id"] == request_id]

        [access] = of("abc")  # uvicorn's access line, in the request's context
        assert access["logger"] == "uvicorn.access"
        assert "POST /graphql" in access["message"]
        for request_id in ("forged-jwt", "bad-key"):
            [failure] = [line for line in of(request_id) if line["logger"] != "uvicorn.access"]
            assert failure["level"] == "WARNING"
            assert failure["message"].startswith("authentication failed: "), failure
            assert "exception" not in failure
        assert all(line["request_id"] is None for line in lines if line["logger"] == "uvicorn.error")
