"""Checkpoints: the adapter, optimizer, scheduler, RNG states and the run's counters, written durably.

Only LoRA weights are saved (not the frozen base), so a checkpoint is megabytes. A checkpoint counts only
if its manifest (checkpoint.json: the sha256 of every other file, the run's fingerprint and counters) is
there and its files still hash as listed. The manifest is written last; every file and the directory are
fsynced before the rename that makes the checkpoint visible, and the parent after it. The last two good
checkpoints are kept, so a damaged newest one falls back to the one before it.
"""

import hashlib
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.errors import first_line
from training.config import TrainConfig
from training.errors import CheckpointDamaged, TrainingError
from training.fingerprint import BASE_WEIGHTS, Fingerprint, describe, differences

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint.json"
PREFIX = "step-"
_STAGING_SUFFIX = ".partial"
_HASHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE)


class Resume(BaseModel):
    """One resume of the run: the step it went on from, and what --force-resume let change there."""

    model_config = ConfigDict(frozen=True)

    from_step: int
    changed: dict[str, tuple[Any, Any]] = {}  # setting -> (the checkpoint's value, the value resumed with)


class Progress(BaseModel):
    """The run's counters up to `step`, all processes and all resumes: what the results report."""

    model_config = ConfigDict(frozen=True)

    step: int = 0
    trained_tokens: int = 0
    real_tokens: int = 0
    seconds: float = 0.0  # in the training loop, over every segment of the run (model loading left out)
    first_loss: float | None = None  # of the run's first step, whichever process segment took it
    peak_memory_bytes: int = 0
    resumes: tuple[Resume, ...] = ()


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    progress: Progress
    fingerprint: Fingerprint
    files: dict[str, str]  # file name -> sha256


@dataclass(frozen=True)
class CheckpointPlan:
    """Where the run saves checkpoints and where it starts: decided, and checked, before the model loads."""

    root: Path
    fingerprint: Fingerprint
    start: Progress = field(default_factory=Progress)  # the resume point's counters, this resume recorded
    resume_from: Path | None = None


def plan_checkpoints(config: TrainConfig, fingerprint: Fingerprint, warn: Callable[[str], None]) -> CheckpointPlan:
    """The newest intact checkpoint for --resume (a damaged newest one is skipped with `warn`), else a fresh
    start. Every refusal is a TrainingError of one line that says what to do."""
    root = config.checkpoint_dir
    found = checkpoints(root)
    if not config.resume:
        if found:  # a fresh run would mix its checkpoints with these; the user meant one or the other
            raise TrainingError(
                f"{root} holds checkpoints of an earlier run (newest: {found[0].name}): add --resume to continue "
                f"it, or remove {root} to start afresh"
            )
        return CheckpointPlan(root, fingerprint)
    if not found:
        raise TrainingError(f"--resume: no checkpoint in {root}; run without --resume to start afresh")
    damaged = []
    for path in found:
        try:
            manifest = verify(path)
            break
        except CheckpointDamaged as exc:
            damaged.append(f"{path.name}: {exc}")
    else:
        raise TrainingError(
            f"--resume: no usable checkpoint in {root} ({'; '.join(damaged)}); remove {root} and run without "
            "--resume to start afresh"
        )
    if damaged:
        warn(f"--resume: skipping damaged checkpoint {'; '.join(damaged)}; resuming from {path.name}")
    compared = fingerprint
    # None: not recorded (a checkpoint from before base weights were, or of a hub id's base before it was trained from
    # a snapshot): nothing to compare
    if manifest.fingerprint.get(BASE_WEIGHTS) is None:
        compared = {name: value for name, value in fingerprint.items() if name != BASE_WEIGHTS}
    changes = differences(manifest.fingerprint, compared)
    if BASE_WEIGHTS in changes and not config.force_resume:
        raise TrainingError(
            f"--resume: the base model's weights are not those {path.name} was trained on ({describe(changes)}); "
            f"restore them, or remove {root} and run without --resume to start afresh (--force-resume goes on with "
            "the new weights regardless)"
        )
    if changes and not config.force_resume:
        raise TrainingError(
            f"--resume: {path.name} was written with other data or settings ({describe(changes)}); run with the "
            "checkpoint's data and settings, or add --force-resume to go on with the new ones"
        )
    resume = Resume(from_step=manifest.progress.step, changed=changes)
    start = manifest.progress.model_copy(update={"resumes": (*manifest.progress.resumes, resume)})
    return CheckpointPlan(root, fingerprint, start, path)


def checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories, newest first (the zero-padded step sorts by name)."""
    return sorted(root.glob(f"{PREFIX}*"), reverse=True)


def verify(path: Path) -> Manifest:
    """The manifest of `path` if every file it lists hashes as listed; else CheckpointDamaged saying why."""
    try:
        manifest = Manifest.model_validate_json((path / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise CheckpointDamaged(f"no {MANIFEST_FILE}") from None
    except OSError as exc:
        raise CheckpointDamaged(f"{MANIFEST_FILE}: {exc.strerror}") from None
    except ValidationError:
        raise CheckpointDamaged(f"{MANIFEST_FILE} is not a checkpoint manifest") from None
    if sorted(manifest.files) != sorted(_HASHED_FILES):  # also keeps a bad manifest from naming other paths
        raise CheckpointDamaged(f"{MANIFEST_FILE} lists {sorted(manifest.files)}")
    for name, digest in manifest.files.items():
        try:
            actual = _sha256(path / name)
        except OSError as exc:
            raise CheckpointDamaged(f"{name}: {exc.strerror}") from None
        if actual != digest:
            raise CheckpointDamaged(f"{name} is not as written (sha256 differs)")
    return manifest


def save_checkpoint(
    plan: CheckpointPlan,
    progress: Progress,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    root = plan.root
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{PREFIX}{progress.step:07d}"
    staging = root / f".{target.name}{_STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    torch.save(state, staging / STATE_FILE)
    files = {name: _sha256(staging / name) for name in _HASHED_FILES}
    manifest = Manifest(progress=progress, fingerprint=plan.fingerprint, files=files)
    (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    # Contents on disk before the name: after a power loss the rename may survive while unsynced data does not.
    fsync_dir(staging)
    shutil.rmtree(target, ignore_errors=True)  # a damaged checkpoint of this step, skipped by the resume
    staging.rename(target)
    _fsync(root)
    _prune(root, target)
    return target


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Weights, optimizer, scheduler and RNG states of a verified checkpoint into the run."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(path / WEIGHTS_FILE)
    except (OSError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        # hashes matched, so these files were written so: e.g. by a torch version that this one cannot read
        raise TrainingError(
            f"checkpoint {path} cannot be read ({first_line(exc)}): remove it, and --resume falls back to the "
            "one before"
        ) from exc
    try:
        result = set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:  # only reachable through --force-resume
        raise TrainingError(f"checkpoint {path} does not fit this model ({first_line(exc)})") from exc
    if result.unexpected_keys:
        raise TrainingError(f"checkpoint {path} does not fit this model (were the LoRA targets changed?)")
    _set_rng_state(state["rng"])


def fsync_dir(directory: Path) -> None:
    """fsync every file in `directory`, then the directory itself (its entries)."""
    for path in directory.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def _prune(root: Path, newest: Path) -> None:
    """Keep `newest` and the newest intact checkpoint before it; drop the rest and any unfinished staging."""
    previous = next((p for p in checkpoints(root) if p.name < newest.name and _intact(p)), None)
    for path in [*root.glob(f"{PREFIX}*"), *root.glob(f".{PREFIX}*{_STAGING_SUFFIX}")]:
        if path not in (newest, previous):
            shutil.rmtree(path)


def _intact(path: Path) -> bool:
    try:
        verify(path)
    except CheckpointDamaged:
        return False
    return True


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
