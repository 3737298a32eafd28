"""The webhook burst: signed Stripe events, 30% of them delivered twice, shuffled, some
duplicates delivered concurrently with their original, POSTed to /webhooks/stripe by wrk.

The events are what Stripe sends when a Checkout Session is paid
(``checkout.session.completed``, ``payment_status = paid``): for each purchase the bench
starts through the public API (``startCheckout``), it reads the session from the Stripe
simulator the server mounts at ``/_stripe`` (with the key the server generated in its home,
``simulator_key``) and signs the event with the server's webhook secret. Where the route does
not exist yet (404) the workload is skipped and says so.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from strawberry.relay import from_base64

from bench.database import Database, Org
from orgwallet.auth import api_keys as key_secrets
from orgwallet.config import Settings

START_CHECKOUT = """
mutation Start($org: ID!, $tokens: BigInt!, $key: String!) {
  startCheckout(input: {organizationId: $org, tokens: $tokens, successUrl: "https://example.com/ok",
                        cancelUrl: "https://example.com/cancel", idempotencyKey: $key}) {
    __typename
    ... on CheckoutStarted { purchase { id } checkoutUrl }
    ... on UserError { code message }
  }
}
"""

SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]+")


def probe(base_url: str) -> int:
    """The status of an unsigned POST: 404 means the route is not there (yet)."""
    response = httpx.post(f"{base_url}/webhooks/stripe", content=b"{}", timeout=10)
    return response.status_code


def simulator_key(home: Path) -> str:
    """The only key the Stripe simulator of a server with this ``ORGWALLET_HOME`` accepts."""
    return Settings(home=home).simulator_secret_key


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    import hashlib
    import hmac

    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


async def purchase_keys(db: Database, orgs: list[Org]) -> list[tuple[Org, str]]:
    """An API key with tokens.purchase for each of ``orgs`` (the consumption keys lack it)."""
    conn = await asyncpg.connect(db.dsn)
    try:
        out = []
        for org in orgs:
            issued = key_secrets.issue()
            await conn.execute(
                """
                INSERT INTO api_keys (id, organization_id, name, prefix, secret_hash, scopes, created_by)
                VALUES ($1, $2, 'bench purchases', $3, $4, ARRAY['tokens.view', 'tokens.purchase'], 'bench')
                """,
                uuid.uuid4(),
                org.id,
                issued.prefix,
                issued.secret_hash,
            )
            out.append((org, issued.secret))
        return out
    finally:
        await conn.close()


def prepare(
    base_url: str, buyers: list[tuple[Org, str]], unique: int, stripe_key: str
) -> tuple[list[bytes], list[uuid.UUID]]:
    """``unique`` ``checkout.session.completed`` events (raw bodies), one per new purchase, and
    the purchases' ids. ``stripe_key``: the server's simulator key (``simulator_key``)."""
    bodies, purchases = [], []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(unique):
            org, key = buyers[i % len(buyers)]
            answer = http.post(
                "/graphql",
                json={
                    "query": START_CHECKOUT,
                    "variables": {"org": org.global_id, "tokens": 10, "key": f"bench-{secrets.token_hex(8)}"},
                },
                headers={"Authorization": f"Bearer {key}"},
            ).json()
            result = (answer.get("data") or {}).get("startCheckout") or {}
            if result.get("__typename") != "CheckoutStarted":
                raise RuntimeError(f"startCheckout did not start a checkout: {json.dumps(answer)[:400]}")
            purchases.append(uuid.UUID(from_base64(result["purchase"]["id"])[1]))
            found = SESSION_ID.search(result["checkoutUrl"])
            if not found:
                raise RuntimeError(f"no Checkout Session id in {result['checkoutUrl']!r}")
            session = http.get(
                f"/_stripe/v1/checkout/sessions/{found.group(0)}",
                headers={"Authorization": f"Bearer {stripe_key}"},
            )
            if session.status_code != 200:
                raise RuntimeError(f"the Stripe simulator answered {session.status_code} for the session")
            bodies.append(paid_event(session.json()))
    return bodies, purchases


def paid_event(checkout_session: dict[str, Any]) -> bytes:
    """The body of the ``checkout.session.completed`` event Stripe sends when the session is
    paid, as Stripe writes it (indented JSON)."""
    event = {
        "id": f"evt_bench_{secrets.token_hex(10)}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "type": "checkout.session.completed",
        "data": {"object": {**checkout_session, "status": "complete", "payment_status": "paid"}},
    }
    return json.dumps(event, indent=2).encode()


def burst(
    bodies: list[bytes], *, duplicate_share: float, secret: str, seed: int = 5
) -> list[tuple[str, bytes]]:
    """The delivery order: every event, ``duplicate_share`` of the deliveries repeated, shuffled;
    a third of the repeats placed right after their original (neighbours go out concurrently)."""
    rng = random.Random(seed)
    total = round(len(bodies) / (1 - duplicate_share))
    repeats = [rng.choice(bodies) for _ in range(total - len(bodies))]
    adjacent, loose = repeats[: len(repeats) // 3], repeats[len(repeats) // 3 :]
    order = bodies + loose
    rng.shuffle(order)
    for body in adjacent:
        order.insert(order.index(body) + 1, body)
    now = int(time.time())
    return [(signature(body, secret, now), body) for body in order]


def write_events(path: Path, deliveries: list[tuple[str, bytes]]) -> None:
    with path.open("wb") as f:
        for header, body in deliveries:
            f.write(f"{header}\n{len(body)}\n".encode())
            f.write(body)


async def credits_since(db: Database, since: Any, purchases: list[uuid.UUID]) -> dict[str, Any]:
    conn = await asyncpg.connect(db.dsn)
    try:
        credited = {
            r[0]
            for r in await conn.fetch(
                "SELECT reference_id FROM ledger_entries WHERE kind = 'purchase' AND reference_id = ANY($1)",
                purchases,
            )
        }
        missing = [p for p in purchases if p not in credited]
        row = await conn.fetchrow(
            """
            SELECT count(*) AS credits,
                   count(DISTINCT coalesce(reference_id::text, idempotency_key)) AS distinct_refs
            FROM ledger_entries WHERE kind = 'purchase' AND created_at >= $1 AND actor <> 'bench'
            """,
            since,
        )
        why = []
        for purchase in missing[:5]:  # what the receiver recorded for them (its table, if it has one)
            try:
                rows = await conn.fetch(
                    "SELECT event_id, outcome, error, attempts FROM stripe_events"
                    " WHERE payload::text LIKE $1",
                    f"%{purchase}%",
                )
                why.append({"purchase": str(purchase), "events": [dict(r) for r in rows]})
            except asyncpg.PostgresError as error:
                why.append({"purchase": str(purchase), "error": str(error)[:200]})
        return {
            "credits": int(row["credits"]),
            "distinct": int(row["distinct_refs"]),
            "missing": why,
        }
    finally:
        await conn.close()


def summarize(result: dict[str, Any], unique: int, credited: dict[str, int]) -> dict[str, Any]:
    seconds = (result.get("burst_us") or result["duration_us"]) / 1e6
    return {
        "status": "ran",
        "deliveries": result["answered"],
        "unique_events": unique,
        "events_per_s": result["answered"] / seconds if seconds else 0.0,
        "seconds": seconds,
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "status_2xx": result["status_2xx"],
        "status_4xx": result["status_4xx"],
        "status_5xx": result["status_5xx"],
        "credits": credited["credits"],
        "duplicate_credits": max(0, credited["credits"] - credited["distinct"]),
        "missing_credits": max(0, unique - credited["distinct"]),
        "missing_purchases": credited["missing"],
        "sample": result.get("sample", ""),
    }
