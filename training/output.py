"""The finished adapter: a PEFT directory plus training.json, the metadata the server keeps in its manifest."""

import json
from pathlib import Path
from typing import Any

from peft import PeftModel

from adapters.fingerprint import base_fingerprint
from training.config import TrainConfig
from training.data import Dataset
from training.loop import FitResult
from training.model import target_module_names

TRAINING_FILE = "training.json"
# Hyperparameters worth keeping with the adapter; paths, credentials and run plumbing are left out.
HYPERPARAMETERS = (
    "format",
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
