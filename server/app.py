"""The FastAPI application factory. The model loads in a worker thread after the port opens:
/health answers at once, /ready turns 200 once the model is loaded and warmed."""

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.basemodel import LoadedBase
from loraplex.errors import LoraplexError
from loraplex.settings import Settings
from server.api import adapters as adapters_api
from server.api import generate, openai, responses, tokenize
from server.api.auth import require_inference
from server.api.errors import ERROR_RESPONSES, error_body, install_error_handlers
from server.api.guard import RequestGuard
from server.api.intake import UploadSlots
from server.metrics import Metrics
from server.runtime import Runtime

log = logging.getLogger("loraplex")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(
    settings: Settings,
    base: LoadedBase | None = None,
    on_fatal: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """`base`: an already loaded model (tests); `on_fatal`: called when start-up fails (the CLI exits);
    `on_ready`: called once the model is loaded and warmed, before /ready says so."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_key and not settings.admin_key and not _is_loopback(settings.host):
            log.warning(
                "no API keys configured and bound to %s: anyone who reaches it may generate and "
                "manage adapters; set --admin-key / --api-key",
                settings.host,
            )
        starting = asyncio.create_task(_start(app))
        yield
        starting.cancel()
        if app.state.runtime is not None:
            runtime, app.state.runtime, app.state.registry = app.state.runtime, None, None
            await asyncio.to_thread(runtime.stop)

    async def _start(app: FastAPI) -> None:
        try:
            runtime = await Runtime.start(settings, app.state.metrics, base)
            if on_ready is not None:
                on_ready()
            app.state.runtime, app.state.registry = runtime, runtime.registry
        except Exception as exc:
            if isinstance(exc, LoraplexError):  # a cause we can name: one line, no traceback
                log.error("start-up failed: %s", exc)
            else:
                log.exception("start-up failed")
            app.state.startup_error = str(exc)
            app.state.exit_code = 1
            if on_fatal is not None:
                on_fatal()

    app = FastAPI(
        title="loraplex",
        version="0.1.0",
        lifespan=lifespan,
        description="Many LoRA adapters served from one NF4 base model.",
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.runtime = None
    app.state.registry = None
    app.state.startup_error = None
    app.state.exit_code = 0
    app.state.metrics = Metrics()
    app.state.uploads = UploadSlots(settings.max_concurrent_uploads, settings.max_uploads_per_client)
    install_error_handlers(app)
    probes_and_docs = {
        "/health",
        "/ready",
        app.docs_url,
        app.redoc_url,
        app.openapi_url,
        app.swagger_ui_oauth2_redirect_url,
    }
    open_paths = probes_and_docs - {None} | ({"/metrics"} if settings.open_metrics else set())
    app.state.open_paths = frozenset(open_paths)  # a fleet's ingress authenticates by them too (server/fleet)
    app.add_middleware(RequestGuard, settings=settings, open_paths=open_paths, own_limit=(adapters_api.router.prefix,))
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(tokenize.router)
    app.include_router(adapters_api.router)

    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> JSONResponse:
        """Liveness: 200 while the model loads; 503 once start-up failed or the engine thread has stopped,
        which only a restart cures (an orchestrator's cue)."""
        state = request.app.state
        if state.startup_error is not None or (state.runtime is not None and not state.runtime.engine.alive):
            message = state.startup_error or "the engine has stopped; restart the server (see its log)"
            return JSONResponse(error_body(message, "server_error", "engine_stopped"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", tags=["operations"])
    async def ready(request: Request) -> JSONResponse:
        state = request.app.state
        if state.runtime is None or not state.runtime.engine.alive:
            message = state.startup_error or (
                "the model is loading; retry shortly"
                if state.runtime is None
                else "the engine has stopped; see the server log"
            )
            return JSONResponse(error_body(message, "server_error", "not_ready"), 503, {"Retry-After": "2"})
        return JSONResponse({"status": "ready", "model": state.runtime.base.served_name})

    # any configured key may scrape (Prometheus: `authorization: {credentials: <key>}`), or anyone with
    # --open-metrics; adapter names show
    metrics_auth = [] if settings.open_metrics else [Depends(require_inference)]

    @app.get("/metrics", tags=["operations"], response_class=Response, dependencies=metrics_auth)
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
