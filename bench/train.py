"""Training throughput: the seed's QLoRA recipe (HF Trainer) against loraplex's loop, same model, same rows.

    python bench/train.py --out train.json           # Llama-3-8B shapes, random NF4 weights, needs CUDA
    python bench/train.py --tiny --out train.json    # tiny model on CPU: checks the bench itself still runs

Seed recipe (the baseline): every row padded to 512 with pad = EOS, labels = input_ids, LoRA r=16 on PEFT's
default q_proj/v_proj, paged_adamw_8bit, micro-batch 2 x accumulation 4, bf16, no gradient checkpointing.
It runs a second time after prepare_model_for_kbit_training (PEFT's default turns gradient checkpointing on),
the memory-matched reference for loraplex, which checkpoints on CUDA.
loraplex: length-grouped dynamic padding, labels masked on padding, micro-batch 8 x accumulation 1 (the
same 8 rows per optimizer step), chunked loss; on q_proj/v_proj (like for like), with gradient checkpointing
in every layer, in half of them (`--checkpoint-share 0.5`) and in none (`--no-gradient-checkpointing`: faster,
more memory), and on all linear layers (its default).
Each case builds a fresh model and measures steady state: the seed recipe (one shape, [2, 512]) after
`--warmup` untimed steps; loraplex, whose batch widths vary, after one untimed pass over the very batches it
then times, so no first-seen-shape cost (allocator growth, kernel selection) lands in the timed steps, as in a
long run where every width recurs. Throughput counts real (non-padding) tokens only;
memory is torch.cuda.max_memory_allocated over the timed steps.
"""

import argparse
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import bitsandbytes as bnb
import torch
from accelerate import Accelerator
from torch import nn
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from loraplex.basemodel import compute_dtype
from loraplex.synthetic import load_synthetic, synthetic_config
from training.config import TrainConfig
from training.data import Example
from training.loop import fit
from training.model import add_lora

SEED_TARGETS = ["q_proj", "v_proj"]
PAD_TO = 512
EFFECTIVE_BATCH = 8  # rows per optimizer step, both recipes


@dataclass
class Case:
    name: str
    targets: str
    micro_batch: str
    steps: int
    real_tokens: int
    seconds: float
    tokens_per_s: float
    peak_gb: float


def synthetic_rows(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


class TokenMeter:
    """Counts real tokens entering the model's forward (a pre-hook), and marks the start of the timed steps."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device, self.tokens, self.mark_tokens, self.mark_time = device, 0, 0, time.perf_counter()
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        self.tokens += int(kwargs["attention_mask"].sum())

    def mark(self) -> None:
        _sync(self.device)
        self.mark_tokens, self.mark_time = self.tokens, time.perf_counter()

    def since_mark(self) -> tuple[int, float]:
        _sync(self.device)
        return self.tokens - self.mark_tokens, time.perf_counter() - self.mark_time


class PaddedRows(torch.utils.data.Dataset):
    """The seed's rows: padded to 512 with pad = EOS, labels = input_ids (so padding is trained on)."""

    def __init__(self, rows: list[list[int]], eos: int) -> None:
        self.rows, self.eos = rows, eos

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        ids = torch.tensor(row + [self.eos] * (PAD_TO - len(row)))
        mask = torch.tensor([1] * len(row) + [0] * (PAD_TO - len(row)))
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def seed_recipe(
    preset: str, rows: list[list[int]], steps: int, warmup: int, device: torch.device, tmp: Path, prepare: bool
) -> Case:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainerCallback

    cuda = device.type == "cuda"
    model, _ = load_synthetic(preset, device, compute_dtype(device), quantize=True)
    if prepare:
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))
    meter = TokenMeter(model.get_base_model(), device)

    class MarkAfterWarmup(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                meter.mark()

    args = TrainingArguments(
        output_dir=str(tmp / "seed"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        max_steps=warmup + steps, learning_rate=2e-4, bf16=cuda, use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch", save_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=PaddedRows(rows, eos=2), callbacks=[MarkAfterWarmup()])
    _reset_peak(device)
    trainer.train()
    tokens, seconds = meter.since_mark()
    name = "seed recipe + prepare_model_for_kbit_training" if prepare else "seed recipe (HF Trainer, pad 512)"
    case = _case(name, "q_proj,v_proj", "2 x 4", steps, tokens, seconds, device)
    del trainer, model
    return case


def loraplex_loop(
    preset: str, rows: list[list[int]], targets: list[str] | str, steps: int, warmup: int, device: torch.device,
    tmp: Path, checkpointing: bool = True, share: float = 1.0,
) -> Case:  # fmt: skip
    cuda = device.type == "cuda"
    dtype = compute_dtype(device)
    base, _ = load_synthetic(preset, device, dtype, quantize=True)
    examples = [Example(row, row) for row in rows]
    config = TrainConfig(
        data=tmp / "synthetic.jsonl", output=tmp / "loraplex", rank=16, alpha=32, dropout=0.05,
        target_modules=targets, batch_size=EFFECTIVE_BATCH, grad_accum=1, max_seq_len=PAD_TO, lr=2e-4,
        save_every=10**9, max_steps=steps, gradient_checkpointing=checkpointing, checkpoint_share=share,
    )  # fmt: skip
    model = add_lora(base, config, gradient_checkpointing=cuda and checkpointing, compute_dtype=dtype)
    accelerator = Accelerator(cpu=not cuda)
    timed_rows = examples[warmup * EFFECTIVE_BATCH :]  # the rows the seed recipe's timed steps draw from
    fit(model, timed_rows, [], config, accelerator, pad_id=0, progress=False)  # untimed: every width once
    result = fit(model, timed_rows, [], config, accelerator, pad_id=0, progress=False)
    name = "loraplex loop (length-grouped, dynamic pad)"
    if not checkpointing:
        name += ", no gradient checkpointing"
    elif share < 1:
        name += f", checkpointing {share:.0%} of the layers"
    label = "q_proj,v_proj" if targets != "all-linear" else "all-linear (default)"
    case = _case(name, label, f"{EFFECTIVE_BATCH} x 1", steps, result.real_tokens, result.seconds, device)
    case.peak_gb = result.peak_memory_bytes / 2**30 if cuda else case.peak_gb
    del model, base
    return case


def _case(name: str, targets: str, micro: str, steps: int, tokens: int, seconds: float, device) -> Case:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return Case(name, targets, micro, steps, tokens, round(seconds, 3), round(tokens / seconds, 1), round(peak, 2))


def _fresh_state(device: torch.device) -> None:
    """Free the previous case's model and let the next case start its own Accelerator settings."""
    from accelerate.state import AcceleratorState

    # Trainer initialises accelerate's process-wide state with bf16 mixed precision; the loop's own
    # Accelerator asks for none. Resetting between cases is what a fresh process would give.
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    _empty_cache(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(cases: list[Case], baseline: Case) -> str:
    lines = [
        "| recipe | LoRA targets | micro-batch x accum | steps | real tokens/s | vs seed | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        ratio = c.tokens_per_s / baseline.tokens_per_s
        lines.append(
            f"| {c.name} | {c.targets} | {c.micro_batch} | {c.steps} | {c.tokens_per_s:,.0f} | {ratio:.2f}x | "
            f"{c.peak_gb:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (a smoke test of this script)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per case (default 12; tiny: 2)")
    parser.add_argument("--warmup", type=int, help="seed recipe's untimed steps first (default 2; tiny: 1)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.tiny else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --tiny for the CPU smoke run")
    preset = "random:tiny" if args.tiny else "random:llama3-8b"
    rows = synthetic_rows(EFFECTIVE_BATCH * (warmup + steps), synthetic_config(preset).vocab_size, 64, PAD_TO)
    tmp = Path("/tmp") / "loraplex-bench-train"  # nothing is saved there: checkpoints are disabled
    cases = []
    for run in (
        lambda: seed_recipe(preset, rows, steps, warmup, device, tmp, prepare=False),
        lambda: seed_recipe(preset, rows, steps, warmup, device, tmp, prepare=True),
        lambda: loraplex_loop(preset, rows, SEED_TARGETS, steps, warmup, device, tmp),
        lambda: loraplex_loop(preset, rows, SEED_TARGETS, steps, warmup, device, tmp, checkpointing=False),
        lambda: loraplex_loop(preset, rows, SEED_TARGETS, steps, warmup, device, tmp, share=0.5),
        lambda: loraplex_loop(preset, rows, "all-linear", steps, warmup, device, tmp),
    ):
        _fresh_state(device)
        cases.append(run())
        print(f"{cases[-1]}", file=sys.stderr, flush=True)
    baseline = cases[0]
    print(table(cases, baseline))
    speedup = cases[2].tokens_per_s / baseline.tokens_per_s
    memory = cases[2].peak_gb / baseline.peak_gb if baseline.peak_gb else None
    at_memory = f" at {memory:.2f}x peak memory" if memory else ""
    print(f"\nloraplex vs seed, same targets: {speedup:.2f}x real tokens/s{at_memory}")
    unchecked = cases[3].tokens_per_s / baseline.tokens_per_s
    half = cases[4].tokens_per_s / baseline.tokens_per_s
    print(f"without gradient checkpointing: {unchecked:.2f}x; checkpointing half the layers: {half:.2f}x")
    if args.out:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/train.py", *(argv if argv is not None else sys.argv[1:])]),
            "shape": "tiny" if args.tiny else "llama-3-8b",
            "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__},
            "cases": [asdict(c) for c in cases],
            "speedup_same_targets": speedup,
            "memory_ratio_same_targets": memory,
            "speedup_same_targets_no_checkpointing": unchecked,
            "speedup_same_targets_half_checkpointing": half,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
