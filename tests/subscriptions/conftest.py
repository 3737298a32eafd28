# The app's own Stripe (the simulator it mounts) and an organization buying from it.
from collections.abc import AsyncIterator

import pytest

from tests.purchasing import Shop, shop
from tests.subscriptions.harness import Subscriber, sdk_for

__all__ = ["shop", "subscriber"]


@pytest.fixture
async def subscriber(shop: Shop) -> AsyncIterator[Subscriber]:
    """The shop's organization as a subscriber: its Stripe customer on a test clock at
    ``harness.START``, the app's runtime on a ManualClock at the same instant."""
    sdk, http_client = sdk_for(shop)
    try:
        yield await Subscriber.create(shop, sdk)
    finally:
        shop.simulator.enabled_events = None
        await http_client.close_async()
