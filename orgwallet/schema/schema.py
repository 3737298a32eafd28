"""Assembles the schema from the per-domain query and mutation mixins."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types

from orgwallet.config import Settings
from orgwallet.resolvers.autotopup import AutoTopUpMutations
from orgwallet.resolvers.notifications import NotificationMutations
from orgwallet.resolvers.organizations import OrganizationMutations, OrganizationQueries
from orgwallet.resolvers.purchases import PurchaseMutations, PurchaseQueries
from orgwallet.resolvers.wallets import WalletMutations
from orgwallet.schema.errors import CodedError
from orgwallet.schema.execution import ExecutionContext
from orgwallet.schema.extensions import DomainErrorCodes
from orgwallet.schema.notifications import BalanceAlert, Notification
from orgwallet.schema.purchases import Purchase, TokenPackage
from orgwallet.schema.scalars import SCALAR_MAP
from orgwallet.schema.types import ApiKey
from orgwallet.schema.wallets import CreditGrant, LedgerEntry, Reservation, Wallet

Query = merge_types("Query", (OrganizationQueries, PurchaseQueries))
Mutation = merge_types(
    "Mutation",
    (OrganizationMutations, WalletMutations, PurchaseMutations, NotificationMutations, AutoTopUpMutations),
)


def should_mask(error: GraphQLError) -> bool:
    """Shows typed errors and the client's own mistakes (syntax, validation); hides the rest."""
    original = error.original_error
    if original is None or isinstance(error, CodedError):
        return False
    # A GraphQLError underneath is graphql-core's own word on the request (a variable value
    # that is not in an enum, not an Int...) or a coded error: meant for the client.
    return not isinstance(original, GraphQLError)


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or Settings()
    depth_rules = QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules
    return strawberry.Schema(
        query=Query,
        mutation=Mutation,
        types=[
            ApiKey,
            Wallet,
            CreditGrant,
            LedgerEntry,
            Reservation,
            TokenPackage,
            Purchase,
            Notification,
            BalanceAlert,
        ],
        config=StrawberryConfig(scalar_map=SCALAR_MAP),
        execution_context_class=ExecutionContext,
        extensions=[
            # Factories: extensions keep per-operation state, so each request gets its own;
            # the parser and validation caches live at module level and are shared.
            lambda: ParserCache(maxsize=1024),
            lambda: ValidationCache(maxsize=1024),
            # One depth rule per schema: a rule class made per request (what QueryDepthLimiter
            # does) is part of the ValidationCache's key, so the cache would never hit.
            lambda: AddValidationRules(depth_rules),
            lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
            lambda: MaskErrors(should_mask_error=should_mask, error_message="Unexpected error."),
            DomainErrorCodes,  # after MaskErrors, so that it sees the errors first
        ],
    )


def print_schema() -> str:
    return build_schema().as_str() + "\n"
