"""What defines a run: the data, the rows it selects, the base model's weights and the settings that shape every
optimizer step.

A checkpoint carries the fingerprint of the run that wrote it, so that `--resume` can refuse to continue
with different data, base weights or settings under the old run's name (and name exactly what differs).
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import RUN_SETTINGS, TrainConfig
from training.data import Dataset, Example

Fingerprint = dict[str, Any]  # JSON values only: it is stored in the checkpoint manifest
_HASHES = ("data_sha256", "train_rows_sha256", "eval_rows_sha256")
BASE_WEIGHTS = "base_weights"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what transformers loads a model's weights from
# A base model is gigabytes, and is fingerprinted at every start: each weight file is read in samples, 4 MiB in all,
# one in every 1/256th of the file. Weights saved anew under the same path (another fine-tune or conversion) differ
# throughout the tensors they change, so they show even where they change only a few layers. A file of up to 4 MiB
# is read whole.
_SAMPLES = 256
_SAMPLE_BYTES = 16 << 10


def run_fingerprint(
    config: TrainConfig,
    dataset: Dataset,
    train: Sequence[Example],
    evals: Sequence[Example],
    *,
    base_source: str,
    world: int,
    device: str,
) -> Fingerprint:
    """Settings by name, plus hashes of the data file, of the base model's weight files and of the tokenized rows
    each split holds.

    The row hashes catch what no setting names: another tokenizer under the same base model path, or a chat
    template that changed; the weights' hashes, other weights under that path. world and device are part of the
    run: the data order is sharded over processes, and the optimizer (8-bit paged on CUDA, AdamW on a CPU) keeps
    state that does not carry over.
    """
    return {
        **config.model_dump(mode="json", include=set(RUN_SETTINGS)),
        "base_model": config.base_model,
        BASE_WEIGHTS: base_weights(base_source),
        "target_modules": config.target_modules,
        "processes": world,
        "device": device,
        "data_sha256": dataset.sha256,
        "train_rows_sha256": _rows_sha256(train),
        "eval_rows_sha256": _rows_sha256(evals),
    }


def base_weights(source: str) -> dict[str, dict[str, Any]] | None:
    """{file name: {bytes, sampled_sha256}} of each weight file of a base model directory; None for a hub id or a
    random: model, whose weights are not on disk before they load."""
    directory = Path(source)
    if not directory.is_dir():
        return None
    files = sorted(path for path in directory.iterdir() if path.suffix in _WEIGHT_SUFFIXES and path.is_file())
    return {path.name: _sampled(path) for path in files}


def differences(recorded: Fingerprint, current: Fingerprint) -> dict[str, tuple[Any, Any]]:
    """{name: (recorded, current)} for every entry that differs, in the order of `current`."""
    names = list(current) + [name for name in recorded if name not in current]
    return {name: (recorded.get(name), current.get(name)) for name in names if recorded.get(name) != current.get(name)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """'lr 0.005 -> 0.001, data_sha256 3f2a9c1b0d4e -> 77e01b2c9a3f, base_weights: model.safetensors rewritten':
    one line, hashes shortened."""
    return ", ".join(_describe_change(name, old, new) for name, (old, new) in changes.items())


def _describe_change(name: str, old: Any, new: Any) -> str:
    if name == BASE_WEIGHTS:  # None: a hub id or a random: model, no files
        return _describe_weights(old or {}, new or {})
    return f"{name} {_show(name, old)} -> {_show(name, new)}"


def _describe_weights(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> str:
    files = []
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            files.append(f"{name} added")
        elif name not in new:
            files.append(f"{name} removed")
        elif old[name]["bytes"] != new[name]["bytes"]:
            files.append(f"{name} {old[name]['bytes']:,} -> {new[name]['bytes']:,} bytes")
        elif old[name] != new[name]:
            files.append(f"{name} rewritten")
    return f"{BASE_WEIGHTS}: {', '.join(files)}"


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


def _sampled(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            digest.update(f.read())
        else:  # the first sample begins with the safetensors header: the tensors' names, dtypes and shapes
            stride = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * stride)
                digest.update(f.read(_SAMPLE_BYTES))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}
