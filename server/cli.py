"""`loraplex serve`: flags generated from the Settings fields, so flag and LORAPLEX_<FLAG> never drift."""

import argparse
import logging
import sys
import typing

from pydantic import ValidationError

from loraplex.basemodel import check_base_model, resolve_device
from loraplex.errors import LoraplexError
from loraplex.settings import Settings

log = logging.getLogger("loraplex")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the base model and its adapters over HTTP",
        description="Every flag can also be set as LORAPLEX_<FLAG> (e.g. LORAPLEX_MAX_BATCH_SIZE=16).",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        origin = typing.get_origin(field.annotation)
        help_text = (field.description or "") + f" [env LORAPLEX_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif origin is typing.Annotated or origin is list:  # comma lists: repeatable flags
            parser.add_argument(flag, dest=name, action="append", help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, dest=name, help=help_text)
    parser.set_defaults(func=run, **dict.fromkeys(Settings.model_fields))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over LORAPLEX_* variables, which win over defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
    return Settings(**given)


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        where = f"--{field.replace('_', '-')} (LORAPLEX_{field.upper()})" if field else "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"loraplex serve: error: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail fast on a wrong base model or device before the port opens
        resolve_device(settings.device)
        check_base_model(settings.base_model, settings.cache_dir)
    except LoraplexError as exc:
        print(f"loraplex serve: error: {exc}", file=sys.stderr)
        return 2

    import os
    import signal

    import uvicorn

    from server.app import create_app

    # a model that fails to load after the port opened stops the server like Ctrl-C, with exit code 1
    app = create_app(settings, on_fatal=lambda: os.kill(os.getpid(), signal.SIGINT))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return app.state.exit_code
