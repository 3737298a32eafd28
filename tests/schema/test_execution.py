"""The short path for plain leaf fields answers exactly what graphql-core's own path answers:
the same data, and the same errors at the same paths (null in a non-null field, a value the
serializer refuses), whatever mix of plain fields, resolvers, enums and scalars."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar, NewType, Self

import pytest
import strawberry
from graphql import ExecutionResult, FieldNode, GraphQLObjectType, NameNode
from strawberry import relay
from strawberry.schema.config import StrawberryConfig

from orgwallet.schema.execution import ExecutionContext, _plan
from orgwallet.schema.scalars import SCALAR_MAP, BigInt

Picky = NewType("Picky", int)


def serialize_picky(value: int) -> int:
    if value >= 100:
        raise ValueError(f"{value} is too big")
    return value


SCALARS = {**SCALAR_MAP, Picky: strawberry.scalar(name="Picky", serialize=serialize_picky, parse_value=int)}


@strawberry.enum
class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@strawberry.type
class Item:
    name: str
    note: str | None
    color: Color
    count: BigInt
    picky: Picky
    maybe_picky: Picky | None
    at: datetime
    required_but_missing: str

    @strawberry.field
    def shout(self, suffix: str = "!") -> str:
        return self.name.upper() + suffix


def item(n: int) -> Item:
    return Item(
        name=f"item {n}",
        note=None if n % 2 else f"note {n}",
        color=Color.RED if n % 3 else Color.BLUE,
        count=BigInt(2**62 + n),
        picky=Picky(n * 30),  # 0, 30, 60 serialize; 90 too; 120 is refused
        maybe_picky=Picky(n * 40) if n % 2 else None,  # 40 ok, 120 refused
        at=datetime(2026, 1, 1, n, tzinfo=UTC),
        required_but_missing=None if n == 3 else "here",  # type: ignore[arg-type]
    )


@strawberry.type
class Thing(relay.Node):
    id: relay.NodeID[str]
    label: str


@strawberry.type
class Custom(relay.Node):
    """Resolves its own id: it must keep going through Strawberry's resolver."""

    code: relay.NodeID[str]

    @classmethod
    def resolve_id(cls, root: Self, *, info: strawberry.Info) -> str:
        return root.code.upper()


@strawberry.type
class Query:
    @strawberry.field
    def things(self) -> list[Thing]:
        return [Thing(id=f"t{n}", label=f"thing {n}") for n in range(3)]

    @strawberry.field
    def customs(self) -> list[Custom]:
        return [Custom(code=f"c{n}") for n in range(3)]

    @strawberry.field
    def items(self) -> list[Item]:
        return [item(n) for n in range(5)]

    @strawberry.field
    def first(self) -> Item:
        return item(0)


def schema(fast: bool) -> strawberry.Schema:
    return strawberry.Schema(
        query=Query,
        config=StrawberryConfig(scalar_map=SCALARS),
        execution_context_class=ExecutionContext if fast else None,
    )


QUERIES = [
    '{ first { name note color count at shout(suffix: "?") } }',
    "{ items { name note color count at shout } }",
    "{ items { name picky } }",  # 120 refused: an error at items.4.picky
    "{ items { maybePicky note } }",
    "{ items { name requiredButMissing } }",  # null in a non-null field at items.3
    "{ items { n: name name __typename c: color } }",
    "query($skip: Boolean!) { items { name note @skip(if: $skip) count @include(if: $skip) } }",
    "{ things { id label } customs { id } }",
    "{ things { ... on Node { id } } }",
]


def outcome(result: ExecutionResult) -> tuple[Any, list[tuple[str, list[Any] | None]]]:
    return result.data, [(e.message, e.path) for e in result.errors or []]


@pytest.mark.parametrize("query", QUERIES)
async def test_the_short_path_answers_what_graphql_core_answers(query: str) -> None:
    variables = {"skip": True}
    fast = await schema(True).execute(query, variable_values=variables)
    slow = await schema(False).execute(query, variable_values=variables)
    assert outcome(fast) == outcome(slow)
    assert fast.data is not None or fast.errors


def test_plain_leaves_take_the_short_path_and_nothing_else_does() -> None:
    graphql_schema = schema(True)._schema
    item_type = graphql_schema.get_type("Item")
    query_type = graphql_schema.query_type
    assert isinstance(item_type, GraphQLObjectType) and query_type is not None

    def planned(parent: GraphQLObjectType, name: str, arguments: bool = False) -> bool:
        node = FieldNode(name=NameNode(value=name), arguments=(object(),) if arguments else ())
        return _plan(graphql_schema, parent, node) is not None

    plain = ["name", "note", "color", "count", "picky", "maybePicky", "at", "requiredButMissing"]
    assert all(planned(item_type, name) for name in plain)
    assert not planned(item_type, "shout")  # a resolver
    assert not planned(item_type, "name", arguments=True)
    assert not planned(item_type, "__typename")
    assert not planned(query_type, "items")  # a resolver, and a list of objects


class CountingContext(ExecutionContext):
    """Counts the fields that went down graphql-core's path (each builds a resolve info)."""

    built: ClassVar[list[str]] = []

    def build_resolve_info(self, field_def: Any, field_nodes: Any, *args: Any) -> Any:
        self.built.append(field_nodes[0].name.value)
        return super().build_resolve_info(field_def, field_nodes, *args)


async def test_plain_leaves_are_answered_without_graphql_cores_path() -> None:
    counting = strawberry.Schema(
        query=Query, config=StrawberryConfig(scalar_map=SCALARS), execution_context_class=CountingContext
    )
    CountingContext.built.clear()
    result = await counting.execute("{ items { name note color count at shout } }")
    assert not result.errors and result.data is not None and len(result.data["items"]) == 5
    assert CountingContext.built == ["items"] + ["shout"] * 5  # the resolvers only
    CountingContext.built.clear()
    result = await counting.execute("{ things { id label } customs { id } }")
    assert not result.errors and result.data is not None
    assert result.data["things"][0]["id"] == relay.to_base64("Thing", "t0")
    assert result.data["customs"][0]["id"] == relay.to_base64("Custom", "C0")
    assert CountingContext.built == ["things", "customs"] + ["id"] * 3  # a node's own resolve_id


async def test_errors_are_where_the_schema_says() -> None:
    result = await schema(True).execute("{ items { name picky } }")
    assert [e.path for e in result.errors or []] == [["items", 4, "picky"]]
    assert "120 is too big" in (result.errors or [])[0].message
    missing = await schema(True).execute("{ items { requiredButMissing } }")
    assert missing.data is None
    assert [e.path for e in missing.errors or []] == [["items", 3, "requiredButMissing"]]
