"""`loraplex adapters push|list|versions|rm`: manage a running server's adapters."""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from adapters.client import DEFAULT_SERVER, AdminClient, AdminClientError, PushedManifest


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser("adapters", help="upload, list and remove adapters on a running server")
    commands = parser.add_subparsers(dest="adapters_command", required=True, metavar="{push,list,versions,rm}")

    push = commands.add_parser("push", help="upload a PEFT adapter directory (or a .tar.gz / .zip of one)")
    push.add_argument(
        "dir", help="PEFT directory (adapter_config.json + adapter_model.safetensors), or a .tar.gz / .zip of one"
    )
    push.add_argument("--name", required=True, help="adapter name; pushing new content adds a version")
    push.set_defaults(func=_runner(_push))

    listing = commands.add_parser("list", help="list adapters and their newest versions")
    listing.set_defaults(func=_runner(_list))

    versions = commands.add_parser("versions", help="list every version of an adapter, oldest first")
    versions.add_argument("name", metavar="NAME")
    versions.set_defaults(func=_runner(_versions))

    rm = commands.add_parser("rm", help="delete NAME (every version) or NAME@N")
    rm.add_argument("ref", metavar="NAME[@N]")
    rm.set_defaults(func=_runner(_rm))

    for command in (push, listing, versions, rm):
        command.add_argument("--server", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})")
        command.add_argument("--api-key", default=None, help="an admin key, when the server has keys")


def _runner(command: Callable[[AdminClient, argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            with AdminClient(args.server, args.api_key) as client:
                command(client, args)
        except AdminClientError as exc:
            print(f"error: {describe_error(exc)}", file=sys.stderr)
            return 1
        return 0

    return run


def describe_error(exc: AdminClientError) -> str:
    """The client's error as a command line says it: a key missing or refused names the flag that gives one (the
    server's own message speaks HTTP, of the header a key goes in)."""
    if exc.http_status == 401:
        return f"{exc}; give an admin key with --api-key KEY"
    if exc.http_status == 403:  # the message says that an admin key is needed
        return f"{exc}: give one with --api-key KEY"
    return str(exc)


def describe_push(manifest: PushedManifest) -> str:
    """One line for a push, here and after `loraplex train --push`."""
    ref = f"{manifest['name']}@{manifest['version']}"
    facts = f"rank {manifest['rank']}, sha256 {manifest['sha256'][:12]}"
    if manifest.created:
        return f"pushed {ref} ({facts})"
    # the server answers this only for the name's newest version, the one `name` serves: pushing an older version's
    # content stores it anew
    return f"already stored as {ref}, the same content as the name's newest version ({facts}): no new version"


def _push(client: AdminClient, args: argparse.Namespace) -> None:
    print(describe_push(client.push(args.dir, args.name)))


def _list(client: AdminClient, args: argparse.Namespace) -> None:
    manifests = client.list()
    if not manifests:
        print("no adapters")
        return
    rows = [_row(m, client) for m in manifests]
    widths = [max(len(r[i]) for r in [*rows, _HEADER]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# NAME serves the newest version (the last of VERSIONS, whose facts the other columns show); NAME@N any other.
_HEADER = ("NAME", "VERSIONS", "RANK", "ORIGIN", "SIZE", "CREATED")
# the newest versions a row shows (one request a name, however many it has); `versions NAME` lists them all
_SHOWN_VERSIONS = 8


def _row(m: dict[str, Any], client: AdminClient) -> tuple[str, ...]:
    try:
        page = client.version_page(m["name"], versions_limit=_SHOWN_VERSIONS)
    except AdminClientError as exc:
        if exc.code != "adapter_not_found":
            raise
        versions = "deleted"  # removed between the listing and this request
    else:
        versions = ",".join(str(v["version"]) for v in reversed(page["versions"]))
        if page["versions_next"] is not None:
            versions = f"...,{versions} (of {page['versions_total']})"
    size = f"{m['size_bytes'] / 2**20:.1f} MiB"
    return (m["name"], versions, str(m["rank"]), m["origin"], size, m["created_at"][:19])


def _versions(client: AdminClient, args: argparse.Namespace) -> None:
    for v in client.versions(args.name):
        print(f"{args.name}@{v['version']}  {v['state']:<8}  {v['created_at'][:19]}  sha256 {v['sha256'][:12]}")


def _rm(client: AdminClient, args: argparse.Namespace) -> None:
    count = client.remove(args.ref)
    print(f"deleted {args.ref}" + (f" ({count} versions)" if count != 1 else ""))
