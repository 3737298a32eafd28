"""Money as people read it: integer minor units shown in their currency's major unit."""

from __future__ import annotations

# fmt: off
ZERO_DECIMAL_CURRENCIES = frozenset({
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga",
    "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
})
# fmt: on


def format_amount(amount_minor: int, currency: str) -> str:
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return f"{amount_minor:,} {code.upper()}"
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(code)
    major = f"{amount_minor // 100:,}.{amount_minor % 100:02d}"
    return f"{symbol}{major}" if symbol else f"{major} {code.upper()}"
