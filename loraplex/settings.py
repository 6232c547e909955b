"""The one configuration class. Read once at start-up; every other module receives values from it."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _user_dir(kind: str) -> Path:
    # XDG-style defaults without reading the environment outside this class: pydantic-settings
    # overrides them with LORAPLEX_CACHE_DIR / LORAPLEX_ADAPTER_DIR.
    base = Path.home() / (".cache" if kind == "cache" else ".local/share")
    return base / "loraplex" / ("" if kind == "cache" else "adapters")


class Settings(BaseSettings):
    """Every `loraplex serve` flag, also readable as `LORAPLEX_<FLAG>` (lists comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid", validate_default=True)

    base_model: str | None = Field(
        None, description="Hub id or local directory of the base model; empty: the embedded SmolLM2-135M."
    )
    served_model_name: str | None = Field(None, description="Name shown in /v1/models (default: derived).")
    adapter_dir: Path = Field(default_factory=lambda: _user_dir("data"))
    cache_dir: Path = Field(default_factory=lambda: _user_dir("cache"))
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_queue: int = Field(256, ge=0)
    max_active_adapters: int = Field(8, ge=1, le=1024)
    max_cpu_adapters: int = Field(64, ge=1)
    max_lora_rank: int = Field(64, ge=1, le=1024)
    max_seq_len: int = Field(2048, ge=16, description="Longest prompt + completion per request (KV rows).")
    max_prefill_tokens: int = Field(
        4096, ge=1, description="Prompt tokens prefilled in one engine step: lower streams running requests more "
        "smoothly while new ones arrive, higher gives new requests their first token sooner."
    )
    max_adapter_mb: int = Field(512, ge=1, description="Largest accepted adapter upload, in MiB.")
    api_key: CommaList = Field(default_factory=list)
    admin_key: CommaList = Field(default_factory=list)
    preload: CommaList = Field(default_factory=list)
    cuda_graphs: bool = Field(True, description="Capture the decode step in CUDA graphs (CUDA only).")
    fused_kernels: bool = Field(
        True,
        description="Run the decode step's LoRA deltas, RMSNorms, rotary embeddings and NF4 projections (up to 64 "
        "rows) as Triton kernels (CUDA)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_key", "admin_key", "preload", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # "a,b" from the environment, or ["a,b", "c"] from repeated flags: both give ["a", "b", "c"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]

    @field_validator("base_model", "served_model_name", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _cpu_tier_holds_active(self) -> "Settings":
        if self.max_cpu_adapters < self.max_active_adapters:
            raise ValueError(
                f"max_cpu_adapters ({self.max_cpu_adapters}) must be >= max_active_adapters "
                f"({self.max_active_adapters}): every active adapter also keeps its CPU copy"
            )
        return self
