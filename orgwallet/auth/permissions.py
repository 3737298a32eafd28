"""The permission matrix of DESIGN.md section 5, as data, in one place."""

from __future__ import annotations

import enum

from orgwallet.db.models import Role


class Permission(enum.StrEnum):
    TOKENS_VIEW = "tokens.view"
    TOKENS_CONSUME = "tokens.consume"
    TOKENS_PURCHASE = "tokens.purchase"
    TOKENS_CONFIGURE = "tokens.configure"
    MEMBERS_MANAGE = "members.manage"


#: Scopes an API key may carry: every permission but managing members.
API_KEY_SCOPES: frozenset[Permission] = frozenset(Permission) - {Permission.MEMBERS_MANAGE}

_ALL = frozenset(Permission)
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.OWNER: _ALL,
    Role.ADMIN: _ALL,
    Role.BILLING: frozenset(
        {Permission.TOKENS_VIEW, Permission.TOKENS_PURCHASE, Permission.TOKENS_CONFIGURE}
    ),
    Role.MEMBER: frozenset({Permission.TOKENS_VIEW, Permission.TOKENS_CONSUME}),
    Role.VIEWER: frozenset({Permission.TOKENS_VIEW}),
}


def sorted_permissions(permissions: frozenset[Permission]) -> list[str]:
    return [p.value for p in Permission if p in permissions]
