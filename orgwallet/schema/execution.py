"""graphql-core's executor with a short path for plain leaf fields.

A page of 100 ledger entries is some 900 fields, 700 of them plain attributes of a Python
object (``amount``, ``balanceAfter``, ``createdAt``...). For each one, graphql-core builds a
resolve-info object, calls Strawberry's wrapper, which calls ``getattr``, checks twice whether
the result is awaitable, then walks the type (non-null, list, leaf) to serialize it: about
8 microseconds a field, most of the page's CPU. For a field Strawberry itself calls "basic"
(no resolver, no extension, no permission: ``StrawberryField.is_basic_field``) whose type is a
scalar or an enum, that work comes down to ``getattr`` and the type's serializer; this does just
that. The ``id`` of a relay node is the one resolver treated the same way, when the node's class
keeps Strawberry's own ``resolve_id`` and ``resolve_typename``: its value is then, by Strawberry's
definition, ``GlobalID(<GraphQL type name>, str(<NodeID attribute>))`` (100 resolver calls on a
page of entries). Anything else (a resolver, a null where the schema says non-null, a value the
serializer refuses, a middleware) takes graphql-core's own path, which gives the same answer and
the same located error as before.
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
from strawberry import relay
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types.field import StrawberryField

#: (attribute name, leaf type, non-null, is a relay node's id) of a field answered on the short
#: path, None for any other field.
Plan = tuple[str, GraphQLLeafType, bool, bool] | None

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
    if not isinstance(definition, StrawberryField):
        return None
    relay_id = (
        definition.origin is relay.Node and definition.python_name == "_id" and not definition.extensions
    )
    if not relay_id and not (
        definition.is_basic_field
        and definition.default_resolver is getattr
        and getattr(field_def.resolve, "_is_default", False)
    ):
        return None
    non_null = isinstance(field_def.type, GraphQLNonNull)
    leaf = field_def.type.of_type if isinstance(field_def.type, GraphQLNonNull) else field_def.type
    if not is_leaf_type(leaf):
        return None
    return definition.python_name, leaf, non_null, relay_id


def _node_id_attribute(cls: type) -> str | None:
    """The NodeID attribute of a relay node class that resolves its id as Strawberry does."""
    if cls not in _NODE_ID_ATTRIBUTES:
        plain = (
            issubclass(cls, relay.Node)
            and cls.resolve_id.__func__ is relay.Node.resolve_id.__func__  # type: ignore[attr-defined]
            and cls.resolve_typename.__func__ is relay.Node.resolve_typename.__func__  # type: ignore[attr-defined]
        )
        _NODE_ID_ATTRIBUTES[cls] = cls.resolve_id_attr() if plain else None  # type: ignore[attr-defined]
    return _NODE_ID_ATTRIBUTES[cls]


_NODE_ID_ATTRIBUTES: dict[type, str | None] = {}


def _global_id(parent_type: GraphQLObjectType, node_id: object) -> relay.GlobalID:
    return relay.GlobalID(type_name=parent_type.name, node_id=str(node_id))


class ExecutionContext(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's execution context, with plain leaf fields read and serialized directly."""

    def build_per_event_executor(self, payload: Any) -> Any:
        """A subscription's executor for one event, with a memo of collected subfields of its
        own. graphql-core copies the subscription's executor shallowly for each event, so every
        event shared the memo, keyed by the identity of that event's own field lists: each event
        added an entry that lived as long as the subscription (a live subscription's memory,
        and the garbage collector's pauses, grew with every event)."""
        executor = super().build_per_event_executor(payload)
        executor._relevant_sub_fields = {}
        return executor

    def execute_field(
        self,
        parent_type: GraphQLObjectType,
        source: Any,
        field_details_list: Any,
        path: Any,
        position_context: Any,
    ) -> Any:
        plan = _plan(self.schema, parent_type, field_details_list[0].node)
        # Strawberry passes a middleware manager on every request, empty unless an extension
        # wraps resolvers; a middleware must see every field, so then nothing is short.
        if plan is not None and not (self.middleware_manager and self.middleware_manager.middlewares):
            name, leaf, non_null, relay_id = plan
            if relay_id:
                attribute = _node_id_attribute(type(source))
                node_id = _MISSING if attribute is None else getattr(source, attribute, _MISSING)
                value = (
                    _MISSING if node_id is None or node_id is _MISSING else _global_id(parent_type, node_id)
                )
            else:
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
