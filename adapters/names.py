"""Adapter names and references (`name` / `name@N`): the server's rules, light enough for the CLI to check a
reference before it becomes a URL (no torch)."""

import re

from adapters.errors import InvalidAdapterName

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# What parse_ref takes, as one pattern: a name, then optionally its version (what the HTTP schema states)
REF_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}(@[1-9][0-9]{0,8})?$"
_NAME = re.compile(NAME_PATTERN)
_REF = re.compile(r"^(?P<name>[^@]+)(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def is_name(name: str) -> bool:
    """Whether an adapter may be called `name`."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not is_name(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'support-bot' -> ('support-bot', None) (the newest version); 'support-bot@3' -> ('support-bot', 3)."""
    match = _REF.fullmatch(ref)
    if match is None:
        raise InvalidAdapterName(f"invalid adapter reference {ref!r}: use NAME or NAME@VERSION, e.g. bot@2")
    version = match["version"]
    return check_name(match["name"]), int(version) if version else None
