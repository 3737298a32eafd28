"""graphql-core's executor with a short path for plain leaf fields.

A page of 100 ledger entries is some 900 fields, 700 of them plain attributes of a Python
object (``amount``, ``balanceAfter``, ``createdAt``...). For each one, graphql-core builds a
resolve-info object, calls Strawberry's wrapper, which calls ``getattr``, checks twice whether
the result is awaitable, then walks the type (non-null, list, leaf) to serialize it: about
8 microseconds a field, most of the page's CPU. For a field Strawberry itself calls "basic"
(no resolver, no extension, no permission: ``StrawberryField.is_basic_field``) whose type is a
scalar or an enum, that work comes down to ``getattr`` and the type's serializer; this does just
that. Anything else (a resolver, a null where the schema says non-null, a value the serializer
refuses, a middleware) takes graphql-core's own path, which gives the same answer and the same
located error as before.
"""

from __future__ import annotations

from typing import Any

from graphql import (
    FieldNode,
    GraphQLLeafType,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    Undefined,
    is_leaf_type,
)
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types.field import StrawberryField

#: (attribute name, leaf type, non-null) of a plain leaf field, None for any other field.
Plan = tuple[str, GraphQLLeafType, bool] | None

_PLANS = "_orgwallet_field_plans"
_MISSING = object()


def _plan(schema: GraphQLSchema, parent_type: GraphQLObjectType, node: FieldNode) -> Plan:
    plans: dict[tuple[str, str], Plan] | None = getattr(schema, _PLANS, None)
    if plans is None:
        plans = {}
        setattr(schema, _PLANS, plans)
    key = (parent_type.name, node.name.value)
    if key not in plans:
        plans[key] = _plan_of(schema, parent_type, node.name.value)
    return None if node.arguments else plans[key]


def _plan_of(schema: GraphQLSchema, parent_type: GraphQLObjectType, name: str) -> Plan:
    field_def = schema.get_field(parent_type, name)
    if field_def is None or field_def.args:
        return None
    definition = (field_def.extensions or {}).get("strawberry-definition")
    if not isinstance(definition, StrawberryField) or not definition.is_basic_field:
        return None
    if definition.default_resolver is not getattr or not getattr(field_def.resolve, "_is_default", False):
        return None
    field_type = field_def.type
    non_null = isinstance(field_type, GraphQLNonNull)
    leaf = field_type.of_type if isinstance(field_type, GraphQLNonNull) else field_type
    if not is_leaf_type(leaf):
        return None
    return definition.python_name, leaf, non_null


class ExecutionContext(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's execution context, with plain leaf fields read and serialized directly."""

    def execute_field(
        self,
        parent_type: GraphQLObjectType,
        source: Any,
        field_details_list: Any,
        path: Any,
        position_context: Any,
    ) -> Any:
        plan = _plan(self.schema, parent_type, field_details_list[0].node)
        if plan is not None and self.middleware_manager is None:
            name, leaf, non_null = plan
            value = getattr(source, name, _MISSING)
            if value is None and not non_null:
                return None
            if value is not None and value is not _MISSING:
                try:
                    coerced = leaf.coerce_output_value(value)
                except Exception:  # graphql-core's path below reports it
                    coerced = None
                if coerced is not None and coerced is not Undefined:
                    return coerced
        return super().execute_field(parent_type, source, field_details_list, path, position_context)
