"""`loraplex train`: flags (or the same keys in --config FILE.yaml; flags win) -> TrainConfig -> train().

Several GPUs (DDP), one process per GPU; each process takes --batch-size rows per micro-batch, so one
optimizer step sees batch-size x grad-accum x processes rows:
    accelerate launch --multi_gpu --num_processes 4 -m loraplex train --data rows.jsonl --output out/
"""

import argparse
import sys
from pathlib import Path

from loraplex.errors import LoraplexError
from training.config import ALL_LINEAR, TrainConfig, build_config, read_config_file


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # Every default is None: only flags given on the command line override the config file; the real
    # defaults live in TrainConfig, in one place.
    p = subparsers.add_parser(
        "train",
        help="train a QLoRA adapter on a JSONL file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--data", type=Path, help="JSONL rows: {messages}, {prompt, completion} or {text}")
    p.add_argument("--output", type=Path, help="directory for the adapter, training.json and checkpoints")
    p.add_argument("--base-model", help="hub id or local directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--cache-dir", type=Path, help="model cache (default: the server's)")
    p.add_argument("--format", choices=["auto", "chat", "prompt-completion", "text"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate (2e-4), cosine decay after warmup")
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--rank", type=int, help="LoRA rank (16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (32)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (0.05)")
    p.add_argument("--target-modules", help=f"comma-separated module names, or {ALL_LINEAR} (default)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch per device (8)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (1)")
    p.add_argument("--max-seq-len", type=int, help="tokens per row; longer rows are truncated (1024)")
    p.add_argument("--eval-fraction", type=float, help="share of rows held out for eval loss (0)")
    p.add_argument("--eval-every", type=int, help="optimizer steps between eval losses (50)")
    p.add_argument("--save-every", type=int, help="optimizer steps between checkpoints (100)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_const", const=True, help="continue from the newest checkpoint")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--push", metavar="URL", help="upload the finished adapter to this server")
    p.add_argument("--name", help="adapter name on the server (with --push)")
    p.add_argument("--api-key", help="admin API key for --push")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from training.run import train  # torch and transformers load only when a run really starts

    try:
        config = config_from_args(args)
        result = train(config, progress=not args.no_progress)
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.main_process:
        print(summary(result))
    return 0


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: v for k, v in vars(args).items() if k not in {"config", "func", "no_progress", "command"}}
    return build_config(read_config_file(args.config) if args.config else {}, flags)


def summary(result) -> str:
    fit = result.fit
    losses = f"loss {_fmt(fit.first_loss)} -> {_fmt(fit.final_loss)}"
    if fit.eval_loss is not None:
        losses += f", eval loss {_fmt(fit.eval_loss)}"
    dropped = f" ({result.dropped_rows} dropped: nothing to learn within --max-seq-len)" if result.dropped_rows else ""
    rate = fit.real_tokens / max(fit.seconds, 1e-9)
    lines = [
        f"trained {fit.steps} steps on {result.rows - result.dropped_rows} rows{dropped}",
        losses,
        f"{fit.trained_tokens:,} trained tokens, {fit.real_tokens:,} tokens through the model in {fit.seconds:.1f} s "
        f"({rate:,.0f} tokens/s), peak memory {fit.peak_memory_bytes / 2**30:.2f} GiB",
        f"adapter written to {result.output_dir}",
    ]
    if result.pushed is not None:
        lines.append(f"pushed: {result.pushed}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
