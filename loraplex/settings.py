"""The one configuration class. Read once at start-up; every other module receives values from it."""

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loraplex.errors import validation_message

CommaList = Annotated[list[str], NoDecode]


def _user_dir(kind: str) -> Path:
    # XDG-style defaults without reading the environment outside this class: pydantic-settings
    # overrides them with LORAPLEX_CACHE_DIR / LORAPLEX_ADAPTER_DIR.
    base = Path.home() / (".cache" if kind == "cache" else ".local/share")
    return base / "loraplex" / ("" if kind == "cache" else "adapters")


ENV_PREFIX = "LORAPLEX_"
# the rest of a variable Kubernetes gives every pod of a namespace for its Service named loraplex (service links)
_SERVICE_LINK = re.compile(r"service_(host|port(_.+)?)|port_\d+_(tcp|udp|sctp)(_.+)?")


class Settings(BaseSettings):
    """Every `loraplex serve` flag, also readable as `LORAPLEX_<FLAG>` (lists comma-separated)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    base_model: str | None = Field(
        None, description="Hub id or local directory of the base model; empty: the embedded SmolLM2-135M."
    )
    served_model_name: str | None = Field(None, description="Name shown in /v1/models (default: derived).")
    adapter_dir: Path = Field(
        default_factory=lambda: _user_dir("data"),
        description="The adapter store, a directory several servers may share; with --adapter-store: this server's "
        "cache of it.",
    )
    adapter_store: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix: keep adapters in S3-compatible storage (endpoint, region and credentials "
        "from the usual AWS_* variables; needs loraplex[s3]); empty: the directory --adapter-dir.",
    )
    store_refresh_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Seconds between checks of the adapter store for versions other servers "
        "added or deleted: how long a deleted version may still start requests here (a name or version not "
        "known here is looked up at once).",
    )
    store_in_use_ttl_s: float = Field(
        30.0,
        ge=3,
        le=86400,
        description="Seconds a server's record in the adapter store of the adapter versions it uses (leased by a "
        "request, loading, or pinned) counts after it was last written: a prune of old versions through any server "
        "sharing the store keeps those that live records name. A server rewrites its record every third of this while "
        "it uses any version and removes it when it stops; an older record (its server crashed, or cannot reach the "
        "store) is deleted by the next prune that reads it. Give every server sharing a store the same value.",
    )
    store_cache_mb: int = Field(
        8192, ge=1, description="With --adapter-store: local disk cache of the versions this server serves, in MiB."
    )
    cache_dir: Path = Field(
        default_factory=lambda: _user_dir("cache"), description="Where the embedded model is converted, once."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Requests running at once (KV cache rows); default: what half the memory free after the "
        "model holds (the GPU's, or a CPU's available RAM), at most 256 on a GPU and 32 on a CPU.",
    )
    max_queue: int = Field(
        256,
        ge=0,
        description="Waiting requests before new ones get 429. Shared between clients (API keys, or peer addresses "
        "on a server without keys): when it is full, a client holding fewer waiting requests takes the place of the "
        "newest request of the client holding the most, which gets the 429.",
    )
    max_queue_per_adapter: int | None = Field(
        None,
        ge=1,
        description="Waiting requests for one adapter (the base model counts as one) before its new ones get 429 "
        "while other adapters' are still queued, so that one tenant's flood cannot fill the queue: half of the "
        "queue keeps the other half for the other tenants. Shared between clients as the queue is. At most "
        "--max-queue; default: no share, so that a server of one adapter keeps its whole queue.",
    )
    max_requests_per_client: int | None = Field(
        None,
        ge=1,
        description="Requests one client may have being tokenized, compiling a grammar, loading an adapter, waiting "
        "or running at once (its /tokenize and /detokenize requests included) before its new ones get 429 while other "
        "clients' are admitted, so that one client's flood can take neither the queue, whatever adapters it names, "
        "nor the tokenizer's or the grammar compiler's threads. "
        "A client is an API key (--api-key), or on a server without keys a peer address (behind a proxy, one "
        "client); default: no share.",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Client connections open at once. Past it a new connection closes the one that has waited "
        "longest for a request (idle, or sending its request head slowly), or is closed itself when every "
        "connection has a request under way. At most the open-files limit less 256 kept for files.",
    )
    max_connections_per_client: int | None = Field(
        None,
        ge=1,
        description="Connections one peer address may hold open; past it its new ones are closed, so that one "
        "client cannot hold every connection (behind a proxy, one address is everyone); default: no share.",
    )
    head_timeout_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="Seconds a connection has to send a whole request head, new or kept alive between requests; "
        "past it the connection is closed (a client that sends part of a head and then nothing holds a connection).",
    )
    stall_timeout_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Seconds a client may take no byte of its answer before its connection is reset and its "
        "request cancelled (nginx's send_timeout): a client that stops reading holds its connection and its answer.",
    )
    max_unsent_mb: int = Field(
        512,
        ge=1,
        description="MiB of answers waiting in the server for clients that read them slowly or not at all, in all "
        "(an answer with logprobs of 8 choices is ~30 MB): unsent bytes and streams' backlogs (events made and not "
        "yet written, as estimated). Past it the connections whose clients took the fewest bytes a second since they "
        "fell behind are reset, one behind for less than a second last.",
    )
    max_active_adapters: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Adapter slots on the device: the adapters that run at once (a request whose adapter has no "
        "slot waits for one to drain); default: as many slots of the largest rank accepted as a quarter of the "
        "GPU's free memory holds, at most the adapters kept in CPU memory; 8 on a CPU.",
    )
    max_cpu_adapters: int = Field(64, ge=1, description="Adapters kept in CPU memory (>= max-active-adapters).")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="Largest adapter rank accepted (slots are padded to it).")
    max_seq_len: int = Field(2048, ge=16, description="Longest prompt + completion per request (KV rows).")
    max_prefill_tokens: int = Field(
        512,
        ge=1,
        description="Prompt tokens per engine step, run in the same forward as one token of every running "
        "request: lower keeps running streams smoother while new prompts arrive, higher gives first tokens sooner.",
    )
    max_adapter_mb: int = Field(512, ge=1, description="Largest accepted adapter upload, in MiB.")
    switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Longest a thread running Python keeps the interpreter lock from a thread waiting for it. The "
        "engine's thread lets the lock go at each wait on the device and waits for it back while the event loop "
        "serves requests: Python's default of 5 ms would delay the engine's steps under load.",
    )
    max_concurrent_uploads: int = Field(
        4,
        ge=1,
        le=1024,
        description="Adapter uploads in progress at once, each keeping copies of up to --max-adapter-mb on disk "
        "until it ends: one more gets 429.",
    )
    max_uploads_per_client: int | None = Field(
        None,
        ge=1,
        description="Adapter uploads one client may have in progress at once before its next gets 429 while other "
        "clients' are taken, so that one client cannot hold every upload slot. A client is the key it sends "
        "(--admin-key), or on a server without keys a peer address (behind a proxy, one client); at most "
        "--max-concurrent-uploads; default: no share.",
    )
    max_versions_per_adapter: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Versions kept per adapter name: after each upload, the name's oldest versions beyond this many "
        "are deleted (at most 64 an upload), except those in use (leased by a running or queued request, loading, or "
        "pinned) on this server or another sharing the store; they are pruned at a later upload once free. The "
        "newest, which the name serves, always stays. Default: every version is kept.",
    )
    max_request_mb: int = Field(
        4, ge=1, description="Largest request body of the other routes (JSON), in MiB: a larger one gets 413."
    )
    api_key: CommaList = Field(default_factory=list, description="Inference keys (comma-separated in the variable).")
    admin_key: CommaList = Field(default_factory=list, description="Keys that may also upload and delete adapters.")
    preload: CommaList = Field(default_factory=list, description="Adapters to load (and pin) at start.")
    open_metrics: bool = Field(
        False,
        description="Serve /metrics without a key even when keys are configured: for scrapers that send "
        "none (the inference gateway's endpoint picker); then limit who reaches the port (it lists adapter names).",
    )
    cuda_graphs: bool = Field(True, description="Capture every engine step in CUDA graphs (CUDA only).")
    prefix_cache: bool = Field(
        True,
        description="Start a prompt's prefill past the tokens it shares with a prompt the KV cache holds (a running "
        "or recent request's, same adapter): shared system prompts and chat turns are computed once. Prefixes are "
        "shared within one API key only (between everyone on a server without keys) and within one cache_salt.",
    )
    fused_kernels: bool = Field(
        True,
        description="Run the LoRA deltas, RMSNorms, rotary embeddings and NF4 projections of steps of up to 256 "
        "tokens as Triton and CUDA kernels (CUDA only).",
    )
    tool_call_parser: Literal["off", "hermes"] = Field(
        "off",
        description='Answer OpenAI tool_choice "auto" (the default where tools are sent: text or calls, as the model '
        "chooses) by generating freely and reading the model's calls out of its text in this format, as vLLM's auto "
        'tool choice does: hermes, <tool_call>{"name": ..., "arguments": ...}</tool_call> (Hermes 2 Pro, Qwen2.5 '
        'and many models tuned from them). off: "auto" is refused with a 422 saying what to send instead '
        '("required", a named function or "none", which run through the grammar engine).',
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, values: object) -> object:
        # pydantic-settings skips a LORAPLEX_* variable that names no setting: a misspelt LORAPLEX_ADMIN_KEYS would
        # start a server without keys, whose adapters anyone may upload and delete
        for variable in os.environ:
            setting = variable.upper().removeprefix(ENV_PREFIX).lower()
            if variable.upper().startswith(ENV_PREFIX) and setting not in cls.model_fields:
                close = difflib.get_close_matches(setting, cls.model_fields, n=1)
                hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
                if _SERVICE_LINK.fullmatch(setting):
                    hint = " (Kubernetes sets it for a Service named loraplex: give the pod enableServiceLinks: false)"
                raise ValueError(
                    f"unknown variable {variable}{hint}: every {ENV_PREFIX}* variable sets the `loraplex serve` flag "
                    "of its name (`loraplex serve --help` lists them)"
                )
        return values

    @field_validator("api_key", "admin_key", "preload", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # "a,b" from the environment, or ["a,b", "c"] from repeated flags: both give ["a", "b", "c"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]

    @field_validator("base_model", "served_model_name", "adapter_store", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _adapter_share_of_the_queue(self) -> "Settings":
        # No share by default: a share refuses a lone adapter's (or the base model's) traffic at it too, which would
        # cut the queue of every server of one adapter; admission is round-robin over adapters either way
        if self.max_queue_per_adapter is not None and self.max_queue_per_adapter > self.max_queue:
            raise ValueError(
                f"max_queue_per_adapter ({self.max_queue_per_adapter}) must be <= max_queue ({self.max_queue}): "
                "one adapter's share of the waiting queue cannot exceed the queue"
            )
        return self

    @model_validator(mode="after")
    def _client_share_of_the_uploads(self) -> "Settings":
        if self.max_uploads_per_client is not None and self.max_uploads_per_client > self.max_concurrent_uploads:
            raise ValueError(
                f"max_uploads_per_client ({self.max_uploads_per_client}) must be <= max_concurrent_uploads "
                f"({self.max_concurrent_uploads}): one client's share of the upload slots cannot exceed them"
            )
        return self

    @model_validator(mode="after")
    def _cpu_tier_holds_active(self) -> "Settings":
        if self.max_active_adapters is not None and self.max_cpu_adapters < self.max_active_adapters:
            raise ValueError(
                f"max_cpu_adapters ({self.max_cpu_adapters}) must be >= max_active_adapters "
                f"({self.max_active_adapters}): every active adapter also keeps its CPU copy"
            )
        return self


def describe_settings_error(exc: ValidationError, *, flags: bool = True) -> str:
    """One line: each wrong setting as its flag and variable (only its variable with flags=False, for a command
    without these flags), and each check of several settings or of the environment by its own message."""
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # its message names what it checks
            parts.append(validation_message(err))
            continue
        field = str(err["loc"][0])
        variable = f"{ENV_PREFIX}{field.upper()}"
        parts.append(
            f"--{field.replace('_', '-')} ({variable}): {err['msg']}" if flags else f"{variable}: {err['msg']}"
        )
    return "; ".join(parts)
