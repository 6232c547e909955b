"""The finished adapter: a PEFT directory plus training.json, the metadata the server keeps in its manifest."""

import json
import os
import stat
from pathlib import Path
from typing import Any

from peft import PeftModel

from adapters.fingerprint import base_fingerprint
from adapters.validate import CONFIG_FILE, TRAINING_FILE, WEIGHTS_FILE
from training.config import TrainConfig
from training.data import Dataset
from training.loop import FitResult
from training.model import target_module_names

# Hyperparameters worth keeping with the adapter; paths, credentials and run plumbing are left out.
HYPERPARAMETERS = (
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


def write_adapter(
    model: PeftModel,
    config: TrainConfig,
    dataset: Dataset,
    fit: FitResult,
    *,
    base_source: str,
    world: int,
) -> Path:
    """adapter_config.json + adapter_model.safetensors (safetensors only) + training.json in config.output."""
    config.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.output, safe_serialization=True)
    # safetensors writes its file with mode 0600 whatever the umask; give it the mode the umask gave the
    # config next to it, so whoever may read the adapter directory may read all of it.
    os.chmod(config.output / WEIGHTS_FILE, stat.S_IMODE((config.output / CONFIG_FILE).stat().st_mode))
    trained_modules = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    fingerprint = base_fingerprint(model)
    touched = [name.removeprefix("base_model.model.").removesuffix(".lora_A") for name in trained_modules]
    metadata: dict[str, Any] = {
        "base_model": {"source": base_source, **fingerprint.restrict(touched).model_dump(mode="json")},
        "dataset": {
            "file": config.data.name,
            "sha256": dataset.sha256,
            "rows": len(dataset.rows),
            "format": dataset.format,
        },
        "hyperparameters": {
            **config.model_dump(mode="json", include=set(HYPERPARAMETERS)),
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
        },
    }
    (config.output / TRAINING_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return config.output
