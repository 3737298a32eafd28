"""Payments through Stripe.

- ``gateway``: ``StripeGateway``, the only code that calls Stripe (the official SDK, async,
  API version pinned in ``STRIPE_API_VERSION``), its results (``CheckoutLink``) and errors
  (``PaymentDeclined``, ``InvalidStripeWebhook``), and ``construct_event`` for the webhook route.
- ``simulator``: an offline Stripe to mount at ``/_stripe`` when no real key is configured.
"""
