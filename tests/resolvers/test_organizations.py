"""Organizations and members over GraphQL: what works, and bad input as typed errors that
write nothing."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from strawberry.relay import GlobalID

from tests.helpers import (
    ADD_MEMBER,
    CREATE_ORG,
    REMOVE_MEMBER,
    SET_MEMBER_ROLE,
    GraphQLClient,
    add_member,
    create_api_key,
    create_org,
    row_counts,
    snapshot,
)

MEMBERS = "query($id: ID!) { organization(id: $id) { members { subject email role } } }"


async def members_of(client: GraphQLClient, org: str, *, as_: str = "olivia") -> dict[str, str]:
    data = await client.data(MEMBERS, {"id": org}, as_=as_)
    return {m["subject"]: m["role"] for m in data["organization"]["members"]}


async def refused(
    client: GraphQLClient, app: FastAPI, document: str, variables: dict[str, Any], *, as_: str, field: str
) -> dict[str, Any]:
    """Sends a call that must fail as a typed result, checks it wrote nothing, returns the result."""
    counts, before = await row_counts(app), await snapshot(app)
    body = await client.raw(document, variables, as_=as_)
    assert not body.get("errors"), body
    result: dict[str, Any] = body["data"][field]
    assert "code" in result, result
    assert await row_counts(app) == counts
    assert await snapshot(app) == before
    return result


class TestCreateOrganization:
    async def test_the_caller_becomes_its_owner(self, client: GraphQLClient) -> None:
        data = await client.data(CREATE_ORG, {"name": "  Acme Corp  ", "slug": None}, as_="olivia")
        organization = data["createOrganization"]["organization"]
        assert organization["name"] == "Acme Corp"
        assert organization["slug"] == "acme-corp"
        assert await members_of(client, organization["id"]) == {"olivia": "OWNER"}
        viewer = await client.data("{ viewer { memberships { organization { id } role } } }", as_="olivia")
        assert viewer["viewer"]["memberships"] == [
            {"organization": {"id": organization["id"]}, "role": "OWNER"}
        ]

    async def test_a_given_slug_is_kept(self, client: GraphQLClient) -> None:
        data = await client.data(CREATE_ORG, {"name": "Acme", "slug": "the-acme-1"}, as_="olivia")
        assert data["createOrganization"]["organization"]["slug"] == "the-acme-1"

    async def test_a_derived_slug_avoids_taken_ones(self, client: GraphQLClient) -> None:
        slugs = []
        for _ in range(3):
            data = await client.data(CREATE_ORG, {"name": "Acme!", "slug": None}, as_="olivia")
            slugs.append(data["createOrganization"]["organization"]["slug"])
        assert slugs == ["acme", "acme-2", "acme-3"]

    async def test_a_name_of_200_characters_is_accepted(self, client: GraphQLClient) -> None:
        data = await client.data(CREATE_ORG, {"name": "n" * 200, "slug": None}, as_="olivia")
        organization = data["createOrganization"]["organization"]
        assert organization["name"] == "n" * 200
        assert len(organization["slug"]) <= 64

    @pytest.mark.parametrize(
        ("name", "slug", "field"),
        [
            ("", None, "name"),
            ("   ", None, "name"),
            ("\t\n", None, "name"),
            ("n" * 201, None, "name"),
            ("n" * 500, None, "name"),
            ("bell\x07", None, "name"),
            ("Acme", "Acme", "slug"),
            ("Acme", "with space", "slug"),
            ("Acme", "-acme", "slug"),
            ("Acme", "acme-", "slug"),
            ("Acme", "acmé", "slug"),
            ("Acme", "a" * 65, "slug"),
            ("Acme", "acme\n", "slug"),
        ],
    )
    async def test_bad_input_is_a_typed_error_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, name: str, slug: str | None, field: str
    ) -> None:
        result = await refused(
            client, app, CREATE_ORG, {"name": name, "slug": slug}, as_="olivia", field="createOrganization"
        )
        assert result["__typename"] == "InvalidInput"
        assert result["code"] == "INVALID_INPUT"
        assert result["field"] == field

    async def test_a_taken_slug_is_a_conflict_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        await create_org(client, "olivia", name="Acme", slug="acme")
        result = await refused(
            client, app, CREATE_ORG, {"name": "Other", "slug": "acme"}, as_="otto", field="createOrganization"
        )
        assert (result["__typename"], result["code"]) == ("Conflict", "SLUG_TAKEN")


class TestAddMember:
    async def test_adds_with_role_and_email(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        variables = {"org": org, "subject": "bill", "email": "bill@example.com", "role": "BILLING"}
        result = (await client.data(ADD_MEMBER, variables, as_="olivia"))["addMember"]
        assert result["__typename"] == "MembershipChanged"
        assert {"subject": "bill", "email": "bill@example.com", "role": "BILLING"} in result["organization"][
            "members"
        ]
        data = await client.data("{ viewer { memberships { role permissions } } }", as_="bill")
        assert data["viewer"]["memberships"] == [
            {"role": "BILLING", "permissions": ["tokens.view", "tokens.purchase", "tokens.configure"]}
        ]

    async def test_an_existing_member_is_a_conflict(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="mia", role="MEMBER", as_="olivia")
        for subject in ("mia", "olivia"):
            result = await refused(
                client,
                app,
                ADD_MEMBER,
                {"org": org, "subject": subject, "role": "ADMIN"},
                as_="olivia",
                field="addMember",
            )
            assert (result["__typename"], result["code"]) == ("Conflict", "ALREADY_MEMBER")

    @pytest.mark.parametrize(
        ("subject", "email", "field"),
        [
            ("", None, "subject"),
            ("   ", None, "subject"),
            ("s" * 256, None, "subject"),
            ("mia", "not-an-address", "email"),
            ("mia", "two@@example.com", "email"),
            ("mia", "spaces in@example.com", "email"),
            ("mia", "x" * 320 + "@example.com", "email"),
            ("mia", "mia@example.com\n", "email"),
        ],
    )
    async def test_bad_input_is_a_typed_error_and_writes_nothing(
        self, client: GraphQLClient, app: FastAPI, subject: str, email: str | None, field: str
    ) -> None:
        org = await create_org(client, "olivia")
        variables = {"org": org, "subject": subject, "email": email, "role": "MEMBER"}
        result = await refused(client, app, ADD_MEMBER, variables, as_="olivia", field="addMember")
        assert (result["__typename"], result["code"], result["field"]) == (
            "InvalidInput",
            "INVALID_INPUT",
            field,
        )

    async def test_an_unknown_role_is_a_graphql_validation_error(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, "olivia")
        counts = await row_counts(app)
        body = await client.raw(ADD_MEMBER, {"org": org, "subject": "mia", "role": "SUPERUSER"}, as_="olivia")
        assert body["data"] is None
        assert "SUPERUSER" in body["errors"][0]["message"]
        inline = await client.raw(
            'mutation($org: ID!) { addMember(input: {organizationId: $org, subject: "mia", role: owner})'
            " { __typename } }",
            {"org": org},
            as_="olivia",
        )
        assert inline["data"] is None and inline["errors"]
        assert await row_counts(app) == counts

    async def test_an_unknown_organization_is_not_found(self, client: GraphQLClient, app: FastAPI) -> None:
        await create_org(client, "olivia")
        missing = str(GlobalID("Organization", "0190a000-0000-7000-8000-000000000000"))
        result = await refused(
            client,
            app,
            ADD_MEMBER,
            {"org": missing, "subject": "mia", "role": "MEMBER"},
            as_="root-admin",
            field="addMember",
        )
        assert (result["__typename"], result["code"]) == ("NotFound", "NOT_FOUND")

    async def test_an_id_of_another_type_is_not_found(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        key_id, _ = await create_api_key(client, org, scopes=[], as_="olivia")
        result = await refused(
            client,
            app,
            ADD_MEMBER,
            {"org": key_id, "subject": "mia", "role": "MEMBER"},
            as_="olivia",
            field="addMember",
        )
        assert (result["__typename"], result["code"]) == ("NotFound", "NOT_FOUND")

    async def test_a_malformed_id_is_invalid_input(self, client: GraphQLClient, app: FastAPI) -> None:
        await create_org(client, "olivia")
        result = await refused(
            client,
            app,
            ADD_MEMBER,
            {"org": "not-an-id", "subject": "mia", "role": "MEMBER"},
            as_="olivia",
            field="addMember",
        )
        assert (result["__typename"], result["field"]) == ("InvalidInput", "organizationId")


class TestSetMemberRole:
    async def test_changes_the_role(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="mia", role="MEMBER", as_="olivia")
        result = (
            await client.data(SET_MEMBER_ROLE, {"org": org, "subject": "mia", "role": "ADMIN"}, as_="olivia")
        )["setMemberRole"]
        assert result["__typename"] == "MembershipChanged"
        assert await members_of(client, org) == {"olivia": "OWNER", "mia": "ADMIN"}

    async def test_an_owner_can_hand_over_ownership(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="oscar", role="ADMIN", as_="olivia")
        for subject, role in (("oscar", "OWNER"), ("olivia", "VIEWER")):
            result = await client.data(
                SET_MEMBER_ROLE, {"org": org, "subject": subject, "role": role}, as_="olivia"
            )
            assert result["setMemberRole"]["__typename"] == "MembershipChanged"
        assert await members_of(client, org, as_="oscar") == {"olivia": "VIEWER", "oscar": "OWNER"}

    async def test_the_same_role_changes_nothing(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="mia", role="MEMBER", as_="olivia")
        before = await snapshot(app)
        result = await client.data(
            SET_MEMBER_ROLE, {"org": org, "subject": "mia", "role": "MEMBER"}, as_="olivia"
        )
        assert result["setMemberRole"]["__typename"] == "MembershipChanged"
        assert await snapshot(app) == before

    @pytest.mark.parametrize("role", ["ADMIN", "BILLING", "MEMBER", "VIEWER"])
    async def test_demoting_the_last_owner_is_a_conflict(
        self, client: GraphQLClient, app: FastAPI, role: str
    ) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="ada", role="ADMIN", as_="olivia")
        for caller in ("olivia", "root-admin"):
            result = await refused(
                client,
                app,
                SET_MEMBER_ROLE,
                {"org": org, "subject": "olivia", "role": role},
                as_=caller,
                field="setMemberRole",
            )
            assert (result["__typename"], result["code"]) == ("Conflict", "LAST_OWNER")
        assert await members_of(client, org) == {"olivia": "OWNER", "ada": "ADMIN"}

    async def test_a_non_member_is_not_found(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        await create_org(client, "otto", name="Other")
        result = await refused(
            client,
            app,
            SET_MEMBER_ROLE,
            {"org": org, "subject": "otto", "role": "VIEWER"},
            as_="olivia",
            field="setMemberRole",
        )
        assert (result["__typename"], result["code"]) == ("NotFound", "NOT_FOUND")

    async def test_an_unknown_role_is_a_graphql_validation_error(
        self, client: GraphQLClient, app: FastAPI
    ) -> None:
        org = await create_org(client, "olivia")
        before = await snapshot(app)
        body = await client.raw(
            SET_MEMBER_ROLE, {"org": org, "subject": "olivia", "role": "GOD"}, as_="olivia"
        )
        assert body["data"] is None
        assert "GOD" in body["errors"][0]["message"]
        assert await snapshot(app) == before


class TestRemoveMember:
    async def test_removes_and_the_member_loses_access(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="mia", role="MEMBER", as_="olivia")
        assert (await client.data(MEMBERS, {"id": org}, as_="mia"))["organization"] is not None

        result = (await client.data(REMOVE_MEMBER, {"org": org, "subject": "mia"}, as_="olivia"))[
            "removeMember"
        ]

        assert result["__typename"] == "MembershipChanged"
        assert await members_of(client, org) == {"olivia": "OWNER"}
        assert (await client.data(MEMBERS, {"id": org}, as_="mia"))["organization"] is None

    async def test_an_owner_may_leave_when_another_owner_stays(self, client: GraphQLClient) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="oscar", role="OWNER", as_="olivia")
        result = await client.data(REMOVE_MEMBER, {"org": org, "subject": "olivia"}, as_="olivia")
        assert result["removeMember"]["__typename"] == "MembershipChanged"
        assert await members_of(client, org, as_="oscar") == {"oscar": "OWNER"}

    async def test_removing_the_last_owner_is_a_conflict(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        await add_member(client, org, subject="ada", role="ADMIN", as_="olivia")
        for caller in ("olivia", "root-admin"):
            result = await refused(
                client,
                app,
                REMOVE_MEMBER,
                {"org": org, "subject": "olivia"},
                as_=caller,
                field="removeMember",
            )
            assert (result["__typename"], result["code"]) == ("Conflict", "LAST_OWNER")
        assert await members_of(client, org) == {"olivia": "OWNER", "ada": "ADMIN"}

    async def test_a_non_member_is_not_found(self, client: GraphQLClient, app: FastAPI) -> None:
        org = await create_org(client, "olivia")
        result = await refused(
            client, app, REMOVE_MEMBER, {"org": org, "subject": "nobody"}, as_="olivia", field="removeMember"
        )
        assert (result["__typename"], result["code"]) == ("NotFound", "NOT_FOUND")
