"""Load benchmark of orgwallet against PostgreSQL's own limit, measured side by side.

``python -m bench`` (or ``uv run orgwallet bench``) starts its own PostgreSQL, migrates and
seeds it, starts the server with uvicorn (1 and 2 workers), drives it with ``wrk`` (Lua
scripts in ``bench/lua``) and runs the baselines on the same database in the same minute:

- L0: ``pgbench`` running ``SELECT * FROM ledger_consume(...)``, the one statement a
  consumption sends, with as many clients as wrk has connections;
- L1: the same statement through raw asyncpg in one Python process;
- floors: ``/healthz`` and a GraphQL query that touches no database.

After every workload the ledger invariants are checked on every wallet; a broken invariant,
a duplicate credit or an answered consumption without its entry fails the run. It prints
one table and writes ``bench/results.json``. See PERFORMANCE.md for what is measured and why.
"""
