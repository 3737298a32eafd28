"""Another organization's objects look exactly like missing ones, everywhere: every mutation
and query that takes an object's id answers a foreign id word for word as it answers a random
id of the same type, so that no answer tells whether an id exists elsewhere."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from strawberry.relay import GlobalID

from orgwallet.services import notifications
from orgwallet.services.notifications import NotificationKind
from tests.helpers import GraphQLClient, add_member, create_api_key, create_org
from tests.purchasing import Shop
from tests.purchasing import shop as shop  # the fixture

CONSUME = """
mutation($org: ID!) {
  consumeTokens(input: {organizationId: $org, amount: 1, idempotencyKey: "spend-1"}) {
    ... on TokensConsumed { entry { id } }
  }
}
"""
RESERVE = """
mutation($org: ID!) {
  reserveTokens(input: {organizationId: $org, amount: 1, idempotencyKey: "hold-1"}) {
    ... on TokensReserved { reservation { id } }
  }
}
"""
ADD_ALERT = """
mutation($org: ID!) { addBalanceAlert(input: {organizationId: $org, threshold: 2}) { alert { id } } }
"""
CAPTURE = """
mutation($id: ID!) {
  captureReservation(input: {reservationId: $id}) { __typename ... on UserError { code message } }
}
"""
RELEASE = """
mutation($id: ID!) {
  releaseReservation(input: {reservationId: $id}) { __typename ... on UserError { code message } }
}
"""
REFUND = """
mutation($id: ID!) {
  refundConsumption(input: {entryId: $id}) { __typename ... on UserError { code message } }
}
"""
REVOKE = """
mutation($id: ID!) {
  revokeApiKey(input: {apiKeyId: $id}) { __typename ... on UserError { code message } }
}
"""
REMOVE_ALERT = "mutation($id: ID!) { removeBalanceAlert(input: {alertId: $id}) { alertId } }"
MARK_READ = """
mutation($org: ID!, $id: ID!) {
  markNotificationsRead(input: {organizationId: $org, notificationIds: [$id]}) { count unreadCount }
}
"""
NODE = "query($id: ID!) { node(id: $id) { __typename id } }"
PURCHASE = "query($id: ID!) { purchase(id: $id) { id status } }"
PACKAGE = "query($id: ID!) { node(id: $id) { ... on TokenPackage { id code active } } }"
ARCHIVE_PACKAGE = """
mutation($id: ID!) { archiveTokenPackage(input: {packageId: $id}) { __typename ... on UserError { code } } }
"""


def _random_like(global_id: str) -> str:
    """A well-formed id of the same type that names nothing."""
    return str(GlobalID(GlobalID.from_id(global_id).type_name, str(uuid.uuid4())))


def _answer(body: dict[str, Any], *ids: str) -> str:
    """The response with the ids it was asked about blanked out (and the databases' uuids)."""
    text = json.dumps(body, sort_keys=True)
    for value in ids:
        text = text.replace(value, "<id>").replace(GlobalID.from_id(value).node_id, "<id>")
    return text


async def _foreign_objects(client: GraphQLClient, shop: Shop) -> dict[str, str]:
    """Objects of the shop's organization, by kind, made as its owner would."""
    org, owner = shop.org, shop.owner
    entry = (await client.data(CONSUME, {"org": org}, as_=owner))["consumeTokens"]["entry"]["id"]
    reservation = (await client.data(RESERVE, {"org": org}, as_=owner))["reserveTokens"]["reservation"]["id"]
    alert = (await client.data(ADD_ALERT, {"org": org}, as_=owner))["addBalanceAlert"]["alert"]["id"]
    key, _ = await create_api_key(client, org, scopes=["tokens.view"], as_=owner)
    purchase, _ = await shop.checkout(tokens=10)
    async with shop.app.state.runtime.sessions() as session, session.begin():
        note = await notifications.notify(
            session,
            shop.org_id,
            NotificationKind.LOW_BALANCE,
            key="isolation-test",
            title="Low",
            body="Low balance",
        )
    assert note is not None
    wallet = (
        await client.data(
            "query($id: ID!) { organization(id: $id) { wallet { id } } }", {"id": org}, as_=owner
        )
    )["organization"]["wallet"]["id"]
    return {
        "entry": entry,
        "reservation": reservation,
        "alert": alert,
        "key": key,
        "purchase": purchase["id"],
        "notification": str(GlobalID("Notification", str(note))),
        "wallet": wallet,
        "organization": org,
    }


@pytest.fixture
async def outsider(client: GraphQLClient) -> dict[str, str]:
    """Credentials of an owner of another organization: a signed-in user and an API key with
    every scope a key can have."""
    org = await create_org(client, "mallory", name="Elsewhere")
    await add_member(client, org, subject="mallory-admin", role="ADMIN", as_="mallory")
    _, secret = await create_api_key(
        client,
        org,
        scopes=["tokens.view", "tokens.consume", "tokens.configure", "tokens.purchase"],
        as_="mallory",
    )
    return {"org": org, "bearer": client.token("mallory"), "key": secret}


@pytest.mark.parametrize("credential", ["bearer", "key"])
async def test_foreign_ids_are_answered_as_missing_ones(
    client: GraphQLClient, shop: Shop, outsider: dict[str, str], credential: str
) -> None:
    objects = await _foreign_objects(client, shop)
    bearer = outsider[credential]
    probes: list[tuple[str, str, dict[str, Any]]] = [
        (REVOKE, objects["key"], {}),
        (CAPTURE, objects["reservation"], {}),
        (RELEASE, objects["reservation"], {}),
        (REFUND, objects["entry"], {}),
        (REMOVE_ALERT, objects["alert"], {}),
        (MARK_READ, objects["notification"], {"org": outsider["org"]}),
        (PURCHASE, objects["purchase"], {}),
        *[(NODE, value, {}) for value in objects.values()],
    ]
    for query, foreign, extra in probes:
        random = _random_like(foreign)
        seen = await client.raw(query, {"id": foreign, **extra}, bearer=bearer)
        missing = await client.raw(query, {"id": random, **extra}, bearer=bearer)
        assert _answer(seen, foreign) == _answer(missing, random), (query, seen, missing)
        if query is REVOKE and credential == "bearer":
            assert "API key not found" in json.dumps(seen), seen

    # Nothing was changed by any of it.
    key_state = await shop.sql(
        "SELECT revoked_at FROM api_keys WHERE organization_id = :org", org=shop.org_id
    )
    assert [row.revoked_at for row in key_state] == [None]
    open_holds = await shop.sql("SELECT status FROM reservations")
    assert [row.status for row in open_holds] == ["open"]


async def test_an_archived_package_is_visible_to_staff_only(client: GraphQLClient, shop: Shop) -> None:
    package = await shop.package_id("tokens-10")
    archived = await client.data(ARCHIVE_PACKAGE, {"id": package}, as_="root-admin")
    assert archived["archiveTokenPackage"]["__typename"] == "TokenPackageSaved"
    staff = await client.data(PACKAGE, {"id": package}, as_="root-admin")
    assert staff["node"] == {"id": package, "code": "tokens-10", "active": False}
    for who in ({"as_": shop.owner}, {}):
        body = await client.raw(PACKAGE, {"id": package}, **who)
        assert body["data"] == {"node": None}, body
    # A package on sale is there for members, as in `packages`, not for anonymous callers.
    on_sale = await shop.package_id("tokens-50")
    assert (await client.data(PACKAGE, {"id": on_sale}, as_=shop.owner))["node"]["code"] == "tokens-50"
    assert (await client.raw(PACKAGE, {"id": on_sale}))["data"] == {"node": None}
