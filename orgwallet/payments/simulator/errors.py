"""Stripe's error answer: ``{"error": {"type", "code", "decline_code", "message", ...}}``.

The HTTP status decides which exception the SDK raises: 400/404 ``InvalidRequestError``
(``type=idempotency_error``: ``IdempotencyError``), 401 ``AuthenticationError``,
402 ``CardError``.
"""

from __future__ import annotations

from typing import Any


class StripeApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        decline_code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.decline_code = decline_code
        self.param = param
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        for field in ("code", "decline_code", "param"):
            value = getattr(self, field)
            if value is not None:
                error[field] = value
        error.update(self.extra)
        return {"error": error}


def no_such(kind: str, object_id: str, *, param: str = "id") -> StripeApiError:
    return StripeApiError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)
