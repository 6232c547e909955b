"""One place that turns errors into HTTP answers, in OpenAI's shape: {"error": {"message", "type", "code"}}."""

import functools
import re
import sys
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from adapters.errors import disk_full
from loraplex.errors import LoraplexError


def error_body(message: str, error_type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "code": code}}


class ErrorDetail(BaseModel):
    message: str  # what is wrong, and what to send instead
    type: str  # invalid_request_error (4xx) or server_error (5xx)
    code: str | None  # the error's name, e.g. prompt_too_long


class ErrorBody(BaseModel):
    error: ErrorDetail


# The statuses a route may answer with error_body, documented in the OpenAPI schema for every route (a client
# generated from it, or a checker such as schemathesis, would otherwise take them as undocumented)
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
    for status in (400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 503, 507)
}


def error_response(exc: LoraplexError) -> JSONResponse:
    body = error_body(str(exc), exc.error_type, exc.code)
    return JSONResponse(body, status_code=exc.http_status, headers=getattr(exc, "headers", None))


# Steps of pydantic's own in an error's place, not the request's: a validator (function-after[_unicode(), str]), a
# type (list[constrained-str], tagged-union[...]), a member of a union of models (its class's name)
_VALIDATOR_STEP = re.compile(r"[\[(]|^(constrained|tagged|function|json-or|lax-or|nullable)-|^(str|int|float|bool)$")


@functools.cache
def _model_names() -> frozenset[str]:
    """The request models' class names: pydantic names a union's member model in an error's place."""
    names, todo = set(), [BaseModel]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("server."):
                names.add(cls.__name__)
    return frozenset(names)


def _place(loc: tuple) -> str:
    """An error's place as the client wrote the request: its fields and indexes, pydantic's own steps left out."""
    steps = (p for p in loc if p != "body")
    return ".".join(
        str(p) for p in steps if not isinstance(p, str) or not (_VALIDATOR_STEP.search(p) or p in _model_names())
    )


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = _place(err["loc"])
        if err["type"] == "json_invalid":  # the framework says only "JSON decode error", and the offset as a field
            return f"the body is not valid JSON: {err['ctx']['error']} at character {err['loc'][-1]}"
        if not loc and err["type"] in ("missing", "model_attributes_type"):
            return _whole_body(err)
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])  # no place: a check of the whole request
    return "invalid request: " + "; ".join(parts)


_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _whole_body(err: dict) -> str:
    """No body, or one that is not an object: pydantic words these as about a field."""
    if err["type"] == "missing":
        return "the request has no body: send a JSON object"
    if isinstance(err.get("input"), bytes):  # the framework parses JSON only when the content-type says it is JSON
        return "the body was not read as JSON: send it with the header content-type: application/json"
    return f"the body is {_JSON_KINDS.get(type(err.get('input')), 'not an object')}: send a JSON object"


def _unreadable(cause: BaseException | None) -> str | None:
    """Why the framework could not parse a body (it says only "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"byte {cause.start} is not UTF-8: send the JSON as UTF-8"
    if isinstance(cause, RecursionError):
        return "it nests arrays or objects too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _loraplex(_: Request, exc: LoraplexError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_describe(exc), "invalid_request_error", "invalid_request"), 422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        # the framework's own refusals (unknown route, wrong method, an unparsable body): its status as the code
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        reason = _unreadable(exc.__cause__) if exc.status_code == 400 else None
        message = f"the body is not JSON this server can read: {reason}" if reason else str(exc.detail)
        body = error_body(message, error_type, HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Anything else is the server's fault, not the request's, and still a JSON body (the framework's answer is
        # plain text); the framework logs the traceback after this answer
        if disk_full(exc):
            message = "the server's disk is full: nothing was stored; an operator must free space, then retry"
            return JSONResponse(error_body(message, "server_error", "insufficient_storage"), status_code=507)
        message = "the server failed on this request (its log says why); the request may be retried"
        return JSONResponse(error_body(message, "server_error", "internal_error"), status_code=500)
