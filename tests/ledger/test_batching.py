"""Group commit (ledger.batching): concurrent consumptions of one wallet share one transaction,
and each is still answered, keyed and recorded as if it had been alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from orgwallet import ledger
from orgwallet.auth.permissions import Permission
from orgwallet.auth.principals import ApiKeyPrincipal
from orgwallet.db.engine import DriverPool, transaction
from orgwallet.errors import Forbidden, IdempotencyConflict, InsufficientTokens, NotFound
from orgwallet.ledger import GrantSource
from orgwallet.ledger.batching import ConsumptionBatcher
from orgwallet.services import access
from orgwallet.services import wallets as wallet_service
from tests.helpers import GraphQLClient, create_api_key, create_org, error_code

Sessions = async_sessionmaker[AsyncSession]


async def credit(sessions: Sessions, wallet: uuid.UUID, amount: int) -> None:
    async with transaction(sessions) as s:
        await ledger.credit(
            s, wallet, amount=amount, source=GrantSource.PURCHASE, actor="test", key=f"credit-{uuid.uuid4()}"
        )


async def state(sessions: Sessions, wallet: uuid.UUID) -> dict[str, Any]:
    """Balance, the consumption entries' keys in order, and the invariants."""
    async with sessions() as s:
        balance = await s.scalar(text("SELECT balance FROM wallets WHERE id = :w"), {"w": wallet})
        keys = (
            await s.scalars(
                text(
                    "SELECT idempotency_key FROM ledger_entries"
                    " WHERE wallet_id = :w AND kind = 'consumption' ORDER BY seq"
                ),
                {"w": wallet},
            )
        ).all()
        problems = await ledger.violations(s, wallet)
    return {"balance": balance, "keys": list(keys), "violations": problems}


@pytest.fixture
async def batcher(engine: AsyncEngine) -> AsyncIterator[ConsumptionBatcher]:
    driver = DriverPool(engine.url.render_as_string(hide_password=False), 10)
    yield ConsumptionBatcher(driver)
    await driver.close()


def outcome(result: ledger.Posting | BaseException) -> tuple[Any, ...]:
    """What a caller sees, without ids and times."""
    if isinstance(result, InsufficientTokens):
        return ("insufficient", result.available)
    if isinstance(result, BaseException):
        return (type(result).__name__,)
    assert result.entry is not None
    return (
        "replayed" if result.replayed else "ok",
        result.entry.amount,
        result.entry.seq,
        result.wallet.balance,
    )


class TestConcurrentConsumptionsOfOneWallet:
    async def test_exactly_what_the_balance_allows_each_answered_and_recorded(
        self, batcher: ConsumptionBatcher, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 100)
        results = await asyncio.gather(
            *(batcher.consume(wallet, amount=1, key=f"k{i}", actor="t") for i in range(150)),
            return_exceptions=True,
        )
        ok = [r for r in results if isinstance(r, ledger.Posting)]
        short = [r for r in results if isinstance(r, InsufficientTokens)]
        assert (len(ok), len(short)) == (100, 50)
        assert batcher.stats.largest > 1 and batcher.stats.batches < 150  # they did share transactions
        # Each has its own entry, numbered without gaps, and sees the wallet right after it.
        assert sorted(p.entry.seq for p in ok if p.entry) == list(range(2, 102))
        assert sorted(p.entry.balance_after for p in ok if p.entry) == list(range(100))
        assert all(p.entry and p.wallet.balance == p.entry.balance_after and not p.replayed for p in ok)
        after = await state(sessions, wallet)
        assert after["balance"] == 0
        assert sorted(after["keys"]) == sorted(p.entry.idempotency_key for p in ok if p.entry)
        assert after["violations"] == {}

    async def test_answers_are_those_of_the_same_calls_one_after_the_other(
        self, batcher: ConsumptionBatcher, sessions: Sessions, engine: AsyncEngine
    ) -> None:
        from tests.ledger.conftest import new_wallet

        alone, together = await new_wallet(sessions), await new_wallet(sessions)
        await credit(sessions, alone, 10)
        await credit(sessions, together, 10)
        calls = [("a", 3), ("b", 4), ("a", 3), ("c", 5), ("a", 2), ("d", 3), ("e", 1), ("b", 4)]
        expected = []
        for key, amount in calls:
            try:
                async with transaction(sessions) as s:
                    expected.append(await ledger.consume(s, alone, amount=amount, key=key, actor="t"))
            except Exception as error:
                expected.append(error)  # type: ignore[arg-type]
        got = await asyncio.gather(
            *(batcher.consume(together, amount=amount, key=key, actor="t") for key, amount in calls),
            return_exceptions=True,
        )
        assert batcher.stats.sizes == {len(calls): 1}  # one transaction for all
        assert [outcome(r) for r in got] == [outcome(r) for r in expected]
        assert [type(r) for r in got] == [type(r) for r in expected]
        assert (await state(sessions, together))["keys"] == (await state(sessions, alone))["keys"]


class TestOneBatch:
    async def test_a_key_twice_replays_the_first_and_with_other_arguments_conflicts(
        self, batcher: ConsumptionBatcher, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        first, again, other = await asyncio.gather(
            batcher.consume(wallet, amount=2, key="same", actor="t", reason="gen"),
            batcher.consume(wallet, amount=2, key="same", actor="t", reason="gen"),
            batcher.consume(wallet, amount=3, key="same", actor="t", reason="gen"),
            return_exceptions=True,
        )
        assert batcher.stats.sizes == {3: 1}
        assert isinstance(first, ledger.Posting) and isinstance(again, ledger.Posting)
        assert first.entry and again.entry and again.replayed and not first.replayed
        assert again.entry.id == first.entry.id
        assert isinstance(other, IdempotencyConflict)
        after = await state(sessions, wallet)
        assert (after["balance"], after["keys"], after["violations"]) == (8, ["same"], {})

    async def test_insufficient_in_the_middle_fails_only_itself(
        self, batcher: ConsumptionBatcher, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 5)
        results = await asyncio.gather(
            batcher.consume(wallet, amount=3, key="x", actor="t"),
            batcher.consume(wallet, amount=4, key="y", actor="t"),
            batcher.consume(wallet, amount=2, key="z", actor="t"),
            return_exceptions=True,
        )
        assert batcher.stats.sizes == {3: 1}
        assert [outcome(r) for r in results] == [("ok", -3, 2, 2), ("insufficient", 2), ("ok", -2, 3, 0)]
        after = await state(sessions, wallet)
        assert (after["balance"], after["keys"], after["violations"]) == (0, ["x", "z"], {})

    async def test_a_failing_statement_is_retried_alone_so_only_the_bad_request_fails(
        self, batcher: ConsumptionBatcher, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        # 256 characters: the entries table refuses it (a CHECK), which aborts the whole batch.
        results = await asyncio.gather(
            batcher.consume(wallet, amount=1, key="good-1", actor="t"),
            batcher.consume(wallet, amount=1, key="k" * 256, actor="t"),
            batcher.consume(wallet, amount=1, key="good-2", actor="t"),
            return_exceptions=True,
        )
        assert batcher.stats.fallbacks == 1
        assert outcome(results[0])[0] == "ok" and outcome(results[2])[0] == "ok"
        assert isinstance(results[1], Exception) and "check" in str(results[1]).lower()
        after = await state(sessions, wallet)
        assert (after["balance"], after["keys"], after["violations"]) == (8, ["good-1", "good-2"], {})


class TestByOrganization:
    async def test_the_wallet_is_found_in_the_same_statement(
        self, batcher: ConsumptionBatcher, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 5)
        async with sessions() as s:
            org = await s.scalar(text("SELECT organization_id FROM wallets WHERE id = :w"), {"w": wallet})
        results = await asyncio.gather(
            batcher.consume_for_organization(org, amount=2, key="o1", actor="t"),
            batcher.consume_for_organization(org, amount=4, key="o2", actor="t"),
            batcher.consume_for_organization(org, amount=3, key="o3", actor="t"),
            return_exceptions=True,
        )
        assert batcher.stats.sizes == {3: 1}
        assert [outcome(r) for r in results] == [("ok", -2, 2, 3), ("insufficient", 3), ("ok", -3, 3, 0)]
        with pytest.raises(NotFound):
            await batcher.consume_for_organization(uuid.uuid4(), amount=1, key="x", actor="t")
        assert (await state(sessions, wallet))["violations"] == {}


class TestCrash:
    BATCH = (
        "SELECT (b.result).outcome FROM ledger_consume_batch(:w, :amounts, :keys, :reasons,"
        " CAST(:meta AS jsonb[]), :actors, now()) AS b"
    )

    def params(self, wallet: uuid.UUID, n: int) -> dict[str, Any]:
        return {
            "w": wallet,
            "amounts": [1] * n,
            "keys": [f"c{i}" for i in range(n)],
            "reasons": [None] * n,
            "meta": [None] * n,
            "actors": ["t"] * n,
        }

    async def test_a_rolled_back_batch_leaves_nothing(self, sessions: Sessions, wallet: uuid.UUID) -> None:
        await credit(sessions, wallet, 10)
        async with sessions() as s:
            rows = (await s.execute(text(self.BATCH), self.params(wallet, 5))).all()
            assert [r.outcome for r in rows] == ["ok"] * 5
            await s.rollback()
        after = await state(sessions, wallet)
        assert (after["balance"], after["keys"], after["violations"]) == (10, [], {})

    async def test_a_backend_killed_before_commit_leaves_nothing(
        self, engine: AsyncEngine, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        async with sessions() as doomed:
            await doomed.execute(text(self.BATCH), self.params(wallet, 5))
            pid = await doomed.scalar(text("SELECT pg_backend_pid()"))
            async with engine.connect() as killer:
                await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(Exception):  # noqa: B017 (the connection is gone, whatever the driver says)
                await doomed.commit()
        after = await state(sessions, wallet)
        assert (after["balance"], after["keys"], after["violations"]) == (10, [], {})


class TestService:
    def key_of(self, organization_id: uuid.UUID) -> ApiKeyPrincipal:
        return ApiKeyPrincipal(uuid.uuid4(), organization_id, frozenset({Permission.TOKENS_CONSUME}))

    async def org_of(self, sessions: Sessions, wallet: uuid.UUID) -> uuid.UUID:
        async with sessions() as s:
            org: uuid.UUID = await s.scalar(
                text("SELECT organization_id FROM wallets WHERE id = :w"), {"w": wallet}
            )
            return org

    async def test_the_batched_path_commits_on_its_own(
        self, sessions: Sessions, wallet: uuid.UUID, batcher: ConsumptionBatcher
    ) -> None:
        await credit(sessions, wallet, 10)
        org = await self.org_of(sessions, wallet)
        granted = access.key_access(self.key_of(org), org)
        posting = await wallet_service.consume_tokens_batched(
            batcher, granted, actor="key", amount=4, key="svc"
        )
        assert posting.wallet.balance == 6
        assert (await state(sessions, wallet))["balance"] == 6

    async def test_the_batched_path_checks_the_permission(
        self, sessions: Sessions, wallet: uuid.UUID, batcher: ConsumptionBatcher
    ) -> None:
        await credit(sessions, wallet, 10)
        org = await self.org_of(sessions, wallet)
        viewer = access.Access(org, None, frozenset({Permission.TOKENS_VIEW}))
        with pytest.raises(Forbidden):
            await wallet_service.consume_tokens_batched(batcher, viewer, actor="key", amount=4, key="svc")
        assert (await state(sessions, wallet))["balance"] == 10

    async def test_the_unit_of_work_path_joins_the_transaction(
        self, sessions: Sessions, wallet: uuid.UUID
    ) -> None:
        await credit(sessions, wallet, 10)
        org = await self.org_of(sessions, wallet)
        async with sessions() as s:
            posting = await wallet_service.consume_tokens(s, self.key_of(org), org, amount=4, key="svc")
            assert posting.wallet.balance == 6
            await s.rollback()
        assert (await state(sessions, wallet))["balance"] == 10


CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename
    ... on TokensConsumed { entry { id balanceAfter } wallet { balance } replayed }
    ... on UserError { code }
  }
}
"""


async def test_concurrent_consume_tokens_through_the_api(client: GraphQLClient) -> None:
    """An organization starts with the trial's 3 tokens; 20 back-end calls at once."""
    org = await create_org(client, "owner")
    _, secret = await create_api_key(client, org, scopes=["tokens.consume"], as_="owner")
    calls = [{"org": org, "amount": 1, "key": f"api-{i}"} for i in range(20)] + [
        {"org": org, "amount": 1, "key": "api-0"}
    ]
    bodies = await asyncio.gather(*(client.raw(CONSUME, v, bearer=secret) for v in calls))
    answers = [b["data"]["consumeTokens"] for b in bodies]
    consumed = [a for a in answers if a["__typename"] == "TokensConsumed" and not a["replayed"]]
    assert len(consumed) == 3
    assert sorted(a["entry"]["balanceAfter"] for a in consumed) == [0, 1, 2]
    assert [error_code(b, "consumeTokens") for b in bodies].count("INSUFFICIENT_TOKENS") in (17, 18)
    # The two calls with key api-0 reach the wallet in either order: both are insufficient,
    # or one consumed and the other replays the same entry.
    first, again = answers[0], answers[-1]
    assert first["__typename"] == again["__typename"]
    if first["__typename"] == "TokensConsumed":  # api-0 was one of the three
        assert sorted([first["replayed"], again["replayed"]]) == [False, True]
        assert first["entry"]["id"] == again["entry"]["id"]
