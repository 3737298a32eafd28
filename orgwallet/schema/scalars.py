"""Custom scalars. ``BigInt`` is a whole number of tokens, a JSON number exact up to 2**53-1.

Parsing passes the raw value through unchanged: the service decides, so a string,
a fraction or an out-of-range number becomes a typed ``InvalidInput`` result that
names the field, rather than a bare GraphQL validation error."""

from __future__ import annotations

from typing import Any, NewType

import strawberry
from graphql import BooleanValueNode, FloatValueNode, IntValueNode, StringValueNode, ValueNode

BigInt = NewType("BigInt", int)

MAX_SAFE_INTEGER = 2**53 - 1


def _parse_literal(node: ValueNode, _variables: Any = None) -> Any:
    if isinstance(node, IntValueNode):
        return int(node.value)
    if isinstance(node, FloatValueNode):
        return float(node.value)
    if isinstance(node, StringValueNode | BooleanValueNode):
        return node.value
    return None


BIG_INT = strawberry.scalar(
    name="BigInt",
    description="A whole number of tokens, serialized as a JSON number (exact up to 2^53-1).",
    serialize=int,
    parse_value=lambda value: value,
    parse_literal=_parse_literal,
)

SCALAR_MAP: dict[object, Any] = {BigInt: BIG_INT}
