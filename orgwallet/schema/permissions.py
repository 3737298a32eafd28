"""Permission classes stacked on fields. Organization-level permissions need the
organization, so services check those; these guard who may call at all."""

from __future__ import annotations

from typing import Any

from strawberry.permission import BasePermission

from orgwallet.auth.principals import Anonymous, UserPrincipal
from orgwallet.schema.context import Info
from orgwallet.schema.errors import CodedError


class IsAuthenticated(BasePermission):
    message = "authentication required"

    def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        if isinstance(info.context.principal, Anonymous):
            raise CodedError(info.context.auth_error or self.message, "UNAUTHENTICATED")
        return True


class IsUser(BasePermission):
    """A signed-in person, not an API key."""

    message = "this operation needs a signed-in user, not an API key"

    def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        IsAuthenticated().has_permission(source, info)
        if not isinstance(info.context.principal, UserPrincipal):
            raise CodedError(self.message, "FORBIDDEN")
        return True


class IsPlatformAdmin(BasePermission):
    message = "platform administrators only"

    def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        IsUser().has_permission(source, info)
        if not info.context.principal.is_platform_admin:
            raise CodedError(self.message, "FORBIDDEN")
        return True
