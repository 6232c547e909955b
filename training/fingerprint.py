"""What defines a run: the data, the rows it selects and the settings that shape every optimizer step.

A checkpoint carries the fingerprint of the run that wrote it, so that `--resume` can refuse to continue
with different data or settings under the old run's name (and name exactly what differs).
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from training.config import RUN_SETTINGS, TrainConfig
from training.data import Dataset, Example

Fingerprint = dict[str, Any]  # JSON values only: it is stored in the checkpoint manifest
_HASHES = ("data_sha256", "train_rows_sha256", "eval_rows_sha256")


def run_fingerprint(
    config: TrainConfig,
    dataset: Dataset,
    train: Sequence[Example],
    evals: Sequence[Example],
    *,
    world: int,
    device: str,
) -> Fingerprint:
    """Settings by name, plus hashes of the data file and of the tokenized rows each split holds.

    The row hashes catch what no setting names: another tokenizer under the same base model path, or a chat
    template that changed. world and device are part of the run: the data order is sharded over processes,
    and the optimizer (8-bit paged on CUDA, AdamW on a CPU) keeps state that does not carry over.
    """
    return {
        **config.model_dump(mode="json", include=set(RUN_SETTINGS)),
        "base_model": config.base_model,
        "target_modules": config.target_modules,
        "processes": world,
        "device": device,
        "data_sha256": dataset.sha256,
        "train_rows_sha256": _rows_sha256(train),
        "eval_rows_sha256": _rows_sha256(evals),
    }


def differences(recorded: Fingerprint, current: Fingerprint) -> dict[str, tuple[Any, Any]]:
    """{name: (recorded, current)} for every entry that differs, in the order of `current`."""
    names = list(current) + [name for name in recorded if name not in current]
    return {name: (recorded.get(name), current.get(name)) for name in names if recorded.get(name) != current.get(name)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """'lr 0.005 -> 0.001, data_sha256 3f2a9c1b0d4e -> 77e01b2c9a3f': one line, hashes shortened."""
    return ", ".join(f"{name} {_show(name, old)} -> {_show(name, new)}" for name, (old, new) in changes.items())


def _show(name: str, value: Any) -> str:
    if name in _HASHES and isinstance(value, str):
        return value[:12]
    return json.dumps(value) if isinstance(value, list | dict | None) else str(value)


def _rows_sha256(rows: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for example in rows:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
        digest.update(b"\n")
    return digest.hexdigest()
