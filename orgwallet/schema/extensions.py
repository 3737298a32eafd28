"""Schema extensions of our own."""

from __future__ import annotations

from collections.abc import Iterator

from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import GraphQLError
from strawberry.extensions import SchemaExtension
from strawberry.types.execution import ExecutionResult

from orgwallet import errors
from orgwallet.schema.errors import graphql_error


def _coded(error: GraphQLError) -> GraphQLError:
    original = error.original_error
    if not isinstance(original, errors.OrgWalletError):
        return error
    return GraphQLError(
        original.message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions=graphql_error(original).extensions,
    )


class DomainErrorCodes(SchemaExtension):
    """A domain error raised by a field resolver, e.g. a permission checked on a nested field
    (``Organization.apiKeys``), reaches the client as a coded error (``FORBIDDEN``,
    ``NOT_FOUND``...), exactly as when a mutation raises it, instead of being masked as an
    unexpected one. List it after ``MaskErrors``: it must see the errors first."""

    def on_operation(self) -> Iterator[None]:
        yield
        result = self.execution_context.result
        if isinstance(result, GraphQLExecutionResult | ExecutionResult) and result.errors:
            result.errors = [_coded(error) for error in result.errors]
