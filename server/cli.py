"""`loraplex serve`: flags generated from the Settings fields, so flag and LORAPLEX_<FLAG> never drift.

Only the settings are imported up front: the model, torch and the server load inside `run`, after the
port is bound, so `--help` is instant and a port in use fails before any weight is read.
"""

import argparse
import contextlib
import errno
import gc
import importlib.util
import logging
import socket
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from loraplex.errors import LoraplexError
from loraplex.logs import configure
from loraplex.settings import Settings, describe_settings_error

log = logging.getLogger("loraplex")
_METAVARS = {int: "N", Path: "DIR"}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the base model and its adapters over HTTP",
        description="Every flag can also be set as LORAPLEX_<FLAG> (e.g. LORAPLEX_MAX_BATCH_SIZE=16).",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        origin = typing.get_origin(field.annotation)
        help_text = f"{field.description or ''}{_default_text(field)} [env LORAPLEX_{name.upper()}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %-style
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif origin is typing.Annotated or origin is list:  # comma lists: repeatable flags
            parser.add_argument(flag, dest=name, action="append", help=help_text + " (repeatable)")
        elif origin is typing.Literal:  # the choices shown, checked by Settings: one error line, like other flags
            metavar = "{" + ",".join(typing.get_args(field.annotation)) + "}"
            parser.add_argument(flag, dest=name, metavar=metavar, help=help_text)
        else:
            kind = typing.get_args(field.annotation)[0] if origin is types.UnionType else field.annotation  # X | None
            parser.add_argument(flag, dest=name, metavar=_METAVARS.get(kind), help=help_text)
    fleet = parser.add_argument_group(
        "Ray Serve",
        "several replicas behind one endpoint, routed by adapter (needs the `ray` extra); every "
        "flag above applies to each replica; --host and --port are the endpoint's",
    )
    fleet.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: a local Ray instance, or the cluster at RAY_ADDRESS",
    )
    fleet.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="replicas, one GPU each on a cluster with GPUs "
        "(default: 1); with --max-replicas, the fewest the autoscaler keeps",
    )
    fleet.add_argument("--max-replicas", type=int, metavar="N", help="autoscale up to N replicas by ongoing requests")
    parser.set_defaults(func=run, **dict.fromkeys(Settings.model_fields))


def _default_text(field: typing.Any) -> str:
    # argparse's own defaults stay None (so that LORAPLEX_* variables are not overridden): the default
    # shown is the Settings one.
    default = field.get_default(call_default_factory=True, validated_data={})
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        default = "on" if default else "off"
    elif isinstance(default, Path):
        default = str(default).replace(str(Path.home()), "~", 1)
    return f" (default: {default})"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over LORAPLEX_* variables, which win over defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
    return Settings(**given)


class CannotListen(LoraplexError):
    code = "cannot_listen"


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, listening now: a port in use is found in a millisecond, not after the model loads,
    and no other process can take the port before the server starts (two sockets with SO_REUSEADDR may both
    bind a port on Linux until one listens). Connections made before the server starts wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart past TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        hint = " (is another server running? choose another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"loraplex serve: error: {describe_settings_error(exc)}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    if args.ray or args.replicas is not None or args.max_replicas is not None:
        return _run_ray(args, settings)
    sock = None
    try:  # fail fast on a port in use, a wrong base model or device, before the model loads
        sock = listen_socket(settings.host, settings.port)
        from loraplex.basemodel import check_base_model, resolve_device  # torch: after the port is ours

        resolve_device(settings.device)
        check_base_model(settings.base_model, settings.cache_dir)
    except LoraplexError as exc:
        if sock is not None:
            sock.close()
        print(f"loraplex serve: error: {exc}", file=sys.stderr)
        return 2

    import os
    import signal

    import uvicorn

    from server.api.connections import connections_allowed, raise_open_files_limit, server_protocol
    from server.app import create_app
    from server.runtime import freeze_heap

    max_connections = connections_allowed(settings.max_connections, raise_open_files_limit())
    if max_connections < settings.max_connections:
        log.warning(
            "at most %d connections, not --max-connections %d: the limit on open files (ulimit -Hn) is lower",
            max_connections,
            settings.max_connections,
        )

    # a model that fails to load after the port opened stops the server like Ctrl-C, with exit code 1
    app = create_app(settings, on_fatal=lambda: os.kill(os.getpid(), signal.SIGINT), on_ready=freeze_heap)
    protocol = server_protocol(
        max_connections,
        settings.max_connections_per_client,
        settings.max_unsent_mb << 20,
        settings.head_timeout_s,
        settings.stall_timeout_s,
    )
    app.state.metrics.watch_connections(protocol.cap)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (Ctrl-C to stop)", f"[{host}]" if ":" in host else host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level, http=protocol))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it stopped on; uvicorn.run too
        server.run(sockets=[sock])
    gc.unfreeze()  # what freeze_heap kept from the collector is collected at exit, as extension modules expect
    return app.state.exit_code


def _run_ray(args: argparse.Namespace, settings: Settings) -> int:
    replicas = 1 if args.replicas is None else args.replicas
    problem = None
    if not args.ray:
        problem = "--replicas and --max-replicas need --ray"
    elif replicas < 1 or (args.max_replicas is not None and args.max_replicas < replicas):
        problem = "--replicas must be >= 1, and --max-replicas >= --replicas"
    elif importlib.util.find_spec("ray") is None:
        problem = "--ray needs Ray Serve: pip install 'loraplex[ray]'"
    if problem is not None:
        print(f"loraplex serve: error: {problem}", file=sys.stderr)
        return 2
    from server.fleet import ray_serve

    return ray_serve.run(settings, replicas, args.max_replicas)
