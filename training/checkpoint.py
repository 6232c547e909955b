"""Checkpoints: the adapter, optimizer, scheduler, RNG states and step, written atomically.

Only LoRA weights are saved (not the frozen base), so a checkpoint is megabytes. Only the newest is kept.
"""

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from training.errors import TrainingError

STATE_FILE = "trainer_state.pt"
PREFIX = "step-"


@dataclass(frozen=True)
class Resumed:
    step: int
    tokens: int  # trained tokens so far, so tokens/s and the summary stay right across a resume


def save_checkpoint(
    root: Path,
    step: int,
    tokens: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    target = root / f"{PREFIX}{step:07d}"
    staging = root / f".{PREFIX}{step:07d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    state = {
        "step": step,
        "tokens": tokens,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    torch.save(state, staging / STATE_FILE)
    staging.rename(target)  # a crash mid-write leaves a .partial dir, never a checkpoint that looks whole
    for old in root.glob(f"{PREFIX}*"):
        if old != target:
            shutil.rmtree(old)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob(f"{PREFIX}*"))
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Resumed:
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(path / "adapter_model.safetensors")
    except (OSError, RuntimeError) as exc:
        raise TrainingError(f"checkpoint {path} cannot be read: {exc}") from exc
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise TrainingError(f"checkpoint {path} does not match the model (was the LoRA config changed?)")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Resumed(state["step"], state["tokens"])


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
