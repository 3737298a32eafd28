from tests.helpers import GraphQLClient, create_org


async def test_viewer_and_create(client: GraphQLClient) -> None:
    data = await client.data("{ viewer { subject isPlatformAdmin } }", as_="alice")
    assert data["viewer"] == {"subject": "alice", "isPlatformAdmin": False}
    org_id = await create_org(client, "alice")
    data = await client.data(
        "query($id: ID!) { organization(id: $id) { name members { subject role } } }",
        {"id": org_id},
        as_="alice",
    )
    assert data["organization"]["members"] == [{"subject": "alice", "role": "OWNER"}]
