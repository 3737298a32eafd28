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


async def test_wallet_consume(client: GraphQLClient) -> None:
    org_id = await create_org(client, "bob")
    q = """
    mutation($org: ID!, $amount: BigInt!, $key: String!) {
      consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key, reason: "gen"}) {
        __typename
        ... on TokensConsumed { entry { id kind amount balanceAfter } wallet { balance reserved } }
        ... on UserError { code message }
      }
    }"""
    data = await client.data(q, {"org": org_id, "amount": 2, "key": "k1"}, as_="bob")
    assert data["consumeTokens"]["wallet"] == {"balance": 1, "reserved": 0}, data
    data = await client.data(q, {"org": org_id, "amount": 2, "key": "k2"}, as_="bob")
    assert data["consumeTokens"]["code"] == "INSUFFICIENT_TOKENS", data
    data = await client.data(
        """query($id: ID!) { organization(id: $id) { wallet { organization { id } balance lifetimeGranted
          lifetimeConsumed
          grants { source amount remaining } expiringSoon(days: 31)
          ledger(first: 10) { edges { cursor node { kind amount balanceAfter } }
          pageInfo { hasNextPage } } } } }""",
        {"id": org_id},
        as_="bob",
    )
    print(data)
    wallet = data["organization"]["wallet"]
    assert wallet["balance"] == 1 and wallet["expiringSoon"] == 1
    assert wallet["organization"]["id"] == org_id
    assert [e["node"]["kind"] for e in wallet["ledger"]["edges"]] == ["CONSUMPTION", "TRIAL_GRANT"]
