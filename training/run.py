"""`train(config)`: the whole run, callable from Python (tests, notebooks) and from `loraplex train`.

Order matters: everything about the data, the device, the push target, the output directory and the checkpoint
to resume from is checked, with the base model's config and tokenizer, before the model loads.
"""

import logging
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from pydantic import ValidationError

from adapters import client as admin
from adapters.cli import describe_error
from adapters.validate import WEIGHTS_FILE
from loraplex.basemodel import check_base_model, compute_dtype, load_base_model, load_tokenizer, resolve_device
from loraplex.settings import Settings, describe_settings_error
from training.batching import choose_pad_id
from training.checkpoint import plan_checkpoints
from training.config import TrainConfig
from training.data import read_dataset, tokenize_dataset
from training.errors import TrainingError
from training.fingerprint import run_fingerprint
from training.hub import fetch_weights, pin_snapshot
from training.loop import FitResult, fit
from training.model import add_lora
from training.output import write_adapter

log = logging.getLogger("loraplex.training")


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    fit: FitResult
    rows: int
    dropped_rows: int  # rows whose every trained token lay beyond max_seq_len
    cut_rows: int  # rows trained without their end: trained tokens lay beyond max_seq_len
    pushed: admin.PushedManifest | None  # the server's answer to --push
    main_process: bool  # False on the other processes of a multi-GPU run: they write and report nothing
    kept_checkpoints: Path | None  # with --keep-checkpoints; else they are removed once the adapter is written


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    dataset = read_dataset(config.data, config.format)
    resolve_device(config.device)  # accelerate would train on the CPU, unasked, where --device cuda finds no CUDA
    cache_dir = config.cache_dir or _server_cache_dir()
    base_model, commit = pin_snapshot(config.base_model, cache_dir)  # a hub id: one commit's files, in the cache
    source, _ = check_base_model(base_model, cache_dir)
    tokenizer = load_tokenizer(source)
    examples, dropped = tokenize_dataset(
        dataset, tokenizer, config.max_seq_len, config.data, chat_template=config.chat_template
    )
    train_rows, eval_rows = split(examples, config.eval_fraction, config.seed)
    if config.push:
        _check_push_target(config.push, config.api_key)  # a wrong URL or key is found now, not after training
    _check_output(config)
    if commit:  # the checks above passed: now the gigabytes
        fetch_weights(config.base_model, commit)

    accelerator = Accelerator(cpu=config.device == "cpu")
    fingerprint = run_fingerprint(
        config,
        dataset,
        train_rows,
        eval_rows,
        base_source=source,
        world=accelerator.num_processes,
        device=accelerator.device.type,
    )
    warn = log.warning if accelerator.is_main_process else _silent
    cut = [example.cut_from for example in examples if example.cut_from is not None]
    if cut:  # said before the model loads, so that a run can be stopped and started again with a longer limit
        warn(
            f"{len(cut)} of {len(dataset.rows)} rows are longer than --max-seq-len {config.max_seq_len} (the longest "
            f"{max(cut)} tokens): cut there, their ends (EOS included) are not trained, so the adapter learns less "
            "where to stop; raise --max-seq-len to train them whole"
        )
    checkpoints = plan_checkpoints(config, fingerprint, warn)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    cuda = accelerator.device.type == "cuda"
    dtype = compute_dtype(accelerator.device)
    base = load_base_model(base_model, cache_dir=cache_dir, device=accelerator.device.type, quantize=True, dtype=dtype)
    model = add_lora(
        base.model, config, gradient_checkpointing=cuda and config.gradient_checkpointing, compute_dtype=dtype
    )
    pad_id = choose_pad_id(tokenizer)
    result = fit(model, train_rows, eval_rows, config, accelerator, pad_id, checkpoints=checkpoints, progress=progress)

    pushed = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # write_adapter reads the adapter back and fsyncs it, so the checkpoints go only once it is safe
        named = config.base_model if commit else source  # a hub id by its name (and commit), not its cache path
        write_adapter(
            model, config, dataset, result, base_source=named, base_commit=commit, world=accelerator.num_processes
        )
        if not config.keep_checkpoints:
            _remove_checkpoints(config.checkpoint_dir)
        if config.push:
            pushed = _push(config)
    kept = config.checkpoint_dir if config.keep_checkpoints and config.checkpoint_dir.is_dir() else None
    return TrainResult(
        config.output, result, len(dataset.rows), dropped, len(cut), pushed, accelerator.is_main_process, kept
    )


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` held out, at least one row each when fraction > 0."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _server_cache_dir() -> Path:
    """The server's model cache, so that both share one conversion of the embedded model. Settings reads every
    LORAPLEX_* variable, so one set wrong for the server would stop training with a traceback."""
    try:
        return Settings().cache_dir
    except ValidationError as exc:
        raise TrainingError(
            f"{describe_settings_error(exc, flags=False)}: fix or unset the variable, or give --cache-dir; nothing was "
            "trained"
        ) from None


def _check_output(config: TrainConfig) -> None:
    """The adapter can be written to --output, and writing it loses no other: found now, not when the training is
    over. A resume goes on with the run whose output is there, so it may replace that run's adapter."""
    output = config.output
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output {output} is a file, not a directory; nothing was trained")
    if (output / WEIGHTS_FILE).exists() and not (config.resume or config.overwrite):
        raise TrainingError(
            f"--output {output} already holds an adapter ({WEIGHTS_FILE}): give another --output, or add "
            "--overwrite to replace it; nothing was trained"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as exc:
        raise TrainingError(
            f"--output {output}: cannot write there ({exc.strerror or exc}); nothing was trained"
        ) from exc


def _remove_checkpoints(root: Path) -> None:
    try:
        shutil.rmtree(root)
    except FileNotFoundError:  # a run shorter than save_every wrote none
        pass
    except OSError as exc:  # the adapter is written: a leftover folder is worth a warning, not a failed run
        log.warning("could not remove the checkpoints in %s (%s); remove them by hand", root, exc.strerror)


def _silent(message: str) -> None:
    """The warnings of the other processes of a multi-GPU run: the main process says them once."""


def _check_push_target(url: str, api_key: str | None) -> None:
    try:
        with admin.AdminClient(url, api_key=api_key) as client:
            client.check_access()
    except admin.AdminClientError as exc:
        raise TrainingError(f"--push {url}: {describe_error(exc)}; nothing was trained") from exc


def _push(config: TrainConfig) -> admin.PushedManifest:
    key = " --api-key KEY" if config.api_key else ""
    retry = f"(retry: loraplex adapters push {config.output} --name {config.name} --server {config.push}{key})"
    try:
        with admin.AdminClient(config.push, api_key=config.api_key) as client:
            return client.push(config.output, config.name)
    except admin.AdminClientError as exc:
        raise TrainingError(
            f"the adapter was written to {config.output}, but --push failed: {describe_error(exc)} {retry}"
        ) from exc
    except KeyboardInterrupt:  # the checkpoints are gone by now: what is left to do is the push
        raise TrainingError(f"the adapter was written to {config.output}, but --push was interrupted {retry}") from None
