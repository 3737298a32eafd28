"""Organizations and members under concurrent requests.

Races are made certain rather than likely: the test holds a lock the requests need (the
organization row, or an uncommitted slug), waits (bounded) until the requests are queued
behind it, then lets go."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from strawberry.relay import GlobalID

from orgwallet.services import validation
from tests.helpers import (
    ADD_MEMBER,
    CREATE_ORG,
    REMOVE_MEMBER,
    SET_MEMBER_ROLE,
    GraphQLClient,
    add_member,
    create_org,
    row_counts,
)

MEMBERS = "query($id: ID!) { organization(id: $id) { members { subject role } } }"


def node_uuid(global_id: str) -> uuid.UUID:
    return uuid.UUID(GlobalID.from_id(global_id).node_id)


async def wait_for_lock_waiters(app: FastAPI, count: int, *, within: float = 10.0) -> None:
    """Bounded polling until ``count`` backends of this database wait on a lock."""
    deadline = time.monotonic() + within
    async with app.state.runtime.engine.connect() as connection:
        while True:
            waiting = (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            ).scalar_one()
            await connection.rollback()  # a fresh snapshot of pg_stat_activity each time
            if waiting >= count:
                return
            assert time.monotonic() < deadline, f"{waiting} of {count} requests queued on the lock"
            await asyncio.sleep(0.02)


@asynccontextmanager
async def holding(app: FastAPI, statement: str, **params: Any) -> AsyncIterator[AsyncConnection]:
    """Runs ``statement`` in a transaction kept open (its locks held) for the block; commits after."""
    async with app.state.runtime.engine.connect() as connection:
        await connection.begin()
        await connection.execute(text(statement), params)
        try:
            yield connection
        finally:
            await connection.commit()


async def race(app: FastAPI, lock: str, calls: list[Awaitable[dict[str, Any]]], **params: Any) -> list[Any]:
    """Starts ``calls`` while ``lock`` is held, lets go once all of them wait for it."""
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    async with holding(app, lock, **params):
        tasks = [asyncio.ensure_future(call) for call in calls]
        try:
            await wait_for_lock_waiters(app, len(calls))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
    return await asyncio.gather(*tasks)


LOCK_ORGANIZATION = "SELECT id FROM organizations WHERE id = :id FOR UPDATE"


async def two_owners(client: GraphQLClient) -> str:
    org = await create_org(client, "olivia")
    await add_member(client, org, subject="oscar", role="OWNER", as_="olivia")
    return org


async def roles(client: GraphQLClient, org: str) -> dict[str, str]:
    data = await client.data(MEMBERS, {"id": org}, as_="root-admin")
    return {m["subject"]: m["role"] for m in data["organization"]["members"]}


def outcome(body: dict[str, Any], field: str) -> str:
    if body.get("errors"):
        return str(body["errors"][0]["extensions"]["code"])
    result = body["data"][field]
    return str(result.get("code") or result["__typename"])


class TestOneOwnerAlwaysStays:
    async def test_two_owners_demoting_each_other_at_once(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await two_owners(client)
        audit_before = (await row_counts(app))["audit_log"]

        results = await race(
            app,
            LOCK_ORGANIZATION,
            [
                client.raw(SET_MEMBER_ROLE, {"org": org, "subject": "oscar", "role": "ADMIN"}, as_="olivia"),
                client.raw(SET_MEMBER_ROLE, {"org": org, "subject": "olivia", "role": "ADMIN"}, as_="oscar"),
            ],
            id=node_uuid(org),
        )

        outcomes = [outcome(body, "setMemberRole") for body in results]
        assert "MembershipChanged" in outcomes, outcomes
        outcomes.remove("MembershipChanged")
        assert outcomes[0] in ("LAST_OWNER", "FORBIDDEN"), outcomes
        assert sorted((await roles(client, org)).values()) == ["ADMIN", "OWNER"]
        assert (await row_counts(app))["audit_log"] == audit_before + 1

    async def test_two_owners_removing_each_other_at_once(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await two_owners(client)

        results = await race(
            app,
            LOCK_ORGANIZATION,
            [
                client.raw(REMOVE_MEMBER, {"org": org, "subject": "oscar"}, as_="olivia"),
                client.raw(REMOVE_MEMBER, {"org": org, "subject": "olivia"}, as_="oscar"),
            ],
            id=node_uuid(org),
        )

        outcomes = [outcome(body, "removeMember") for body in results]
        assert "MembershipChanged" in outcomes, outcomes
        outcomes.remove("MembershipChanged")
        assert outcomes[0] in ("LAST_OWNER", "NOT_FOUND"), outcomes
        assert list((await roles(client, org)).values()) == ["OWNER"]

    async def test_both_owners_leaving_at_once(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await two_owners(client)

        results = await race(
            app,
            LOCK_ORGANIZATION,
            [
                client.raw(REMOVE_MEMBER, {"org": org, "subject": "olivia"}, as_="olivia"),
                client.raw(REMOVE_MEMBER, {"org": org, "subject": "oscar"}, as_="oscar"),
            ],
            id=node_uuid(org),
        )

        outcomes = sorted(outcome(body, "removeMember") for body in results)
        assert outcomes == ["LAST_OWNER", "MembershipChanged"], outcomes
        assert list((await roles(client, org)).values()) == ["OWNER"]


class TestConcurrentAdds:
    async def test_the_same_member_added_twice_at_once(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="ada", role="ADMIN", as_="olivia")
        variables = {"org": org, "subject": "mia", "role": "MEMBER"}

        results = await race(
            app,
            LOCK_ORGANIZATION,
            [client.raw(ADD_MEMBER, variables, as_="olivia"), client.raw(ADD_MEMBER, variables, as_="ada")],
            id=node_uuid(org),
        )

        assert sorted(outcome(body, "addMember") for body in results) == [
            "ALREADY_MEMBER",
            "MembershipChanged",
        ]
        assert await roles(client, org) == {"olivia": "OWNER", "ada": "ADMIN", "mia": "MEMBER"}


class TestConcurrentSlugs:
    HOLD_SLUG = "INSERT INTO organizations (name, slug) VALUES ('Held', :slug)"

    async def test_a_given_slug_taken_meanwhile_is_a_conflict(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        results = await race(
            app,
            self.HOLD_SLUG,
            [client.raw(CREATE_ORG, {"name": "Acme", "slug": "acme"}, as_="olivia")],
            slug="acme",
        )
        assert outcome(results[0], "createOrganization") == "SLUG_TAKEN"
        assert (await row_counts(app))["organizations"] == 1

    async def test_a_derived_slug_taken_meanwhile_is_derived_again(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        results = await race(
            app,
            self.HOLD_SLUG,
            [client.raw(CREATE_ORG, {"name": "Acme", "slug": None}, as_="olivia")],
            slug="acme",
        )
        result = results[0]["data"]["createOrganization"]
        assert result["__typename"] == "OrganizationCreated", result
        assert result["organization"]["slug"] == "acme-2"


class TestSlugs:
    def test_slugify(self) -> None:
        assert validation.slugify("  Acme Corp.  ") == "acme-corp"
        assert validation.slugify("Ünïcode & Co") == "n-code-co"
        assert validation.slugify("!!!") == "org"
        long = validation.slugify("word " * 40)
        assert len(long) <= 64
        assert validation.SLUG_RE.fullmatch(long)
