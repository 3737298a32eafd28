"""Input checks shared by services. Each raises ``InvalidInput`` naming the field."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from strawberry.relay import GlobalID

from orgwallet.config import Settings
from orgwallet.errors import InvalidInput, NotFound

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
MAX_SAFE_INTEGER = 2**53 - 1


def text(value: str | None, field: str, *, max_length: int = 200, required: bool = True) -> str:
    cleaned = (value or "").strip()
    if required and not cleaned:
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(cleaned) > max_length:
        raise InvalidInput(f"{field} must be at most {max_length} characters", field=field)
    if any(ord(c) < 32 for c in cleaned):
        raise InvalidInput(f"{field} must not contain control characters", field=field)
    return cleaned


def slug(value: str, field: str = "slug") -> str:
    # fullmatch: with match, "$" also matches before a final newline ("acme\n").
    if not SLUG_RE.fullmatch(value):
        raise InvalidInput(f"{field} must be 1 to 64 lowercase letters, digits or inner dashes", field=field)
    return value


def slugify(name: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64].strip("-")
    return base or "org"


def email(value: str | None, field: str = "email") -> str | None:
    if value is None or value == "":
        return None
    if len(value) > 320 or not EMAIL_RE.fullmatch(value):
        raise InvalidInput(f"{field} is not an e-mail address", field=field)
    return value


def token_amount(value: object, field: str = "amount") -> int:
    """A whole, positive number of tokens up to 2**53-1."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field} must be a whole number of tokens", field=field)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number of tokens", field=field)
    if not 1 <= value <= MAX_SAFE_INTEGER:
        raise InvalidInput(f"{field} must be between 1 and {MAX_SAFE_INTEGER}", field=field)
    return value


@dataclass(frozen=True, slots=True)
class MetadataLimits:
    """What a client may store in an object's ``metadata``: its size as JSON (UTF-8 bytes)
    and how deep objects and lists nest (a flat object is 1 deep)."""

    max_bytes: int = 8192
    max_depth: int = 5

    @classmethod
    def of(cls, settings: Settings) -> MetadataLimits:
        return cls(max_bytes=settings.max_metadata_bytes, max_depth=settings.max_metadata_depth)


DEFAULT_METADATA_LIMITS = MetadataLimits()


def metadata(
    value: object, limits: MetadataLimits = DEFAULT_METADATA_LIMITS, field: str = "metadata"
) -> dict[str, Any] | None:
    """A JSON object within ``limits``, whose keys and strings hold no NUL character and whose
    numbers are finite (PostgreSQL's jsonb refuses both). The depth is measured without
    recursion, before anything serializes it: a value nested thousands deep gets the same
    typed error as one nested six deep."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a JSON object", field=field)
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limits.max_depth:
            raise InvalidInput(f"{field} must not nest more than {limits.max_depth} levels deep", field=field)
        for key, child in node.items() if isinstance(node, dict) else ((None, child) for child in node):
            if (isinstance(key, str) and "\x00" in key) or (isinstance(child, str) and "\x00" in child):
                raise InvalidInput(f"{field} must not contain NUL characters (\\u0000)", field=field)
            if isinstance(child, float) and not math.isfinite(child):
                raise InvalidInput(f"{field} numbers must be finite", field=field)
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > limits.max_bytes:
        raise InvalidInput(
            f"{field} must be at most {limits.max_bytes} bytes of JSON, not {size}", field=field
        )
    return value


def idempotency_key(value: str | None, field: str = "idempotencyKey") -> str:
    if value is None or not 1 <= len(value) <= 255 or not value.isprintable():
        raise InvalidInput(f"{field} must be 1 to 255 printable characters", field=field)
    return value


#: Stripe's largest charge, in minor units.
MAX_AMOUNT_MINOR = 99_999_999
CODE_PATTERN = "lowercase letters, digits, '-' or '_' (1 to 63, starting with a letter or digit)"


def amount_minor(value: object, field: str) -> int:
    """A price in minor units (cents) that Stripe can charge."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AMOUNT_MINOR:
        raise InvalidInput(
            f"{field} must be a whole number of minor units from 1 to {MAX_AMOUNT_MINOR}", field=field
        )
    return value


def currency_code(value: str | None) -> str:
    code = (value or "").strip().upper()
    if len(code) != 3 or not code.isascii() or not code.isalpha():
        raise InvalidInput("currency must be a three-letter ISO code", field="currency")
    return code


def catalogue_code(value: str) -> str:
    """The stable code of a package or a plan."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value or ""):
        raise InvalidInput(f"code must be {CODE_PATTERN}", field="code")
    return value


#: Ledger keys the system writes (a purchase's credit, a subscription invoice's grant): a
#: client's key may not start so, or it could take the key first and block that credit.
RESERVED_LEDGER_KEY_PREFIXES = ("purchase:", "subscription-invoice:")


def ledger_key(value: str | None, field: str = "idempotencyKey") -> str:
    """An idempotency key a client gives a ledger operation."""
    key = idempotency_key(value, field)
    if key.startswith(RESERVED_LEDGER_KEY_PREFIXES):
        reserved = " or ".join(repr(p) for p in RESERVED_LEDGER_KEY_PREFIXES)
        raise InvalidInput(f"{field} may not start with {reserved}: those keys are the system's", field=field)
    return key


def global_id(value: object, type_name: str, field: str) -> uuid.UUID:
    """Decodes a Relay global id of the given type; an id of another type is not found."""
    try:
        gid = value if isinstance(value, GlobalID) else GlobalID.from_id(str(value))
        node_id = uuid.UUID(gid.node_id)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{field} is not a valid id", field=field) from exc
    if gid.type_name != type_name:
        raise NotFound(f"{type_name} not found")
    return node_id


def id_cursor(kind: str, object_id: uuid.UUID) -> str:
    """A page cursor of a connection ordered by time-ordered ids (UUID v7), newest first."""
    return base64.urlsafe_b64encode(f"{kind}:{object_id}".encode()).decode()


def id_after(kind: str, cursor: str) -> uuid.UUID:
    """The id an ``id_cursor`` of ``kind`` names; ``InvalidInput(field="after")`` otherwise."""
    try:
        prefix, _, value = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if prefix != kind:
            raise ValueError(prefix)
        return uuid.UUID(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("after is not a cursor of this connection", field="after") from exc


def time_window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """A [since, until) filter of a list: instants with a time zone, ``since`` before ``until``."""
    for value, field in ((since, "since"), (until, "until")):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{field} must carry a time zone (e.g. 2027-01-31T00:00:00Z)", field=field)
    if since is not None and until is not None and since >= until:
        raise InvalidInput("until must be after since", field="until")
    return since, until
