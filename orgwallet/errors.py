"""Domain errors. Each carries the objects it is about; the GraphQL layer maps them to
result-union members (expected outcomes) or to errors with ``extensions.code``."""

from __future__ import annotations

import uuid


class OrgWalletError(Exception):
    code = "ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Unauthenticated(OrgWalletError):
    code = "UNAUTHENTICATED"


class Forbidden(OrgWalletError):
    code = "FORBIDDEN"


class NotFound(OrgWalletError):
    code = "NOT_FOUND"


class InvalidInput(OrgWalletError):
    code = "INVALID_INPUT"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Conflict(OrgWalletError):
    """Well formed, but clashes with existing state (a taken slug, the last owner)."""

    code = "CONFLICT"


class InsufficientTokens(OrgWalletError):
    code = "INSUFFICIENT_TOKENS"

    def __init__(self, wallet_id: uuid.UUID, requested: int, available: int) -> None:
        super().__init__(f"requested {requested} tokens, {available} available")
        self.wallet_id = wallet_id
        self.requested = requested
        self.available = available


class WalletSuspended(OrgWalletError):
    code = "WALLET_SUSPENDED"

    def __init__(self, wallet_id: uuid.UUID) -> None:
        super().__init__("the wallet is suspended")
        self.wallet_id = wallet_id


class ReservationNotOpen(OrgWalletError):
    code = "RESERVATION_NOT_OPEN"

    def __init__(self, reservation_id: uuid.UUID, status: str) -> None:
        super().__init__(f"the reservation is {status}, not open")
        self.reservation_id = reservation_id
        self.status = status


class NotRefundable(OrgWalletError):
    code = "NOT_REFUNDABLE"

    def __init__(self, entry_id: uuid.UUID | None, message: str) -> None:
        super().__init__(message)
        self.entry_id = entry_id


class IdempotencyConflict(OrgWalletError):
    code = "IDEMPOTENCY_CONFLICT"

    def __init__(self, wallet_id: uuid.UUID, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used with other arguments")
        self.wallet_id = wallet_id
        self.key = key
