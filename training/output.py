"""The finished adapter: a PEFT directory plus training.json, the metadata the server keeps in its manifest."""

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.fingerprint import base_fingerprint
from adapters.validate import CONFIG_FILE, TRAINING_FILE, WEIGHTS_FILE
from training.checkpoint import fsync_dir
from training.config import RUN_SETTINGS, TrainConfig
from training.data import Dataset
from training.errors import TrainingError
from training.loop import FitResult
from training.model import target_module_names


def write_adapter(
    model: PeftModel,
    config: TrainConfig,
    dataset: Dataset,
    fit: FitResult,
    *,
    base_source: str,
    base_commit: str | None = None,
    world: int,
) -> Path:
    """adapter_config.json + adapter_model.safetensors (safetensors only) + training.json in config.output,
    fsynced and read back, so that the checkpoints may go once this returns."""
    config.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.output, safe_serialization=True)
    # safetensors writes its file with mode 0600 whatever the umask; give it the mode the umask gave the
    # config next to it, so whoever may read the adapter directory may read all of it.
    os.chmod(config.output / WEIGHTS_FILE, stat.S_IMODE((config.output / CONFIG_FILE).stat().st_mode))
    trained_modules = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    fingerprint = base_fingerprint(model)
    touched = [name.removeprefix("base_model.model.").removesuffix(".lora_A") for name in trained_modules]
    metadata: dict[str, Any] = {
        "base_model": {
            "source": base_source,
            **({"commit": base_commit} if base_commit else {}),  # a hub id's: the repository's commit trained on
            **fingerprint.restrict(touched).model_dump(mode="json"),
        },
        "dataset": {
            "file": config.data.name,
            "sha256": dataset.sha256,
            "rows": len(dataset.rows),
            "format": dataset.format,
        },
        "hyperparameters": {
            **config.model_dump(mode="json", include=set(RUN_SETTINGS)),
            "target_modules": target_module_names(model),
            "processes": world,
        },
        "results": {
            "steps": fit.steps,
            "first_loss": fit.first_loss,
            "final_loss": fit.final_loss,
            "eval_loss": fit.eval_loss,
            "trained_tokens": fit.trained_tokens,
            "real_tokens": fit.real_tokens,
            "seconds": round(fit.seconds, 3),
            "peak_memory_bytes": fit.peak_memory_bytes,
            # each resume: the step it went on from, and the settings --force-resume let change there
            "resumed": [resume.model_dump(mode="json") for resume in fit.resumes],
        },
    }
    (config.output / TRAINING_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    fsync_dir(config.output)
    _check_written(config.output / WEIGHTS_FILE, model, config)
    return config.output


def _check_written(path: Path, model: PeftModel, config: TrainConfig) -> None:
    """The weights file holds exactly the trained LoRA weights; else the checkpoints must stay."""
    expected = get_peft_model_state_dict(model)
    try:
        written = load_file(path)
    except (OSError, SafetensorError) as exc:
        why = str(exc)
    else:
        same = written.keys() == expected.keys() and all(torch.equal(written[k], expected[k].cpu()) for k in expected)
        if same:
            return
        why = "other weights than the trained ones"
    raise TrainingError(
        f"{path} does not read back as written ({why}); check the disk and run again, with --resume if "
        f"{config.checkpoint_dir} holds checkpoints"
    )
