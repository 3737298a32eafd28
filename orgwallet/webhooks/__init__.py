"""Stripe talks back here: ``stripe`` (the ``POST /webhooks/stripe`` route: verify, store once,
handle in the same transaction) and ``handlers`` (one per event type)."""

from orgwallet.webhooks.stripe import handle_event, stripe_webhook_route

__all__ = ["handle_event", "stripe_webhook_route"]
