"""The ``Subscription`` root type: live updates over graphql-transport-ws at /graphql (and as a
multipart HTTP response, for a client that cannot open a WebSocket), fed by ``LiveHub``.

A subscription checks the caller's access when it starts (another organization's wallet is
``NOT_FOUND``, as for queries) and again while it lasts: at least every
``live_recheck_seconds``, and before it delivers an event when the last check is older. The
check authenticates the connection's credential again, so a revoked API key, an expired
token or a member removed from the organization ends the subscription with an error."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, TypeVar

import strawberry

from orgwallet.auth.permissions import Permission
from orgwallet.errors import OrgWalletError
from orgwallet.schema.context import Context, Info
from orgwallet.schema.errors import graphql_error
from orgwallet.schema.notifications import Notification
from orgwallet.schema.wallets import Wallet
from orgwallet.services import notifications as notification_service
from orgwallet.services.validation import global_id

T = TypeVar("T", covariant=True)


class Feed(Protocol[T]):
    async def next(self, within: float) -> T | None: ...


class Access:
    """A subscription's right to see an organization's tokens (tokens.view), checked again
    while the subscription lasts."""

    def __init__(self, context: Context, organization_id: uuid.UUID) -> None:
        self.context = context
        self.organization_id = organization_id
        self.checked_at = -math.inf

    async def check(self) -> None:
        context = self.context
        context.principal = await context.runtime.authenticate(context.credential)
        await context.authorize(self.organization_id, Permission.TOKENS_VIEW)
        self.checked_at = time.monotonic()

    async def events(self, feed: Feed[T]) -> AsyncIterator[T]:
        """What ``feed`` delivers, for as long as the caller keeps its access."""
        period = self.context.settings.live_recheck_seconds
        while True:
            event = await feed.next(within=self.checked_at + period - time.monotonic())
            if time.monotonic() - self.checked_at >= period:
                await self.check()
            if event is not None:
                yield event


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="tokens.view: the wallet now, then after every committed change of it (a slow "
        "client receives the latest state, not every one)."
    )
    async def wallet_updated(
        self, info: Info, organization_id: strawberry.ID
    ) -> AsyncGenerator[Wallet, None]:
        try:
            organization = global_id(organization_id, "Organization", "organizationId")
            access = Access(info.context, organization)
            await access.check()
            async with info.context.runtime.live.wallet(organization) as feed:
                async for change in access.events(feed):
                    yield Wallet.of(change.state)
        except OrgWalletError as error:  # coded here: a streamed error passes no extension that codes it
            raise graphql_error(error) from error

    @strawberry.subscription(
        description="tokens.view: each notification of the organization, as it is created."
    )
    async def notification_added(
        self, info: Info, organization_id: strawberry.ID
    ) -> AsyncGenerator[Notification, None]:
        try:
            organization = global_id(organization_id, "Organization", "organizationId")
            access = Access(info.context, organization)
            await access.check()
            async with info.context.runtime.live.notifications(organization) as feed:
                async for notification_id in access.events(feed):
                    async with info.context.reading() as session:
                        row = await notification_service.get_notification(
                            session, info.context.principal, notification_id
                        )
                    if row is not None:
                        yield Notification.of(row)
        except OrgWalletError as error:
            raise graphql_error(error) from error
