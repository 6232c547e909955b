"""Scoped keys: inference keys may generate and read /metrics; admin keys may also manage adapters. No keys:
an open server. The request guard authenticates before a body is read; these dependencies check the scope."""

import hashlib
import hmac

from fastapi import Request
from starlette.datastructures import Headers

from loraplex.errors import LoraplexError
from loraplex.settings import Settings
from server.client_share import current_client, current_request, peer_client, prefix_salt


class Unauthorized(LoraplexError):
    http_status = 401
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - read-only class constant


class Forbidden(LoraplexError):
    http_status = 403
    code = "insufficient_permissions"


def _bearer(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    # compare against every key, without stopping early, so timing says nothing about which key is near
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _keyed(settings: Settings) -> bool:
    return bool(settings.api_key or settings.admin_key)


def authenticate(settings: Settings, headers: Headers) -> bool:
    """Whether the request may manage adapters; raises Unauthorized without a configured key. No keys
    configured: an open server, where everyone may do everything."""
    if not _keyed(settings):
        return True
    token = _bearer(headers)
    if token is None:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    if _matches(token, settings.admin_key):
        return True
    if not _matches(token, settings.api_key):
        raise Unauthorized("invalid API key: check the key passed in 'Authorization: Bearer <key>'")
    return False


async def require_inference(request: Request) -> None:
    settings = request.app.state.settings
    authenticate(settings, request.headers)
    client = client_of(settings, request)
    current_client.set(client)
    current_request.set(object())
    prefix_salt.set(client if _keyed(settings) else None)  # on a server without keys, every client is alike


def client_of(settings: Settings, request: Request) -> str | None:
    """Whom a request's share counts against (--max-requests-per-client, --max-uploads-per-client): its key (a
    digest of it) on a server with keys, else its peer address (an IPv6 one's /64: peer_client)."""
    if _keyed(settings):
        return "key:" + hashlib.sha256((_bearer(request.headers) or "").encode()).hexdigest()[:32]
    return f"address:{peer_client(request.client.host)}" if request.client is not None else None


def admit_admin(settings: Settings, request: Request) -> None:
    """A request that may manage adapters, as its client (current_client); Unauthorized or Forbidden otherwise."""
    if not authenticate(settings, request.headers):
        raise Forbidden("this key may only run inference; managing adapters needs an admin key")
    current_client.set(client_of(settings, request))


async def require_admin(request: Request) -> None:
    admit_admin(request.app.state.settings, request)
