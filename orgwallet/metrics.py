"""Prometheus metrics of one process, served at ``/metrics`` to a holder of
``ORGWALLET_METRICS_TOKEN`` (without it there is no ``/metrics``).

Counted where things happen: GraphQL operations (by operation name and outcome, and their
latency), consumptions by path and outcome, the group commit's batch sizes, Stripe events by
type and outcome, and the jobs this process ran. Read when scraped, with nothing polling in
between: the connection pools (SQLAlchemy's and asyncpg's) and the job queue (PgQueuer's table,
one grouped query). Each process counts its own: with several uvicorn workers, a scrape is
answered by one of them.

Label values are bounded by construction (a client cannot grow the label set), and the
children of labelled metrics are looked up once and kept: ``.labels()`` takes a lock and
checks its arguments, a dict lookup does not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from graphql import GraphQLError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy.pool import QueuePool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from strawberry.exceptions import MissingQueryError
from strawberry.extensions import SchemaExtension
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError

if TYPE_CHECKING:
    from orgwallet.runtime import Runtime

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """A labelled metric's children by label values, each looked up once."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


# ---------------------------------------------------------------- GraphQL

GRAPHQL_REQUESTS = Counter(
    "orgwallet_graphql_requests",
    "GraphQL operations by operation name (the client's operationName) and outcome: ok, "
    "user_error (errors of the client's making: authentication, permission, validation), "
    "error (an unexpected error on our side)",
    ["operation", "outcome"],
)
GRAPHQL_SECONDS = Histogram(
    "orgwallet_graphql_request_duration_seconds",
    "Time to parse, validate and execute a GraphQL operation, by operation name",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
_graphql_requests = _Children(GRAPHQL_REQUESTS)
_graphql_seconds = _Children(GRAPHQL_SECONDS)

#: Distinct operation names that get a label of their own; later ones are "other".
MAX_OPERATION_NAMES = 200
_OPERATION_NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]{0,63}")  # a GraphQL name, not too long


class OperationNames:
    """Operation names as label values. The name is the client's to choose, so only the first
    ``limit`` distinct ones get a label of their own."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._names: set[str] = set()

    def label(self, name: str | None) -> str:
        """``anonymous`` for an unnamed operation; ``other`` for a name that is not a GraphQL
        name (up to 64 characters) or comes after the first ``limit``."""
        if not name:
            return "anonymous"
        if name in self._names:
            return name
        if len(self._names) >= self._limit or not _OPERATION_NAME.fullmatch(name):
            return "other"
        self._names.add(name)
        return name


_operation_names = OperationNames(MAX_OPERATION_NAMES)


#: What Strawberry raises through the operation for a request it cannot run (the view answers
#: 400): no query, an operation name the document does not have, a mutation over GET.
_REFUSED = (MissingQueryError, CannotGetOperationTypeError, InvalidOperationTypeError)


class GraphQLMetrics(SchemaExtension):
    """Counts and times each operation. List it last: its end runs first, and so sees the
    errors as raised, before ``MaskErrors`` hides what the unexpected ones were.
    ``unexpected``: whether an error is ours (the masking rule)."""

    def __init__(self, *, unexpected: Callable[[GraphQLError], bool]) -> None:
        self._unexpected = unexpected

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            result = self.execution_context.result
            errors = result.errors if result is not None else None
            if not errors:
                outcome = "ok"
            elif not any(self._unexpected(error) for error in errors):
                outcome = "user_error"
        except _REFUSED:
            outcome = "user_error"
            raise
        finally:
            operation = _operation_names.label(self.execution_context.operation_name)
            _graphql_requests(operation, outcome).inc()
            _graphql_seconds(operation).observe(time.perf_counter() - started)


# ---------------------------------------------------------------- the ledger

CONSUMPTIONS = Counter(
    "orgwallet_consumptions",
    "Consumptions by path (consume: in a unit of work; batched: the group commit; reserve, "
    "capture: reservations) and outcome (ok, replayed, insufficient, suspended, conflict, "
    "not_found, not_open, too_much: the ledger's answer; error: no answer, a failure)",
    ["path", "outcome"],
)
_consumptions = _Children(CONSUMPTIONS)
#: The ledger functions' outcomes (migration 0002); anything else is counted as an error.
LEDGER_OUTCOMES = frozenset(
    {"ok", "replayed", "insufficient", "suspended", "conflict", "not_found", "not_open", "too_much"}
)


def consumption(path: str, outcome: str) -> None:
    """Counts one consumption on ``path``; ``outcome``: the ledger function's, or ``error``."""
    _consumptions(path, outcome if outcome in LEDGER_OUTCOMES else "error").inc()


BATCH_SIZES = Histogram(
    "orgwallet_consumption_batch_size",
    "Consumptions per group-commit transaction (ledger.batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


# ---------------------------------------------------------------- Stripe

STRIPE_EVENTS = Counter(
    "orgwallet_stripe_webhook_events",
    "Stripe webhook events by type (the types we handle; other, or unverified for a delivery "
    "that failed verification) and outcome: processed, duplicate, ignored, failed, bad_signature",
    ["type", "outcome"],
)
_stripe_events = _Children(STRIPE_EVENTS)
_STRIPE_OUTCOMES = frozenset({"duplicate", "ignored", "failed", "bad_signature"})


def stripe_event(event_type: str, outcome: str) -> None:
    """``event_type``: bounded by the caller (the types it handles); ``outcome``: ours, or
    a handler's (``credited``...), which is ``processed``."""
    _stripe_events(event_type, outcome if outcome in _STRIPE_OUTCOMES else "processed").inc()


# ---------------------------------------------------------------- jobs

JOBS_RUN = Counter(
    "orgwallet_jobs_run",
    "Jobs run by this process, by entrypoint and outcome (ok, failed: retried later)",
    ["entrypoint", "outcome"],
)
_jobs_run = _Children(JOBS_RUN)


def job_run(entrypoint: str, outcome: str) -> None:
    _jobs_run(entrypoint, outcome).inc()


# ---------------------------------------------------------------- read when scraped

#: PgQueuer's table holds the jobs queued and running (done ones leave it): a small table.
JOBS = """
    SELECT entrypoint, status::text AS status, count(*) AS jobs,
           extract(epoch FROM now() - min(execute_after) FILTER (WHERE execute_after <= now()))
             AS waited
    FROM pgqueuer GROUP BY entrypoint, status
"""
SCRAPE_TIMEOUT_SECONDS = 5.0


async def read_jobs(runtime: Runtime) -> list[Any] | None:
    """The job queue's rows by entrypoint and status; None when the database cannot say."""
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_SECONDS), runtime.driver.acquire() as connection:
            return list(await connection.fetch(JOBS))
    except Exception:  # a timeout too
        log.warning("metrics: the job queue could not be read", exc_info=True)
        return None


def pool_families(runtime: Runtime) -> Iterator[Metric]:
    connections = GaugeMetricFamily(
        "orgwallet_db_pool_connections",
        "Open database connections of this process by pool (sqlalchemy, asyncpg) and state",
        labels=["pool", "state"],
    )
    size = GaugeMetricFamily(
        "orgwallet_db_pool_size",
        "Connections a pool keeps (sqlalchemy: its pool size, overflow aside; asyncpg: its maximum)",
        labels=["pool"],
    )
    pool = runtime.engine.pool
    if isinstance(pool, QueuePool):
        connections.add_metric(["sqlalchemy", "in_use"], pool.checkedout())
        connections.add_metric(["sqlalchemy", "idle"], pool.checkedin())
        size.add_metric(["sqlalchemy"], pool.size())
    opened, idle, maximum = runtime.driver.usage()
    connections.add_metric(["asyncpg", "in_use"], opened - idle)
    connections.add_metric(["asyncpg", "idle"], idle)
    size.add_metric(["asyncpg"], maximum)
    yield connections
    yield size


def job_families(rows: Sequence[Any], entrypoints: Iterable[str]) -> Iterator[Metric]:
    """Every known entrypoint is listed, at 0 when it has no job: a series that vanishes
    when the queue is empty is a gap in the graph, not a zero."""
    jobs = GaugeMetricFamily(
        "orgwallet_jobs", "Jobs in PgQueuer's queue by entrypoint and status", labels=["entrypoint", "status"]
    )
    waited = GaugeMetricFamily(
        "orgwallet_jobs_oldest_queued_age_seconds",
        "How long the oldest queued job that is due has waited to run, by entrypoint (0: none)",
        labels=["entrypoint"],
    )
    counts = {(e, s): 0 for e in entrypoints for s in ("queued", "picked")}
    ages = dict.fromkeys(entrypoints, 0.0)
    for row in rows:
        counts[(row["entrypoint"], row["status"])] = row["jobs"]
        if row["status"] == "queued":
            ages[row["entrypoint"]] = float(row["waited"] or 0)
    for (entrypoint, status), count in sorted(counts.items()):
        jobs.add_metric([entrypoint, status], count)
    for entrypoint, age in sorted(ages.items()):
        waited.add_metric([entrypoint], age)
    yield jobs
    yield waited


class _Scrape:
    """What one scrape reports: this process's metrics, then what was read for it."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self._families


def authorized(authorization: str | None, token: str) -> bool:
    """``Bearer <token>``, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def metrics_route(runtime: Runtime, token: str, entrypoints: Iterable[str]) -> Route:
    """``GET /metrics`` for a holder of ``token``; ``entrypoints``: the jobs this app knows."""
    known = tuple(entrypoints)

    async def metrics(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), token):
            return Response("a bearer token is required\n", 401, headers={"WWW-Authenticate": "Bearer"})
        rows = await read_jobs(runtime)
        families = list(pool_families(runtime))  # read after the queue: its connection is back
        if rows is not None:
            families += job_families(rows, known)
        return Response(generate_latest(_Scrape(families)), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"], include_in_schema=False)
