"""loraplex on Ray Serve: N replicas of the server (one engine, and one GPU where the cluster has GPUs, each)
behind one HTTP ingress that serves the same API.

The ingress reads the adapter a request names (TGI `parameters.adapter_id`, OpenAI `model`) and calls the
replicas through a handle with `multiplexed_model_id=<adapter>`; Serve sends it to a replica that already
holds that adapter, or, for a new one, to the replica holding the fewest. A replica runs the whole FastAPI app
in-process (server.app.create_app: auth, limits, errors, streams), marks the adapter resident through
`@serve.multiplexed` (pinned in its registry's CPU tier until Serve unloads it), and names itself in the
`x-loraplex-replica` response header. The adapter routes go to any replica: they share one adapter store.

Started by `loraplex serve --ray --replicas N`, or by `serve run deploy/ray/serve.yaml` (`build` below).
"""

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from adapters.errors import TooManyPinned
from loraplex.errors import LoraplexError
from loraplex.settings import Settings
from server.api.auth import admit_admin, authenticate
from server.api.errors import error_response
from server.api.intake import FORM_OVERHEAD, UploadSlots, limited, read_body
from server.api.jsonitems import max_json_items
from server.api.sse import OPENAI, RESPONSES, TGI, failed_stream_end
from server.fleet.asgi import ForwardedRequest, ResponseStart, call_app
from server.fleet.routing import adapter_of, is_upload

if TYPE_CHECKING:  # torch and the model code load in the replicas alone: the ingress only forwards bytes
    from server.registry import AdapterRegistry

log = logging.getLogger("loraplex")

APP_NAME = "loraplex"
REPLICA = "LoraplexReplica"
INGRESS = "LoraplexIngress"
REPLICA_HEADER = "x-loraplex-replica"
# the ingress only forwards bytes: it queues for the replicas, which bound their own work (--max-queue)
INGRESS_MAX_ONGOING = 1000
# a body up to this is read for its routing key on the ingress's event loop, a larger one off it (4 MiB: tens of ms)
ROUTING_ON_LOOP_BYTES = 64 << 10
_FLEET_ARGS = ("replicas", "max_replicas", "max_ongoing_requests")


class ReplicaStartFailed(LoraplexError):
    code = "replica_start_failed"


class ReplicaFailed(LoraplexError):
    """The replica serving a request died (it is being replaced): the request may be sent again."""

    http_status = 503
    code = "replica_failed"
    headers = {"Retry-After": "2"}  # noqa: RUF012 - read-only class constant


class _Resident:
    """A replica's hold on one adapter version for as long as Serve lists it on this replica: pinned in the
    registry's CPU tier, so the replica that requests are routed to for it never evicts it."""

    def __init__(self, registry: "AdapterRegistry", key: str, pinned: bool) -> None:
        self._registry = registry
        self.key = key
        self._pinned = pinned

    def __del__(self) -> None:
        # Serve calls this when it unloads the adapter; the garbage collector may call it again later,
        # when the same version can be pinned anew for another holder: unpin once only
        if self._pinned:
            self._pinned = False
            with contextlib.suppress(LoraplexError):  # deleted meanwhile: the delete unpinned it
                self._registry.unpin(self.key)


@serve.deployment(name=REPLICA, health_check_period_s=5, graceful_shutdown_timeout_s=30)
class Replica:
    """One loraplex server (model, registry, engine) in a Ray actor, answering ForwardedRequests."""

    async def __init__(self, settings: Settings) -> None:
        from server.app import create_app

        self.app = create_app(settings)
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        state = self.app.state
        # the app loads the model in a task of its lifespan; the replica counts as started once it is ready,
        # so Serve routes nothing to it before (and retries the replica if it cannot start)
        while state.runtime is None and state.startup_error is None:
            await asyncio.sleep(0.1)
        if state.startup_error is not None:
            await self._lifespan.aclose()
            raise ReplicaStartFailed(f"the replica could not start: {state.startup_error}")
        self.name = serve.get_replica_context().replica_id.unique_id
        self._header = [(REPLICA_HEADER.encode(), self.name.encode())]

        async def resident(adapter: str) -> _Resident:  # Serve keeps its LRU on the function: not a bound method
            return await self._make_resident(adapter)

        # as many adapters as the replica's device slots (max_active_adapters, fitted to its GPU where not set)
        slots = state.runtime.engine.config.max_active_adapters
        self._resident: Callable[[str], Any] = serve.multiplexed(max_num_models_per_replica=slots)(resident)

    async def _make_resident(self, adapter: str) -> _Resident:
        registry: AdapterRegistry = self.app.state.registry
        lease = await registry.acquire(adapter)  # resolves the name in the shared store; loads it to CPU
        try:
            try:
                return _Resident(registry, registry.pin(lease.key), pinned=True)
            except TooManyPinned:  # --preload holds the CPU tier: served all the same, just not held
                return _Resident(registry, lease.key, pinned=False)
        finally:
            lease.release()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            # an unknown or broken adapter is not held; the route answers the client with its own error
            with contextlib.suppress(LoraplexError):
                await self._resident(adapter)
        async for item in call_app(self.app, request, self._header):
            yield item

    def served_name(self) -> str:
        return self.app.state.runtime.base.served_name

    def open_paths(self) -> frozenset[str]:
        """The paths that need no key (probes, docs): the ingress authenticates every other request before it reads
        its body, as a server does."""
        return self.app.state.open_paths

    def json_items(self) -> int:
        """The most JSON items an inference route's body may hold: the ingress parses no body past it, and asks
        here (computing it loads the schemas, and with them torch)."""
        return max_json_items(self.app.state.settings.max_seq_len)

    def check_health(self) -> None:
        """Serve's liveness probe: a stopped engine only a restart cures, so the replica is replaced."""
        runtime = self.app.state.runtime
        if runtime is None or not runtime.engine.alive:
            raise ReplicaStartFailed("the engine has stopped")

    async def __del__(self) -> None:
        await self._lifespan.aclose()


@serve.deployment(name=INGRESS, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class Ingress:
    """The HTTP entry: reads the body by the rules a server reads its own by (server/api/intake.py), picks the
    routing key, forwards, streams the answer back. An adapter upload is read by an admin's request alone, in one
    of --max-concurrent-uploads slots: the ingress holds each body whole until a replica has it."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self._replicas = replicas
        self._settings = settings
        self._uploads = UploadSlots(settings.max_concurrent_uploads, settings.max_uploads_per_client)
        self._base_name: str | None = None
        self._max_items: int | None = None
        self._open_paths: frozenset[str] | None = None

    async def __call__(self, request: Request) -> Response:
        try:
            if is_upload(request.method, request.url.path):
                admit_admin(self._settings, request)
                with self._uploads.hold():
                    limit = (self._settings.max_adapter_mb << 20) + FORM_OVERHEAD
                    body = b"".join([chunk async for chunk in limited(request.stream(), limit)])
                    return await self._forward(request, body)
            # the key before the body: a client without one could otherwise make the ingress hold --max-request-mb
            # of each of its requests (the replica checks the scope: admin routes)
            if self._open_paths is None:
                self._open_paths = await self._replicas.open_paths.remote()
            if request.url.path not in self._open_paths:
                authenticate(self._settings, request.headers)
            message = await read_body(request.scope, request.receive, self._settings.max_request_mb)
        except LoraplexError as exc:
            return error_response(exc)
        if message["type"] == "http.disconnect":  # the client left: nobody reads an answer
            return Response(status_code=499)
        return await self._forward(request, message["body"])

    async def _forward(self, request: Request, body: bytes) -> Response:
        forwarded = ForwardedRequest(
            request.method,
            request.url.path,
            request.scope["query_string"],
            list(request.scope["headers"]),
            body,
            tuple(request.client) if request.client else None,
        )
        try:
            adapter = await self._adapter(forwarded)
            handle = self._replicas.options(stream=True, multiplexed_model_id=adapter or "")
            answer: DeploymentResponseGenerator = handle.forward.remote(forwarded)
            start = await answer.__anext__()
        except RayActorError:
            failed = "the replica serving this request failed and is being replaced: retry the request"
            return error_response(ReplicaFailed(failed))
        assert isinstance(start, ResponseStart)
        response = StreamingResponse(self._body(answer, start, forwarded.path))
        response.status_code = start.status
        response.raw_headers = list(start.headers)  # as the replica sent them (content-length, its name)
        return response

    async def _adapter(self, request: ForwardedRequest) -> str | None:
        """The routing key; None (any replica) for the base model, whose name a replica tells once, as it tells the
        bound on a body's items. A large body is counted and parsed off the event loop, which every stream through
        the ingress shares."""
        if not request.body:
            return None
        if self._max_items is None:
            self._max_items = await self._replicas.json_items.remote()
        route = (request.method, request.path, request.body, self._max_items)
        if len(request.body) <= ROUTING_ON_LOOP_BYTES:
            adapter = adapter_of(*route)
        else:
            adapter = await asyncio.to_thread(adapter_of, *route)
        if adapter is None:
            return None
        if self._base_name is None:
            self._base_name = await self._replicas.served_name.remote()
        return None if adapter == self._base_name else adapter

    async def _body(self, answer: DeploymentResponseGenerator, start: ResponseStart, path: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in answer:
                yield chunk
        except RayActorError:
            # the status is sent: an event stream ends as a replica's own failed stream ends, in its route's
            # protocol, which the clients read; other bodies end short, which clients see as a broken response
            if (b"content-type", b"text/event-stream") in {(k.lower(), v.split(b";")[0]) for k, v in start.headers}:
                protocol = RESPONSES if path.startswith("/v1/responses") else OPENAI if path.startswith("/v1/") else TGI
                error = ReplicaFailed("the replica serving this stream failed and is being replaced: retry the request")
                yield failed_stream_end(protocol, error)
        finally:
            answer.cancel()  # the client left early: the replica cancels the request (a no-op once complete)


def deployment_options(
    settings: Settings, replicas: int, max_replicas: int | None, max_ongoing_requests: int | None
) -> dict[str, Any]:
    """The replica deployment's options: fixed `replicas`, or autoscaling from `replicas` to `max_replicas`;
    one GPU each when the device is CUDA, or `auto` on a cluster with GPUs."""
    # a replica runs max_batch_size requests and queues as many more; with the batch size sized to the GPU
    # (unset), 64 is the CPU default's double
    ongoing = max_ongoing_requests or 2 * (settings.max_batch_size or 32)
    gpus = settings.device == "cuda" or (settings.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    options: dict[str, Any] = {"max_ongoing_requests": ongoing, "ray_actor_options": {"num_gpus": 1 if gpus else 0}}
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": math.ceil(ongoing / 2),
        }
    else:
        options["num_replicas"] = replicas
    return options


def application(
    settings: Settings, replicas: int = 1, max_replicas: int | None = None, max_ongoing_requests: int | None = None
) -> serve.Application:
    """The Serve application: `replicas` loraplex replicas of `settings` behind one ingress. A replica holds
    (Serve's multiplexed models) as many adapters as it has device slots."""
    replica = Replica.options(**deployment_options(settings, replicas, max_replicas, max_ongoing_requests))
    return Ingress.bind(replica.bind(settings), settings)


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder `serve run` calls with a config's `args`: `replicas`, `max_replicas`,
    `max_ongoing_requests`, and any `loraplex serve` setting by its field name (`base_model`, `adapter_dir`,
    ...); LORAPLEX_* variables of the environment fill the rest, as for `loraplex serve`."""
    fleet = {key: args[key] for key in _FLEET_ARGS if key in args}
    settings = Settings(**{key: value for key, value in args.items() if key not in _FLEET_ARGS})
    return application(settings, **fleet)


def run(settings: Settings, replicas: int, max_replicas: int | None) -> int:
    """`loraplex serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster, serve on --host/--port until
    Ctrl-C, then take the application down."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    ray.init()
    # a stop by SIGTERM (a container's, a service manager's) takes the application and the local Ray down as
    # Ctrl-C does, instead of leaving Ray's processes behind; set after ray.init(), which installs a SIGTERM handler
    # of its own that kills the driver in the middle of that shutdown (Ray's dashboard agents were left running)
    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):  # a stop while the replicas start, too: no traceback
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            serve.run(application(settings, replicas, max_replicas), name=APP_NAME, route_prefix="/")
            log.info("serving %d replica(s) on http://%s:%d (Ctrl-C to stop)", replicas, settings.host, settings.port)
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
