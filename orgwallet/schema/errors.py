"""Typed errors: the ``UserError`` members of result unions, and GraphQL errors with codes."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError

from orgwallet import errors
from orgwallet.schema.scalars import BigInt


@strawberry.interface
class UserError:
    message: str
    code: str


@strawberry.type
class InvalidInput(UserError):
    field: str | None = None


@strawberry.type
class NotFound(UserError):
    pass


@strawberry.type
class Conflict(UserError):
    """The request clashes with existing state: a taken slug, the last owner, a duplicate member."""


@strawberry.type
class InsufficientTokens(UserError):
    requested: BigInt
    available: BigInt


@strawberry.type
class WalletSuspended(UserError):
    pass


@strawberry.type
class IdempotencyConflict(UserError):
    pass


@strawberry.type
class ReservationNotOpen(UserError):
    status: str = strawberry.field(description="open, captured, released or expired")


@strawberry.type
class NotRefundable(UserError):
    pass


class CodedError(GraphQLError):
    """A GraphQL error that clients may see (it passes the masking extension)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, extensions={"code": code})


def graphql_error(error: errors.OrgWalletError) -> CodedError:
    code = {
        errors.Unauthenticated: "UNAUTHENTICATED",
        errors.Forbidden: "FORBIDDEN",
        errors.NotFound: "NOT_FOUND",
    }.get(type(error), "BAD_USER_INPUT")
    coded = CodedError(error.message, code if error.code != "PAYMENT_METHOD_REQUIRED" else error.code)
    if isinstance(error, errors.InvalidInput) and error.field and coded.extensions is not None:
        coded.extensions["field"] = error.field  # which input was bad, as InvalidInput says it
    return coded


def user_error(error: errors.OrgWalletError) -> Any:
    """The union member for an expected business outcome, or a raised GraphQL error for
    authentication and authorization failures (those are not results)."""
    if isinstance(error, errors.Unauthenticated | errors.Forbidden):
        raise graphql_error(error) from error
    if isinstance(error, errors.NotFound):
        return NotFound(message=error.message, code=error.code)
    if isinstance(error, errors.InvalidInput):
        return InvalidInput(message=error.message, code=error.code, field=error.field)
    if isinstance(error, errors.Conflict):
        return Conflict(message=error.message, code=error.code)
    if isinstance(error, errors.InsufficientTokens):
        return InsufficientTokens(
            message=error.message,
            code=error.code,
            requested=BigInt(error.requested),
            available=BigInt(error.available),
        )
    if isinstance(error, errors.WalletSuspended):
        return WalletSuspended(message=error.message, code=error.code)
    if isinstance(error, errors.IdempotencyConflict):
        return IdempotencyConflict(message=error.message, code=error.code)
    if isinstance(error, errors.ReservationNotOpen):
        return ReservationNotOpen(message=error.message, code=error.code, status=error.status.upper())
    if isinstance(error, errors.NotRefundable):
        return NotRefundable(message=error.message, code=error.code)
    raise error
