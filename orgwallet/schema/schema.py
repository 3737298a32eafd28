"""Assembles the schema from the per-domain query and mutation mixins."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types

from orgwallet.config import Settings
from orgwallet.resolvers.organizations import OrganizationMutations, OrganizationQueries
from orgwallet.resolvers.wallets import WalletMutations
from orgwallet.schema.errors import CodedError
from orgwallet.schema.scalars import SCALAR_MAP
from orgwallet.schema.types import ApiKey
from orgwallet.schema.wallets import CreditGrant, LedgerEntry, Reservation, Wallet

Query = merge_types("Query", (OrganizationQueries,))
Mutation = merge_types("Mutation", (OrganizationMutations, WalletMutations))


def should_mask(error: GraphQLError) -> bool:
    """Shows typed errors and the client's own mistakes (syntax, validation); hides the rest."""
    original = error.original_error
    if original is None or isinstance(error, CodedError):
        return False
    return not isinstance(original, CodedError)


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or Settings()
    return strawberry.Schema(
        query=Query,
        mutation=Mutation,
        types=[ApiKey, Wallet, CreditGrant, LedgerEntry, Reservation],
        config=StrawberryConfig(scalar_map=SCALAR_MAP),
        extensions=[
            # Factories: extensions keep per-operation state, so each request gets its own;
            # the parser and validation caches live at module level and are shared.
            lambda: ParserCache(maxsize=1024),
            lambda: ValidationCache(maxsize=1024),
            lambda: QueryDepthLimiter(max_depth=settings.max_query_depth),
            lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
            lambda: MaskErrors(should_mask_error=should_mask, error_message="Unexpected error."),
        ],
    )


def print_schema() -> str:
    return build_schema().as_str() + "\n"
