"""What one request to /graphql may cost, checked before the work: the size of its body, the
price of its query (list sizes multiply), anonymous introspection, and which operation runs.
Also the cache of parsed and validated documents, bounded in total document length and kept
for the documents of signed-in callers.

The price of a query: every field selected costs 1 (``__typename`` nothing), plus the price of
its own selection, times the size of the list it returns. A connection's page size is its
``first`` or ``last`` argument (a variable's value counts; absent or null, the field's default
page size): it multiplies the selection of the connection's lists (``edges``). Any other list
of objects counts as ``UNPAGED_LIST_SIZE`` items. An introspection field (``__schema``,
``__type``) costs ``INTROSPECTION_COST`` whatever it selects: a tool's introspection query
passes, a hundred aliases of it do not."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionNode,
    VariableNode,
    get_named_type,
    get_nullable_type,
    is_list_type,
)
from starlette.datastructures import Headers
from starlette.types import Message, Receive
from strawberry.extensions import SchemaExtension
from strawberry.types.execution import ExecutionResult

from orgwallet.auth.principals import Anonymous
from orgwallet.schema.errors import CodedError

UNPAGED_LIST_SIZE = 20
INTROSPECTION_COST = 2000
DEFAULT_PAGE_SIZE = 50  # what the resolvers take when a connection's argument has no default

# The document cache: documents up to MAX_CACHED_DOCUMENT characters, MAX_CACHED_CHARACTERS of
# them in all (a parsed document takes some 50 to 90 bytes per character of its text).
MAX_CACHED_DOCUMENT = 16_000
MAX_CACHED_CHARACTERS = 250_000
MAX_CACHED_DOCUMENTS = 1024

_INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})


# ---------------------------------------------------------------- the request body


class BodyTooLarge(Exception):
    """The request body passed the limit while it was being read."""


def declared_length(headers: Headers) -> int | None:
    """The Content-Length a request declares (None: none, or not a number)."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def bounded(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises ``BodyTooLarge`` as soon as more than ``limit`` bytes of body
    have arrived: a chunked body without a Content-Length is never held beyond the limit."""
    received = 0

    async def receive_bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
        return message

    return receive_bounded


# ---------------------------------------------------------------- the document cache


@dataclass(slots=True)
class CachedDocument:
    document: DocumentNode
    errors: list[GraphQLError] | None = None  # the validation's verdict, once validated
    # The verdict of ``QueryLimits`` by operation name, when no variable went into it.
    verdicts: dict[str | None, GraphQLError | None] = field(default_factory=dict)


class DocumentCache:
    """Parsed documents and their validation errors by query text, the least recently used
    leaving first, bounded in entries and in total text length. One per schema: the
    validation rules (and the parser's token limit) are the schema's own and never change, so
    the text alone is the key. A hit is a dict lookup and a move to the end."""

    def __init__(
        self,
        *,
        max_entries: int = MAX_CACHED_DOCUMENTS,
        max_characters: int = MAX_CACHED_CHARACTERS,
        max_document: int = MAX_CACHED_DOCUMENT,
    ) -> None:
        self.max_entries = max_entries
        self.max_characters = max_characters
        self.max_document = max_document
        self.characters = 0  # the total length of the texts held
        self._entries: OrderedDict[str, CachedDocument] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: str) -> CachedDocument | None:
        entry = self._entries.get(query)
        if entry is not None:
            self._entries.move_to_end(query)
        return entry

    def peek(self, query: str) -> CachedDocument | None:
        """The entry, without making it recently used."""
        return self._entries.get(query)

    def put(self, query: str, document: DocumentNode) -> CachedDocument | None:
        """Keeps ``document`` unless its text is longer than a document the cache takes."""
        if len(query) > self.max_document:
            return None
        entry = self._entries.get(query)
        if entry is not None:
            return entry
        entry = self._entries[query] = CachedDocument(document)
        self.characters += len(query)
        while self.characters > self.max_characters or len(self._entries) > self.max_entries:
            oldest, _ = self._entries.popitem(last=False)
            self.characters -= len(oldest)
        return entry


def _signed_in(context: Any) -> bool:
    principal = getattr(context, "principal", None)
    return principal is not None and not isinstance(principal, Anonymous)


class CachedDocuments(SchemaExtension):
    """Strawberry's ``ParserCache`` and ``ValidationCache`` in one, over a ``DocumentCache``:
    only a signed-in caller's documents enter it (anyone can send distinct texts; a document
    of an anonymous caller is parsed and validated each time, and is gone after)."""

    def __init__(self, cache: DocumentCache) -> None:
        self.cache = cache
        self.entry: CachedDocument | None = None

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        query = context.query
        self.entry = self.cache.get(query) if query is not None else None
        if self.entry is not None:
            context.graphql_document = self.entry.document
        yield
        document = context.graphql_document
        if self.entry is None and query is not None and document is not None and _signed_in(context.context):
            self.entry = self.cache.put(query, document)

    def on_validate(self) -> Iterator[None]:
        entry = self.entry
        if entry is not None and entry.errors is not None:
            self.execution_context.pre_execution_errors = entry.errors
        yield
        if entry is not None and entry.errors is None:
            entry.errors = self.execution_context.pre_execution_errors or []


# ---------------------------------------------------------------- the operation's limits


class QueryLimits(SchemaExtension):
    """After validation, before execution: the operation to run must be named when the
    document holds several (graphql-core would run the first), an anonymous caller may ask for
    one introspection field (GraphiQL's schema query), and the query's price must be within
    ``max_cost``. A refused operation never reaches the executor. The verdict of a cached
    document is kept with it when no variable went into it (the hot path prices nothing)."""

    def __init__(self, *, max_cost: int, cache: DocumentCache) -> None:
        self.max_cost = max_cost
        self.cache = cache

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None and context.result is None:
            error = self._verdict(document)
            if error is not None:
                context.result = ExecutionResult(data=None, errors=[error])
        yield

    def _verdict(self, document: DocumentNode) -> GraphQLError | None:
        context = self.execution_context
        # The name the request gave (``operation_name`` falls back to the first operation's).
        name: str | None = context._provided_operation_name
        anonymous = not _signed_in(context.context)
        entry = self.cache.peek(context.query) if context.query is not None and not anonymous else None
        if entry is not None and entry.document is not document:
            entry = None  # another request cached the same text after this one parsed it
        if entry is not None and name in entry.verdicts:
            return entry.verdicts[name]
        verdict: GraphQLError | None
        try:
            operation = _operation(document, name)
        except GraphQLError as refused:
            verdict, used_variables = refused, False
        else:  # None: an unknown name, which graphql-core refuses
            verdict, used_variables = (
                self._judge(document, operation, anonymous) if operation else (None, False)
            )
        if entry is not None and not used_variables:
            entry.verdicts[name] = verdict
        return verdict

    def _judge(
        self, document: DocumentNode, operation: OperationDefinitionNode, anonymous: bool
    ) -> tuple[GraphQLError | None, bool]:
        """The refusal of ``operation`` (None: it may run), and whether a variable went into it."""
        schema = self.execution_context.schema._schema
        price = _Pricing(schema, document, operation, self.execution_context.variables or {})
        try:
            cost = price.selection(
                schema.get_root_type(operation.operation), operation.selection_set.selections
            )
        except RecursionError:  # fragments nested past what validation lets through
            cost = self.max_cost + 1
        if anonymous and _introspection_fields(document, operation) > 1:
            message = (
                "sign in to introspect the schema: an anonymous request may ask for one "
                "introspection field (__schema or __type)"
            )
            return CodedError(message, "UNAUTHENTICATED"), price.used_variables
        if cost > self.max_cost:
            message = (
                f"the query costs {cost}, more than the limit of {self.max_cost}: each field "
                "counts, times the size of the lists it is in (first/last of a connection)"
            )
            error = CodedError(message, "QUERY_TOO_COSTLY")
            assert error.extensions is not None
            error.extensions.update(cost=cost, limit=self.max_cost)
            return error, price.used_variables
        return None, price.used_variables


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        if len(operations) > 1:
            raise CodedError(
                "Must provide operation name if query contains multiple operations.", "BAD_REQUEST"
            )
        return operations[0] if operations else None
    return next((o for o in operations if o.name is not None and o.name.value == name), None)


def _fragments(document: DocumentNode) -> dict[str, FragmentDefinitionNode]:
    return {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}


def _introspection_fields(document: DocumentNode, operation: OperationDefinitionNode) -> int:
    """How many distinct response keys of the operation's root select ``__schema`` or
    ``__type`` (fields of one key are merged and run once; aliases are not)."""
    fragments = _fragments(document)
    keys: set[str] = set()
    seen: set[str] = set()
    pending: list[SelectionNode] = list(operation.selection_set.selections)
    while pending:
        node = pending.pop()
        if isinstance(node, FieldNode):
            if node.name.value in _INTROSPECTION_FIELDS:
                keys.add(node.alias.value if node.alias else node.name.value)
        elif isinstance(node, InlineFragmentNode):
            pending.extend(node.selection_set.selections)
        elif isinstance(node, FragmentSpreadNode) and node.name.value not in seen:
            seen.add(node.name.value)
            fragment = fragments.get(node.name.value)
            if fragment is not None:
                pending.extend(fragment.selection_set.selections)
    return len(keys)


class _Pricing:
    """The price of one operation (see the module's docstring). A fragment is priced once per
    page size it is spread under, so a document cannot make the pricing itself slow."""

    def __init__(
        self,
        schema: GraphQLSchema,
        document: DocumentNode,
        operation: OperationDefinitionNode,
        variables: Mapping[str, Any],
    ) -> None:
        self.schema = schema
        self.fragments = _fragments(document)
        self.variables = variables
        self.defaults = {
            v.variable.name.value: int(v.default_value.value)
            for v in operation.variable_definitions or ()
            if isinstance(v.default_value, IntValueNode)
        }
        self.used_variables = False
        self._priced: dict[tuple[str, int | None], int] = {}

    def selection(
        self, parent: GraphQLNamedType | None, selections: Sequence[SelectionNode], page: int | None = None
    ) -> int:
        """The price of ``selections`` on ``parent``; ``page``: the page size of the
        connection they are selected on, which multiplies its lists."""
        total = 0
        for node in selections:
            if isinstance(node, FieldNode):
                total += self.field(parent, node, page)
            elif isinstance(node, InlineFragmentNode):
                condition = node.type_condition
                on = self.schema.get_type(condition.name.value) if condition else parent
                total += self.selection(on, node.selection_set.selections, page)
            elif isinstance(node, FragmentSpreadNode):
                total += self.fragment(node.name.value, page)
        return total

    def fragment(self, name: str, page: int | None) -> int:
        key = (name, page)
        if key not in self._priced:
            definition = self.fragments.get(name)
            self._priced[key] = (
                0
                if definition is None
                else self.selection(
                    self.schema.get_type(definition.type_condition.name.value),
                    definition.selection_set.selections,
                    page,
                )
            )
        return self._priced[key]

    def field(self, parent: GraphQLNamedType | None, node: FieldNode, page: int | None) -> int:
        name = node.name.value
        if name == "__typename":
            return 0
        if name in _INTROSPECTION_FIELDS:
            return INTROSPECTION_COST
        definition = (
            parent.fields.get(name) if isinstance(parent, GraphQLObjectType | GraphQLInterfaceType) else None
        )
        if definition is None or node.selection_set is None:
            return 1  # a leaf, or a list of leaves
        times = 1
        if is_list_type(get_nullable_type(definition.type)):
            times = UNPAGED_LIST_SIZE if page is None else page
        inner = self.selection(
            get_named_type(definition.type),
            node.selection_set.selections,
            self.page_size(definition.args, node),
        )
        return 1 + times * inner

    def page_size(self, arguments: Mapping[str, Any], node: FieldNode) -> int | None:
        """A connection's page size: its ``first`` or ``last``, as given, or its default."""
        for name in ("first", "last"):
            if name not in arguments:
                continue
            given = next((a.value for a in node.arguments or () if a.name.value == name), None)
            value: object = None
            if isinstance(given, IntValueNode):
                value = int(given.value)
            elif isinstance(given, VariableNode):
                self.used_variables = True
                variable = given.name.value
                value = self.variables.get(variable, self.defaults.get(variable))
            if not _whole(value):
                default = arguments[name].default_value
                value = default if _whole(default) else DEFAULT_PAGE_SIZE
            return max(0, value)
        return None


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
