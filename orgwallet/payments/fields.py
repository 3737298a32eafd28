"""Reading fields of Stripe's objects as plain JSON (a webhook's ``data.object``, or an SDK
object's ``to_dict()``): what is there and of the expected type, else None."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

JsonObject = dict[str, Any]


def text(value: object) -> str | None:
    """A non-empty string, or None."""
    return value if isinstance(value, str) and value else None


def id_of(value: object) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        return text(value.get("id"))
    return text(value)


def metadata(obj: JsonObject) -> JsonObject:
    found = obj.get("metadata")
    return found if isinstance(found, dict) else {}


def uuid_in(value: object) -> uuid.UUID | None:
    """One of our ids, put in metadata as a string."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def instant(value: object) -> datetime | None:
    """A Unix time (Stripe's timestamps); 0 or absent is None."""
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) and value > 0 else None
