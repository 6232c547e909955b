"""Which adapter a request names, read the way the routes read it, so that a router in front of the replicas
can send it to one that already holds that adapter. Pure: no Ray, no model."""

import json

from server.api.jsonitems import items_within

# the routes' own bound on names (server.api.schemas.MAX_NAME_CHARS; the schemas import torch, which the
# ingress never loads; a test keeps the two equal)
MAX_NAME_CHARS = 256
# the adapter routes manage the store: any replica answers them, whatever name they carry
ADMIN_PREFIX = "/v1/adapters"


def adapter_of(method: str, path: str, body: bytes, max_items: int) -> str | None:
    """The TGI `parameters.adapter_id`, else the OpenAI `model`, of a JSON request; None for the rest (GET,
    admin routes, bodies that are not a JSON object). The base model's served name is returned like any
    name: only a replica knows it, and the caller compares.

    A body of more than `max_items` JSON items (the routes' bound, server/api/jsonitems.py) is not parsed, and
    names none: the replica refuses it unparsed, as a server does. Parsed, 4 MiB of `[3],` took ~0.3 s, holding
    the interpreter lock, and so every stream through the ingress, on a thread or not, and ~100 MiB."""
    if method != "POST" or path.startswith(ADMIN_PREFIX) or not body or not items_within(body, max_items):
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # the replica answers the client's mistake with its own 422
        return None
    if not isinstance(payload, dict):
        return None
    parameters = payload.get("parameters")
    name = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    if name is None:
        name = payload.get("model")
    # a name no route accepts is not a routing key: the replica refuses it wherever it lands
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        return None
    return name


def is_upload(method: str, path: str) -> bool:
    """An adapter upload (POST /v1/adapters): its body is read by the upload's rules, not a JSON body's."""
    return method == "POST" and path.rstrip("/") == ADMIN_PREFIX
