"""Stripe's test card numbers and what each one does.

| number | outcome |
| --- | --- |
| 4242 4242 4242 4242 (and any other Luhn-valid number) | succeeds |
| 4000 0000 0000 0002 | declined: ``card_declined`` / ``generic_decline`` |
| 4000 0000 0000 9995 | declined: ``card_declined`` / ``insufficient_funds`` |
| 4000 0000 0000 9987 | declined: ``card_declined`` / ``lost_card`` |
| 4000 0000 0000 9979 | declined: ``card_declined`` / ``stolen_card`` |
| 4000 0000 0000 0069 | declined: ``expired_card`` |
| 4000 0000 0000 0127 | declined: ``incorrect_cvc`` |
| 4000 0000 0000 0119 | declined: ``processing_error`` |
| 4000 0000 0000 0341 | saving it to a customer succeeds; every charge is declined (``generic_decline``) |
| 4000 0027 6000 3184 | saving it and paying on-session succeed; off-session: ``authentication_required`` |
| anything not Luhn-valid | ``incorrect_number`` |

As on Stripe, a declining card also fails when it is only being saved (setup mode), except
4000 0000 0000 0341, which exists to test a saved card that declines off-session.

4000 0027 6000 3184 requires authentication (3-D Secure) on every payment. On-session (paid on
the hosted Checkout page, or a PaymentIntent confirmed without ``off_session``) the customer is
taken to be present and authenticated, so it succeeds: the simulator has no 3-D Secure step.
Charged ``off_session`` it fails as on Stripe: 402, ``authentication_required`` (code and
decline code), the intent back to ``requires_payment_method`` and ``payment_intent.payment_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decline:
    code: str
    decline_code: str | None
    message: str


@dataclass(frozen=True)
class Card:
    number: str
    brand: str
    decline: Decline | None = None  # every charge fails with it
    declines_when_saved: bool = False
    off_session_decline: Decline | None = None  # only off-session charges fail with it

    @property
    def last4(self) -> str:
        return self.number[-4:]

    def charge_decline(self, *, off_session: bool) -> Decline | None:
        """How a charge of this card fails (``None``: it succeeds)."""
        if self.decline is not None:
            return self.decline
        return self.off_session_decline if off_session else None


_DECLINED = "Your card was declined."
_DECLINES: dict[str, tuple[Decline, bool]] = {
    "4000000000000002": (Decline("card_declined", "generic_decline", _DECLINED), True),
    "4000000000009995": (
        Decline("card_declined", "insufficient_funds", "Your card has insufficient funds."),
        True,
    ),
    "4000000000009987": (Decline("card_declined", "lost_card", _DECLINED), True),
    "4000000000009979": (Decline("card_declined", "stolen_card", _DECLINED), True),
    "4000000000000069": (Decline("expired_card", "expired_card", "Your card has expired."), True),
    "4000000000000127": (
        Decline("incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
        True,
    ),
    "4000000000000119": (
        Decline(
            "processing_error",
            "processing_error",
            "An error occurred while processing your card. Try again in a little bit.",
        ),
        True,
    ),
    "4000000000000341": (Decline("card_declined", "generic_decline", _DECLINED), False),
}
_OFF_SESSION_DECLINES: dict[str, Decline] = {
    "4000002760003184": Decline(
        "authentication_required",
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}

INCORRECT_NUMBER = Decline("incorrect_number", None, "Your card number is incorrect.")


def normalize(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def luhn_valid(digits: str) -> bool:
    if not 12 <= len(digits) <= 19 or not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def brand_of(digits: str) -> str:
    if digits.startswith("4"):
        return "visa"
    if digits[:2] in {"51", "52", "53", "54", "55"} or digits[:1] == "2":
        return "mastercard"
    if digits[:2] in {"34", "37"}:
        return "amex"
    if digits.startswith("6"):
        return "discover"
    if digits.startswith("35"):
        return "jcb"
    return "unknown"


def lookup(number: str) -> Card:
    """The test card behind a typed number; raises ``ValueError`` with Stripe's
    ``incorrect_number`` decline when it is not a card number at all."""
    digits = normalize(number)
    if digits in _DECLINES:
        decline, when_saved = _DECLINES[digits]
        return Card(digits, brand_of(digits), decline, when_saved)
    if digits in _OFF_SESSION_DECLINES:
        return Card(digits, brand_of(digits), off_session_decline=_OFF_SESSION_DECLINES[digits])
    if not luhn_valid(digits):
        raise ValueError(INCORRECT_NUMBER.message)
    return Card(digits, brand_of(digits))
