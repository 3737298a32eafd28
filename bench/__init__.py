"""Load benchmark of orgwallet against PostgreSQL's own limit, measured side by side.

``python -m bench`` (or ``uv run orgwallet bench``) starts its own PostgreSQL, migrates and
seeds it, starts the server with uvicorn (1 and 2 workers), drives it with ``wrk`` (Lua
scripts in ``bench/lua``) and runs the baselines on the same database in the same minute:

- L0: ``pgbench`` running ``SELECT * FROM ledger_consume(...)``, the one statement a
  consumption sends, with as many clients as wrk has connections;
- L1: the same statement through raw asyncpg in one Python process;
- floors: ``/healthz`` and a GraphQL query that touches no database.

The wallet-change signal's cost (trigger ``wallets_signal``, PERFORMANCE.md: at most 10% of the
many-wallet and hot-wallet ratios): on the run's smallest server (1 worker), each consumption
workload runs four times back to back with the trigger off, on, on, off (each state's rate is its
two runs' requests over their seconds); the trigger is enabled again whatever happens.

The threshold crossing (automatic top-ups; the issue: within 10% of the plain many-wallet
ratio, and exactly one top-up per crossing), on the same 1-worker server right after the plain
many-wallet row: the last ``crossing_wallets`` organizations save a card through the server's
own flow (``setupPaymentMethod``, the hosted page paid with 4242 4242 4242 4242, the webhook);
after the warm-up each gets ``setAutoTopUp`` (threshold just below its balance, FIXED 10,000
tokens: each wallet crosses at most once, early); then the same consumption over those wallets
is measured (row "many wallets: crossing thresholds", ratios to L0 and to the plain row). Once
no signal or top-up job is left (60 s at most), each wallet's top-ups must equal its crossings
in the ledger, each PAID and credited once, or the run fails (``bench/topups.py``). The policies
are turned off afterwards and the wallets' bands set again.

After every workload the ledger invariants are checked on every wallet; a broken invariant,
a duplicate credit or an answered consumption without its entry fails the run. It prints
one table and writes ``bench/results.json``. See PERFORMANCE.md for what is measured and why.
"""
