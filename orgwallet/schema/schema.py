"""Assembles the schema from the per-domain query and mutation mixins."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    QueryDepthLimiter,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext as OperationContext
from strawberry.utils.logging import StrawberryLogger

from orgwallet.config import Settings
from orgwallet.errors import OrgWalletError
from orgwallet.metrics import GraphQLMetrics
from orgwallet.resolvers.autotopup import AutoTopUpMutations
from orgwallet.resolvers.insights import InsightsMutations
from orgwallet.resolvers.notifications import NotificationMutations
from orgwallet.resolvers.organizations import OrganizationMutations, OrganizationQueries
from orgwallet.resolvers.purchases import PurchaseMutations, PurchaseQueries
from orgwallet.resolvers.subscriptions import SubscriptionMutations, SubscriptionQueries
from orgwallet.resolvers.wallets import WalletMutations
from orgwallet.schema.audit import AuditEvent
from orgwallet.schema.errors import CodedError
from orgwallet.schema.execution import ExecutionContext
from orgwallet.schema.extensions import DomainErrorCodes
from orgwallet.schema.limits import CachedDocuments, DocumentCache, QueryLimits
from orgwallet.schema.live import Subscription
from orgwallet.schema.notifications import BalanceAlert, Notification
from orgwallet.schema.purchases import Purchase, TokenPackage
from orgwallet.schema.scalars import SCALAR_MAP
from orgwallet.schema.subscriptions import SubscriptionInvoice, SubscriptionPlan, TokenSubscription
from orgwallet.schema.types import ApiKey
from orgwallet.schema.wallets import CreditGrant, LedgerEntry, Reservation, Wallet

Query = merge_types("Query", (OrganizationQueries, PurchaseQueries, SubscriptionQueries))
Mutation = merge_types(
    "Mutation",
    (
        OrganizationMutations,
        WalletMutations,
        PurchaseMutations,
        NotificationMutations,
        AutoTopUpMutations,
        InsightsMutations,
        SubscriptionMutations,
    ),
)


def should_mask(error: GraphQLError) -> bool:
    """Shows typed errors and the client's own mistakes (syntax, validation); hides the rest."""
    original = error.original_error
    if original is None or isinstance(error, CodedError):
        return False
    # A GraphQLError underneath is graphql-core's own word on the request (a variable value
    # that is not in an enum, not an Int...) or a coded error: meant for the client.
    return not isinstance(original, GraphQLError)


def unexpected(error: GraphQLError) -> bool:
    """An error of ours (a bug, a failure), as opposed to a typed error or the client's mistake."""
    return should_mask(error) and not isinstance(error.original_error, OrgWalletError)


class Schema(strawberry.Schema):
    """Logs only the unexpected errors (with their traceback): a typed error or the client's
    mistake (a forged token, a bad query) is an answer, not an incident. An authentication
    failure is logged once, as one line, where the credential is read (``GraphQLEndpoint``)."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: OperationContext | None = None
    ) -> None:
        for error in errors:
            if unexpected(error):
                StrawberryLogger.error(error, execution_context)


def build_schema(
    settings: Settings | None = None, documents: DocumentCache | None = None
) -> strawberry.Schema:
    """``documents``: the cache of parsed and validated documents (a new one by default)."""
    settings = settings or Settings()
    documents = DocumentCache() if documents is None else documents
    depth_rules = QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules
    return Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
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
            AuditEvent,
            SubscriptionPlan,
            TokenSubscription,
            SubscriptionInvoice,
        ],
        config=StrawberryConfig(scalar_map=SCALAR_MAP),
        execution_context_class=ExecutionContext,
        extensions=[
            # Factories: extensions keep per-operation state, so each request gets its own;
            # the cache of parsed and validated documents is the schema's, shared.
            lambda: CachedDocuments(documents),
            # One depth rule per schema: the cache keys documents by their text alone, so
            # the rules must be the same for every request (QueryDepthLimiter makes a rule
            # class per request).
            lambda: AddValidationRules(depth_rules),
            lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
            lambda: QueryLimits(max_cost=settings.max_query_cost, cache=documents),
            lambda: MaskErrors(should_mask_error=should_mask, error_message="Unexpected error."),
            DomainErrorCodes,  # after MaskErrors, so that it sees the errors first
            lambda: GraphQLMetrics(unexpected=unexpected),  # last: it sees the errors as raised
        ],
    )


def print_schema() -> str:
    return build_schema().as_str() + "\n"
