"""The manifest stored next to every version of an adapter."""

import json
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from adapters.fingerprint import BaseFingerprint
from adapters.names import NAME_PATTERN

Origin = Literal["uploaded", "trained"]


def _json_text(value: Any) -> str:
    if not isinstance(value, dict):
        raise ValueError("training metadata is a JSON object")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Training metadata as its compact JSON text, written and answered as the object it is: every version's manifest is
# held in memory, and 16,384 JSON values as Python objects took ~1.4 MB a version (an 85 KB training.json), as text
# its size (300 versions of one adapter had grown a server by 410 MB)
TrainingMetadata = Annotated[str, BeforeValidator(_json_text), PlainSerializer(json.loads, return_type=dict[str, Any])]


def compact_json(value: Any) -> bytes:
    """`value` as the server's JSON answers write it (compact UTF-8, no NaN): answers built from parts, such as the
    adapter listing, are byte for byte what the whole would have been."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


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

    @cached_property
    def listing_json(self) -> bytes:
        """The manifest without its training metadata, as compact JSON: its entry in the adapter listing. Built once,
        as a version never changes: a page of a thousand all-linear adapters (~210 modules each, every one's shapes)
        took ~0.2 s of CPU to build and encode at every listing."""
        return compact_json(self.model_dump(mode="json", exclude={"training"}))
