"""Stripe's form encoding, decoded.

The SDK sends parameters as ``application/x-www-form-urlencoded`` with bracketed keys:
``metadata[purchase_id]=p1``, ``line_items[0][price_data][unit_amount]=4500``,
``expand[0]=latest_charge`` (older clients: ``expand[]=...``). ``decode_form`` turns that back
into nested dicts and lists; values stay strings, as on Stripe's side, and each endpoint
coerces what it reads with the ``param_*`` helpers, which answer with Stripe's
``parameter_missing`` / ``parameter_invalid_*`` errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from orgwallet.payments.simulator.errors import StripeApiError

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
_APPEND = object()


def decode_form(body: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        match = _KEY.match(key)
        if match is None:
            raise StripeApiError(400, f"Invalid parameter name: {key}", code="parameter_unknown", param=key)
        path: list[Any] = [match.group(1)]
        path += [segment if segment else _APPEND for segment in _SEGMENT.findall(match.group(2))]
        _assign(root, path, value)
    result = _listify(root)
    assert isinstance(result, dict)
    return result


def _assign(node: dict[str, Any], path: list[Any], value: str) -> None:
    for index, segment in enumerate(path):
        last = index == len(path) - 1
        if segment is _APPEND:
            # "expand[]=a&expand[]=b": number the entries in arrival order.
            segment = str(len(node))
        if last:
            node[segment] = value
            return
        child = node.setdefault(segment, {})
        if not isinstance(child, dict):
            raise StripeApiError(400, f"Invalid parameter nesting at {segment}", param=str(segment))
        node = child


def _listify(node: Any) -> Any:
    """Dicts keyed only by indices ("0", "1", ...) were arrays on the client's side."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


# -- reading parameters ---------------------------------------------------------------------


def param_str(params: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise StripeApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    if not isinstance(value, str):
        raise StripeApiError(400, f"Invalid string: {name}", code="parameter_invalid_string", param=name)
    return value


def param_int(params: Mapping[str, Any], name: str, *, required: bool = False) -> int | None:
    raw = param_str(params, name, required=required)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StripeApiError(
            400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None


def param_bool(params: Mapping[str, Any], name: str) -> bool:
    raw = param_str(params, name)
    if raw is None:
        return False
    if raw not in ("true", "false"):
        raise StripeApiError(400, f"Invalid boolean: {raw}", code="parameter_invalid_boolean", param=name)
    return raw == "true"


def param_dict(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(400, f"Invalid object: {name}", code="parameter_invalid_object", param=name)
    return value


def param_list(params: Mapping[str, Any], name: str) -> list[Any]:
    value = params.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise StripeApiError(400, f"Invalid array: {name}", code="parameter_invalid_array", param=name)


def param_metadata(params: Mapping[str, Any], name: str = "metadata") -> dict[str, str]:
    metadata = param_dict(params, name)
    if not all(isinstance(value, str) for value in metadata.values()):
        raise StripeApiError(400, "Metadata values must be strings.", param=name)
    return {key: value for key, value in metadata.items() if isinstance(value, str)}
