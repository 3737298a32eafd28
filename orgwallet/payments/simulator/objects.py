"""Small pieces of Stripe's object shapes shared by the account (``core``) and its billing
(``billing``): ids, list objects, metadata updates, amount limits."""

from __future__ import annotations

import secrets
import string
from typing import Any

from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.forms import param_metadata

JsonObject = dict[str, Any]

MAX_AMOUNT = 99_999_999  # Stripe's largest charge, in minor units
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def list_object(data: list[JsonObject], url: str) -> JsonObject:
    return {"object": "list", "data": data, "has_more": False, "url": url}


def too_large(param: str) -> StripeApiError:
    message = f"Amount must be no more than {MAX_AMOUNT:,} (minor units)."
    return StripeApiError(400, message, code="amount_too_large", param=param)


def updated_metadata(current: dict[str, str], params: JsonObject) -> dict[str, str]:
    """``metadata`` as an update sets it on Stripe: keys merged, a key set to "" removed, and
    ``metadata=""`` clearing all of it."""
    if params.get("metadata") == "":
        return {}
    metadata = dict(current)
    for key, value in param_metadata(params).items():
        if value == "":
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return metadata
