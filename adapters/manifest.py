"""Adapter names, references (`name` / `name@N`) and the manifest stored next to every version."""

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from adapters.errors import InvalidAdapterName
from adapters.fingerprint import BaseFingerprint

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_REF = re.compile(r"^(?P<name>[^@]+)(?:@(?P<version>[1-9][0-9]{0,8}))?$")

Origin = Literal["uploaded", "trained"]


def _json_text(value: Any) -> str:
    if not isinstance(value, dict):
        raise ValueError("training metadata is a JSON object")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Training metadata as its compact JSON text, written and answered as the object it is: every version's manifest is
# held in memory, and 16,384 JSON values as Python objects took ~1.4 MB a version (an 85 KB training.json), as text
# its size (300 versions of one adapter had grown a server by 410 MB)
TrainingMetadata = Annotated[str, BeforeValidator(_json_text), PlainSerializer(json.loads, return_type=dict[str, Any])]


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


def adapter_key(name: str, version: int) -> str:
    return f"{name}@{version}"


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    base: BaseFingerprint  # architecture and the shapes of the targeted modules only
    rank: int  # the largest rank over modules (rank_pattern may vary it)
    alpha: float
    use_rslora: bool
    target_modules: list[str]  # module suffixes, e.g. ["q_proj", "v_proj"]
    size_bytes: int  # config + weights as stored
    sha256: str  # of the canonical content: identical uploads hash alike
    created_at: datetime
    origin: Origin
    training: TrainingMetadata | None = None  # free-form, for trained adapters

    @property
    def key(self) -> str:
        return adapter_key(self.name, self.version)
