"""One place that turns errors into HTTP answers, in OpenAI's shape: {"error": {"message", "type", "code"}}."""

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraplex.errors import LoraplexError


def error_body(message: str, error_type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "code": code}}


def error_response(exc: LoraplexError) -> JSONResponse:
    body = error_body(str(exc), exc.error_type, exc.code)
    return JSONResponse(body, status_code=exc.http_status, headers=getattr(exc, "headers", None))


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "invalid request: " + "; ".join(parts)


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
        body = error_body(str(exc.detail), error_type, HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
