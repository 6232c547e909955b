"""`loraplex train`: one flag per TrainConfig field, so the flags, the YAML keys and the defaults shown in
--help come from one place. torch and transformers load only once a run really starts."""

import argparse
import sys
import typing
from pathlib import Path

from pydantic.fields import FieldInfo

from loraplex.errors import LoraplexError
from loraplex.logs import configure
from training.config import TrainConfig, build_config, read_config_file

if typing.TYPE_CHECKING:
    from training.checkpoint import Resume

DESCRIPTION = """\
Train a QLoRA adapter on a JSONL file and write it as a PEFT directory; with --push, upload it to a
running server. Every option may also be given in --config FILE.yaml (same names); flags win over the file.

Row formats (all rows of a file share one):
  {"messages": [...]}               chat turns, loss on the assistant turns (for /v1/chat/completions)
  {"prompt": ..., "completion": ...} loss on the completion; plain text continuation (for /generate and
                                    /v1/completions), or chat turns with --chat-template
  {"text": ...}                     loss on every token
EOS is appended and trained, so the adapter learns to stop.

Several GPUs (DDP), one process per GPU; each process takes --batch-size rows per micro-batch:
  accelerate launch --multi_gpu --num_processes 4 -m loraplex train --data rows.jsonl --output out/
"""
_METAVARS = {int: "N", float: "X", Path: "PATH"}
_NAMED_METAVARS = {"push": "URL", "api_key": "KEY", "target_modules": "MODULES", "base_model": "MODEL"}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a QLoRA adapter on a JSONL file",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE.yaml", help="YAML file with any of the options below")
    for name, field in TrainConfig.model_fields.items():
        _add_flag(p, name, field)
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar (logs, CI)")
    p.set_defaults(func=run)
    return p


def _add_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    # Every argparse default is None: only flags given on the command line override the config file; the
    # real defaults live in TrainConfig and are only shown here.
    flag = "--" + name.replace("_", "-")
    default = field.get_default()
    if isinstance(default, bool):
        default = "on" if default else "off"
    shown = "" if default is None or field.is_required() else f" (default: {default})"
    help_text = f"{field.description}{shown}".replace("%", "%%")  # argparse %-formats help strings
    kind = typing.get_args(field.annotation)[0] if typing.get_origin(field.annotation) else field.annotation
    if field.annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif typing.get_origin(field.annotation) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(field.annotation), help=help_text)
    else:  # pydantic converts and checks the value, with the same messages as for the config file
        metavar = _NAMED_METAVARS.get(name) or _METAVARS.get(kind, name.upper())
        parser.add_argument(flag, metavar=metavar, help=help_text)


def run(args: argparse.Namespace) -> int:
    from training.run import train

    configure()
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its weight-loading bar, too
    try:
        config = config_from_args(args)
        try:
            result = train(config, progress=not args.no_progress)
        except KeyboardInterrupt:
            print(interrupted(config), file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.main_process:
        print(summary(result))
    return 0


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {name: getattr(args, name) for name in TrainConfig.model_fields}
    return build_config(read_config_file(args.config) if args.config else {}, flags)


def interrupted(config: TrainConfig) -> str:
    """What Ctrl-C leaves: the checkpoint --resume goes on from, or none yet."""
    from training.checkpoint import PREFIX, checkpoints

    found = checkpoints(config.checkpoint_dir)
    if not found:
        return f"interrupted before the first checkpoint (one every --save-every {config.save_every} steps)"
    step = int(found[0].name.removeprefix(PREFIX))
    return f"interrupted: run the same command with --resume to go on from step {step} ({found[0]})"


def summary(result) -> str:
    from adapters.cli import describe_push

    fit = result.fit
    losses = f"loss {_fmt(fit.first_loss)} -> {_fmt(fit.final_loss)}"
    if fit.eval_loss is not None:
        losses += f", eval loss {_fmt(fit.eval_loss)}"
    notes = [f"{result.dropped_rows} dropped: nothing to learn within --max-seq-len"] if result.dropped_rows else []
    notes += [f"{result.cut_rows} cut at --max-seq-len"] if result.cut_rows else []
    rows = f" ({'; '.join(notes)})" if notes else ""
    rate = fit.real_tokens / max(fit.seconds, 1e-9)
    lines = [
        f"trained {_count(fit.steps, 'step')} on {_count(result.rows - result.dropped_rows, 'row')}{rows}",
        *(_describe_resume(resume) for resume in fit.resumes),
        losses,
        f"{fit.trained_tokens:,} trained tokens, {fit.real_tokens:,} tokens through the model in {fit.seconds:.1f} s "
        f"({rate:,.0f} tokens/s), peak memory {fit.peak_memory_bytes / 2**30:.2f} GiB",
        f"adapter written to {result.output_dir}",
    ]
    if result.kept_checkpoints is not None:
        lines.append(f"checkpoints kept in {result.kept_checkpoints}")
    if result.pushed is not None:
        lines.append(describe_push(result.pushed))
    return "\n".join(lines)


def _describe_resume(resume: "Resume") -> str:
    from training.fingerprint import describe

    changed = f", with changed settings: {describe(resume.changed)}" if resume.changed else ""
    return f"resumed from step {resume.from_step}{changed} (counts and times cover the whole run)"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
