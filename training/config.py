"""The one training configuration: flags and an optional YAML file merged into a validated pydantic model."""

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from adapters.errors import InvalidAdapterName
from adapters.names import check_name
from loraplex.errors import validation_message
from training.errors import TrainingError

DataFormat = Literal["auto", "chat", "prompt-completion", "text"]
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer except the output head (QLoRA's advice)
# The settings that shape what is trained: kept with the adapter in training.json, and part of the fingerprint
# a resume must match. Paths, credentials, logging and checkpoint cadence are left out: they change no weight.
RUN_SETTINGS = (
    "format",
    "chat_template",
    "epochs",
    "max_steps",
    "lr",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "rank",
    "alpha",
    "dropout",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "eval_fraction",
    "seed",
)


class TrainConfig(BaseModel):
    """Every `loraplex train` flag; a YAML config uses the same keys (hyphens or underscores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="JSONL file: {messages}, {prompt, completion} or {text} rows.")
    output: Path = Field(description="Directory for the adapter, training.json and checkpoints.")
    base_model: str | None = Field(None, description="Hub id or local directory; empty: the embedded model.")
    cache_dir: Path | None = Field(None, description="Model cache (default: the server's cache directory).")
    format: DataFormat = Field("auto", description="Row format; auto: detected from the first row.")
    chat_template: bool = Field(
        False,
        description="Render prompt/completion rows with the base model's chat template (the prompt as the user "
        "turn, the completion as the assistant turn), for adapters used through /v1/chat/completions.",
    )
    epochs: int = Field(1, ge=1, description="Passes over the training rows.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate; cosine decay after the warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ALL_LINEAR, description=f"Comma-separated module names, or {ALL_LINEAR}: every linear layer but the head."
    )
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(1024, ge=2, description="Tokens per row; longer rows are truncated.")
    gradient_checkpointing: bool = Field(
        True,
        description="On CUDA, recompute each layer's activations in the backward pass instead of keeping them: "
        "a fraction of the memory; off trains faster where the GPU holds them all (CPU runs always keep them).",
    )
    checkpoint_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With gradient checkpointing: the share of the decoder layers recomputed (the first ones, "
        "rounded up); the rest keep their activations. Between 1 and 0 the speed and the memory go from "
        "checkpointing's to --no-gradient-checkpointing's, about in proportion.",
    )
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the rows held out for an eval loss.")
    eval_every: int = Field(50, ge=1, description="Optimizer steps between eval losses.")
    save_every: int = Field(100, ge=1, description="Optimizer steps between checkpoints.")
    log_every: int = Field(10, ge=1, description="Optimizer steps between log lines when the progress bar is off.")
    seed: int = Field(0, description="Seed of the LoRA initialisation, the data order and the eval split.")
    resume: bool = Field(
        False,
        description="Continue from the newest intact checkpoint in OUTPUT/checkpoints (the previous one if the "
        "newest is damaged); refused if the data or settings differ from the checkpoint's.",
    )
    force_resume: bool = Field(
        False,
        description="With --resume: continue even though the data or settings differ from the checkpoint's; "
        "training.json records what changed.",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep OUTPUT/checkpoints after the adapter is written (removed by default)."
    )
    overwrite: bool = Field(
        False,
        description="Train into an OUTPUT that already holds an adapter, replacing it at the end (refused by "
        "default, so that a command run again does not lose a finished adapter).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    push: str | None = Field(
        None, description="Server URL to upload the finished adapter to (checked before training starts)."
    )
    name: str | None = Field(None, description="Adapter name on the server (with --push).")
    api_key: str | None = Field(None, description="An admin key of the server (with --push).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        # Sorted and unique: the order names no different layers, so two spellings of one set are one run.
        if isinstance(value, str) and value != ALL_LINEAR:
            value = value.split(",")
        if isinstance(value, list) and all(isinstance(part, str) for part in value):  # else pydantic says why
            return sorted({part.strip() for part in value if part.strip()})
        return value

    @field_validator("base_model", "push", "name", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _push_needs_name(self) -> "TrainConfig":
        if self.push and not self.name:
            raise ValueError("--push needs --name: the name the adapter gets on the server")
        if self.name:
            try:  # a bad name is found now, not after hours of training
                check_name(self.name)
            except InvalidAdapterName as exc:
                raise ValueError(str(exc)) from None
        if self.target_modules != ALL_LINEAR and not self.target_modules:
            raise ValueError("--target-modules is empty")
        if self.force_resume and not self.resume:
            raise ValueError("--force-resume only applies with --resume")
        if self.checkpoint_share < 1 and not self.gradient_checkpointing:
            raise ValueError("--checkpoint-share only applies with gradient checkpointing: drop one of the two")
        return self

    @property
    def checkpoint_dir(self) -> Path:
        # imported here: adapters.validate loads torch, which `loraplex train --help` must not wait for
        from adapters.validate import CHECKPOINTS_DIR

        return self.output / CHECKPOINTS_DIR


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TrainingError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TrainingError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise TrainingError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Flags given on the command line override the file; anything unknown or out of range is one error."""
    merged = {**file_values, **{key: value for key, value in flag_values.items() if value is not None}}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        first: dict[tuple, ErrorDetails] = {}
        for error in exc.errors():  # one per option: a union type (--target-modules) fails once per alternative
            first.setdefault(error["loc"][:1], error)
        raise TrainingError("; ".join(_describe(error) for error in first.values())) from exc


def _describe(error: ErrorDetails) -> str:
    if not error["loc"]:  # a check of several options: its message names them
        return validation_message(error)
    option = str(error["loc"][0])  # not pydantic's path into the option's type ('target_modules.list[str].1')
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(option, TrainConfig.model_fields, n=1)
        return f"unknown training option {option!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"invalid training option {option!r}: {error['msg']}"
