"""`loraplex train` as a script for the DDP test: torchrun starts one copy per process."""

import argparse
import sys

from training import cli

parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
