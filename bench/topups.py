"""The threshold-crossing workload's setup and its exact check (automatic top-ups, migration 0008).

Setup, through the running server (a card is saved the way a customer saves one): an API key per
organization with tokens.view, tokens.purchase and tokens.configure; ``setupPaymentMethod``, whose
hosted page is paid with the test card 4242 4242 4242 4242 as a browser posts its form; the
simulator's webhook then saves the card as the organization's default. Right before the measured
load, ``setAutoTopUp``: a threshold a random number of tokens below each wallet's balance (read once
the warm-up's last consumptions have landed), up to about twice what one wallet spends in the load,
and a FIXED top-up far larger than what the run can spend from one wallet, so that about half the
wallets cross their threshold, at most once and at times spread over the load, and the top-up lifts
them well above.

The check, once the jobs are done: per wallet, the crossings are read from the ledger (an entry
that takes the balance from at or above the threshold to below it while no top-up of that
wallet is in flight, i.e. since the last top-up's credit), and compared with the wallet's
auto-top-up purchases, each of which must be PAID and credited once with its tokens.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from bench.database import Org
from orgwallet.auth import api_keys as key_secrets

CARD = "4242 4242 4242 4242"
#: What each top-up buys: far more than one wallet spends in a run (about requests / wallets),
#: so that a wallet that crossed is lifted well above its threshold and does not cross again.
TOP_UP_TOKENS = 10_000
#: The threshold is a random number of tokens below the balance, up to a spread that the run
#: chooses (about twice what one wallet spends in the measured load): about half the wallets
#: cross, at times spread over the load, as wallets of real customers do, rather than all at
#: its start.
THRESHOLD_SEED = 20261201
JOBS = ("wallet.signal", "top_up.start")
SCOPES = ["tokens.view", "tokens.purchase", "tokens.configure"]

SETUP_PAYMENT_METHOD = """
mutation Setup($input: SetupPaymentMethodInput!) {
  setupPaymentMethod(input: $input) {
    __typename
    ... on PaymentMethodSetupStarted { checkoutUrl }
    ... on UserError { code message }
  }
}
"""

SET_AUTO_TOP_UP = """
mutation SetAutoTopUp($input: SetAutoTopUpInput!) {
  setAutoTopUp(input: $input) { policy { enabled threshold method tokens } }
}
"""

DISABLE_AUTO_TOP_UP = """
mutation DisableAutoTopUp($input: DisableAutoTopUpInput!) {
  disableAutoTopUp(input: $input) { policy { enabled } }
}
"""


class NotAvailable(RuntimeError):
    """The server has no automatic top-ups (its schema lacks the mutations)."""


@dataclass(frozen=True)
class Buyer:
    org: Org
    key: str  # an API key with SCOPES


@dataclass(frozen=True)
class Watched:
    """A wallet with a policy: its threshold and its state when the policy was set."""

    org: Org
    threshold: int
    balance: int
    seq: int


async def issue_keys(dsn: str, orgs: list[Org]) -> list[Buyer]:
    """An API key with SCOPES per organization (the consumption keys lack them)."""
    conn = await asyncpg.connect(dsn)
    try:
        issued = [key_secrets.issue() for _ in orgs]
        await conn.executemany(
            """
            INSERT INTO api_keys (id, organization_id, name, prefix, secret_hash, scopes, created_by)
            VALUES ($1, $2, 'bench top-ups', $3, $4, $5, 'bench')
            """,
            [
                (uuid.uuid4(), org.id, key.prefix, key.secret_hash, SCOPES)
                for org, key in zip(orgs, issued, strict=True)
            ],
        )
    finally:
        await conn.close()
    return [Buyer(org, key.secret) for org, key in zip(orgs, issued, strict=True)]


async def _graphql(
    http: httpx.AsyncClient, buyer: Buyer, query: str, variables: dict[str, Any]
) -> dict[str, Any]:
    response = await http.post(
        "/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {buyer.key}"},
    )
    answer: dict[str, Any] = response.json()
    errors = answer.get("errors") or []
    if errors:
        message = str(errors[0].get("message", ""))
        if "Cannot query field" in message or "Unknown type" in message:
            raise NotAvailable(message[:300])
        raise RuntimeError(f"GraphQL error: {str(errors)[:400]}")
    data: dict[str, Any] = answer.get("data") or {}
    return data


async def _each(buyers: list[Buyer], work: Any, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(buyer: Buyer) -> None:
        async with gate:
            await work(buyer)

    await asyncio.gather(*(one(b) for b in buyers))


async def save_cards(base_url: str, buyers: list[Buyer], *, concurrency: int = 8) -> None:
    """``setupPaymentMethod`` per organization, then its hosted page paid with CARD (a POST of
    the page's form, answered 303 like a browser's). The simulator's webhooks save the cards."""

    async def one(http: httpx.AsyncClient, buyer: Buyer) -> None:
        data = await _graphql(
            http,
            buyer,
            SETUP_PAYMENT_METHOD,
            {
                "input": {
                    "organizationId": buyer.org.global_id,
                    "successUrl": "https://example.com/saved",
                    "cancelUrl": "https://example.com/cancel",
                }
            },
        )
        result = data.get("setupPaymentMethod") or {}
        if result.get("__typename") != "PaymentMethodSetupStarted":
            raise RuntimeError(f"setupPaymentMethod did not start: {result}")
        # The page lives under the server's public URL (its default, not this port): same path here.
        page = urlsplit(result["checkoutUrl"]).path
        paid = await http.post(page, data={"card_number": CARD, "action": "pay"})
        if paid.status_code != 303:
            raise RuntimeError(f"the setup page answered {paid.status_code}: {paid.text[:300]}")

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        await _each(buyers, lambda b: one(http, b), concurrency)


async def wait_cards(dsn: str, orgs: list[Org], within: float = 60.0) -> int:
    """Waits until every organization has a default card recorded (the setup webhooks); returns
    how many have one."""
    deadline = time.monotonic() + within
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            saved = int(
                await conn.fetchval(
                    "SELECT count(*) FROM stripe_customers WHERE organization_id = ANY($1)"
                    " AND default_payment_method IS NOT NULL",
                    [o.id for o in orgs],
                )
            )
            if saved == len(orgs) or time.monotonic() > deadline:
                return saved
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def wallet_states(dsn: str, orgs: list[Org]) -> dict[uuid.UUID, tuple[int, int]]:
    """(balance, entry_seq) per wallet id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, balance, entry_seq FROM wallets WHERE id = ANY($1)", [o.wallet_id for o in orgs]
        )
    finally:
        await conn.close()
    return {r["id"]: (int(r["balance"]), int(r["entry_seq"])) for r in rows}


async def set_policies(
    base_url: str, buyers: list[Buyer], dsn: str, *, spread: int, concurrency: int = 8
) -> list[Watched]:
    """Reads each wallet's balance, then ``setAutoTopUp``: threshold 1 to ``spread`` tokens
    under it (seeded), FIXED TOP_UP_TOKENS. Returns the wallets as they were when their policy
    was set."""
    states = await wallet_states(dsn, [b.org for b in buyers])
    below = random.Random(THRESHOLD_SEED)
    watched = {
        b.org.id: Watched(
            b.org, states[b.org.wallet_id][0] - below.randint(1, max(1, spread)), *states[b.org.wallet_id]
        )
        for b in buyers
    }

    async def one(http: httpx.AsyncClient, buyer: Buyer) -> None:
        data = await _graphql(
            http,
            buyer,
            SET_AUTO_TOP_UP,
            {
                "input": {
                    "organizationId": buyer.org.global_id,
                    "enabled": True,
                    "method": "FIXED",
                    "threshold": watched[buyer.org.id].threshold,
                    "tokens": TOP_UP_TOKENS,
                }
            },
        )
        policy = (data.get("setAutoTopUp") or {}).get("policy") or {}
        if not policy.get("enabled") or int(policy.get("threshold") or 0) != watched[buyer.org.id].threshold:
            raise RuntimeError(f"setAutoTopUp did not set the policy: {data}")

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        await _each(buyers, lambda b: one(http, b), concurrency)
    after = await wallet_states(dsn, [b.org for b in buyers])
    moved = [w for w in watched.values() if after[w.org.wallet_id] != (w.balance, w.seq)]
    if moved:
        raise RuntimeError(f"{len(moved)} wallets changed while their policies were set")
    return list(watched.values())


async def disable_policies(base_url: str, buyers: list[Buyer], *, concurrency: int = 8) -> None:
    async def one(http: httpx.AsyncClient, buyer: Buyer) -> None:
        data = await _graphql(
            http, buyer, DISABLE_AUTO_TOP_UP, {"input": {"organizationId": buyer.org.global_id}}
        )
        if ((data.get("disableAutoTopUp") or {}).get("policy") or {}).get("enabled") is not False:
            raise RuntimeError(f"disableAutoTopUp did not turn the policy off: {data}")

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        await _each(buyers, lambda b: one(http, b), concurrency)


async def resignal(dsn: str, orgs: list[Org]) -> None:
    """One ``wallet.signal`` job per wallet (what the service does when a policy is set): the
    listeners set the wallet's watch band again (after the policies are turned off, the alerts'
    band alone)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT job_enqueue('wallet.signal', json_build_object('wallet_id', id)::text)"
            " FROM wallets WHERE id = ANY($1)",
            [o.wallet_id for o in orgs],
        )
    finally:
        await conn.close()


async def activity(dsn: str, orgs: list[Org]) -> dict[str, int]:
    """The jobs of JOBS queued or running (anywhere) and the auto top-ups still PENDING (of ``orgs``)."""
    conn = await asyncpg.connect(dsn)
    try:
        jobs = await conn.fetch(
            "SELECT entrypoint, count(*) AS n FROM pgqueuer WHERE entrypoint = ANY($1)"
            " AND status IN ('queued', 'picked') GROUP BY entrypoint",
            list(JOBS),
        )
        pending = await conn.fetchval(
            "SELECT count(*) FROM purchases WHERE method = 'auto_top_up' AND status = 'pending'"
            " AND organization_id = ANY($1)",
            [o.id for o in orgs],
        )
    finally:
        await conn.close()
    out = {name: 0 for name in JOBS} | {r["entrypoint"]: int(r["n"]) for r in jobs}
    out["pending_top_ups"] = int(pending)
    return out


async def wait_quiet(dsn: str, orgs: list[Org], within: float = 60.0) -> dict[str, Any]:
    """Waits (at most ``within`` seconds) until no job of JOBS is queued or running and no auto top-up
    of ``orgs`` is PENDING, seen twice 0.2 s apart (a job that ends may enqueue the next)."""
    started = time.monotonic()
    quiet_once = False
    while True:
        state = await activity(dsn, orgs)
        quiet = not any(state.values())
        if quiet and quiet_once:
            break
        quiet_once = quiet
        if time.monotonic() - started > within:
            break
        await asyncio.sleep(0.2)
    return {"quiet": quiet, "seconds": round(time.monotonic() - started, 2), "left": state}


async def bands(dsn: str, orgs: list[Org]) -> dict[uuid.UUID, tuple[int | None, int | None]]:
    """(watch_below, watch_at_or_above) per wallet id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, watch_below, watch_at_or_above FROM wallets WHERE id = ANY($1)",
            [o.wallet_id for o in orgs],
        )
    finally:
        await conn.close()
    return {r["id"]: (r["watch_below"], r["watch_at_or_above"]) for r in rows}


async def wait_bands(dsn: str, watched: list[Watched], within: float = 30.0) -> dict[str, Any]:
    """Waits until the policies' signal jobs are done and every wallet watches its threshold
    (``watch_below`` = threshold): a consumption that crosses it then enqueues the signal."""
    orgs = [w.org for w in watched]
    quiet = await wait_quiet(dsn, orgs, within)
    found = await bands(dsn, orgs)
    unwatched = [w for w in watched if found[w.org.wallet_id][0] != w.threshold]
    return quiet | {"unwatched": len(unwatched)}


async def now(dsn: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()


def crossings(threshold: int, balance: int, entries: list[Any], top_ups: set[uuid.UUID]) -> list[Any]:
    """The entries (in ledger order, each with kind, balance_after, reference_id) that take a
    wallet's balance, ``balance`` before the first, from at or above ``threshold`` to below it
    while no top-up is in flight: each such crossing asks for a top-up, which is in flight until
    its credit (a purchase entry whose reference is one of ``top_ups``). A credit that leaves
    the balance below the threshold counts too: the wallet is then below it with no top-up in
    flight, and the listener asks for the next one."""
    found, prev, in_flight = [], balance, False
    for e in entries:
        credit = e["kind"] == "purchase" and e["reference_id"] in top_ups
        if credit:
            in_flight = False
        below = e["balance_after"] < threshold
        if below and not in_flight and (prev >= threshold or credit):
            found.append(e)
            in_flight = True
        prev = e["balance_after"]
    return found


async def verify(dsn: str, watched: list[Watched], started: Any) -> dict[str, Any]:
    """Per wallet: the crossings in the ledger since its policy was set (an entry taking the
    balance from at or above the threshold to below it, while no top-up is in flight: none
    since the last one's credit) against its auto-top-up purchases; each purchase PAID and
    credited once with its tokens. ``started``: the database clock when the load began."""
    conn = await asyncpg.connect(dsn)
    try:
        entries = await conn.fetch(
            """
            SELECT e.wallet_id, e.seq, e.kind, e.amount, e.balance_after, e.reference_id, e.created_at
            FROM unnest($1::uuid[], $2::bigint[]) AS w(id, seq0)
            JOIN ledger_entries e ON e.wallet_id = w.id AND e.seq > w.seq0
            ORDER BY e.wallet_id, e.seq
            """,
            [w.org.wallet_id for w in watched],
            [w.seq for w in watched],
        )
        purchases = await conn.fetch(
            """
            SELECT p.id, p.organization_id, p.status, p.tokens, p.created_at, p.paid_at,
                   (SELECT count(*) FROM ledger_entries e
                    WHERE e.kind = 'purchase' AND e.reference_id = p.id) AS credits,
                   (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
                    WHERE e.kind = 'purchase' AND e.reference_id = p.id) AS credited
            FROM purchases p
            WHERE p.method = 'auto_top_up' AND p.organization_id = ANY($1)
            ORDER BY p.organization_id, p.created_at
            """,
            [w.org.id for w in watched],
        )
    finally:
        await conn.close()
    by_wallet: dict[uuid.UUID, list[Any]] = {}
    for e in entries:
        by_wallet.setdefault(e["wallet_id"], []).append(e)
    by_org: dict[uuid.UUID, list[Any]] = {}
    for p in purchases:
        by_org.setdefault(p["organization_id"], []).append(p)
    top_up_ids = {p["id"] for p in purchases}

    crossings_at: list[float] = []
    per_wallet: list[tuple[Watched, int, int]] = []
    for w in watched:
        found = crossings(w.threshold, w.balance, by_wallet.get(w.org.wallet_id, []), top_up_ids)
        crossings_at += [(e["created_at"] - started).total_seconds() for e in found]
        per_wallet.append((w, len(found), len(by_org.get(w.org.id, []))))

    not_paid = [p for p in purchases if p["status"] != "paid"]
    bad_credit = [
        p
        for p in purchases
        if p["status"] == "paid" and (p["credits"] != 1 or int(p["credited"]) != int(p["tokens"]))
    ]
    duplicates = sum(max(0, n - c) for _, c, n in per_wallet)
    missing = sum(max(0, c - n) for _, c, n in per_wallet)
    mismatched = [
        {"organization": str(w.org.id), "n": w.org.n, "crossings": c, "top_ups": n}
        for w, c, n in per_wallet
        if c != n
    ]
    paid_at = [(p["paid_at"] - started).total_seconds() for p in purchases if p["paid_at"] is not None]
    crossings_at.sort()
    return {
        "wallets": len(watched),
        "crossings": sum(c for _, c, _ in per_wallet),
        "wallets_crossed": sum(1 for _, c, _ in per_wallet if c),
        "max_crossings_per_wallet": max((c for _, c, _ in per_wallet), default=0),
        "top_ups": len(purchases),
        "paid": sum(1 for p in purchases if p["status"] == "paid"),
        "duplicates": duplicates,
        "missing": missing,
        "not_paid": [{"id": str(p["id"]), "status": p["status"]} for p in not_paid[:10]],
        "bad_credits": [
            {"id": str(p["id"]), "credits": int(p["credits"]), "credited": int(p["credited"])}
            for p in bad_credit[:10]
        ],
        "mismatched_wallets": mismatched[:10],
        "matched": not mismatched and not not_paid and not bad_credit,
        "crossing_s": _spread(crossings_at),
        "paid_s": _spread(sorted(paid_at)),
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    """First, median and last of sorted ``values`` (seconds from the start of the load)."""
    if not values:
        return None
    return {
        "first": round(values[0], 3),
        "median": round(values[len(values) // 2], 3),
        "last": round(values[-1], 3),
    }
