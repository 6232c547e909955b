"""FastAPI dependencies that hand routes the running service, or a 503 while the model is loading."""

from fastapi import Request

from loraplex.errors import LoraplexError
from server.inference import Inference
from server.runtime import Runtime


class NotReady(LoraplexError):
    http_status = 503
    code = "not_ready"
    headers = {"Retry-After": "2"}  # noqa: RUF012 - read-only class constant


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None:
        raise NotReady(request.app.state.startup_error or "the model is still loading; retry shortly")
    return runtime


def get_inference(request: Request) -> Inference:
    return get_runtime(request).inference
