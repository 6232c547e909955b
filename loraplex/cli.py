"""The `loraplex` console command: one subcommand per area, each registered by its own package.

Registering a subcommand imports nothing heavy: torch, transformers and the server load inside the command
that needs them, so `--help` and the adapter commands start in a fraction of a second.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from adapters import cli as adapters_cli
from loraplex.logs import quiet_third_party
from server import cli as serve_cli
from training import cli as train_cli


class WholeFlags(argparse.ArgumentParser):
    """A parser that takes flags written whole, never abbreviated (argparse's default): `--max-seq` read as
    --max-seq-len would mean another flag, or none, once a flag beginning so is added. The subcommands' parsers
    are of this class too: argparse makes them of their parent's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = WholeFlags(
        prog="loraplex", description="Serve many LoRA adapters from one NF4 base model, and train new ones."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,train,adapters}")
    serve_cli.register(sub)
    train_cli.register(sub)
    adapters_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the user knows why it stopped; where it was in the code tells them nothing
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
