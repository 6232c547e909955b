"""Scoped keys: inference keys may generate; admin keys may also manage adapters. No keys: open server."""

import hmac

from fastapi import Request

from loraplex.errors import LoraplexError
from loraplex.settings import Settings


class Unauthorized(LoraplexError):
    http_status = 401
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - read-only class constant


class Forbidden(LoraplexError):
    http_status = 403
    code = "insufficient_permissions"


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    # compare against every key, without stopping early, so timing says nothing about which key is near
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _check(request: Request, admin: bool) -> None:
    settings: Settings = request.app.state.settings
    if not settings.api_key and not settings.admin_key:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    if _matches(token, settings.admin_key):
        return
    if not _matches(token, settings.api_key):
        raise Unauthorized("invalid API key: check the key passed in 'Authorization: Bearer <key>'")
    if admin:
        raise Forbidden("this key may only run inference; managing adapters needs an admin key")


async def require_inference(request: Request) -> None:
    _check(request, admin=False)


async def require_admin(request: Request) -> None:
    _check(request, admin=True)
