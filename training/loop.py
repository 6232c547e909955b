"""The training loop: length-grouped micro-batches, gradient accumulation, eval, checkpoints, progress.

Written against `accelerate.Accelerator`, so the same code runs on a CPU, one GPU, or several GPUs under
`accelerate launch` (DDP: each process takes every world-th micro-batch of the same shuffled order).
"""

import contextlib
import itertools
import logging
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from peft import PeftModel
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from training.batching import batches_per_epoch, collate, length_grouped_batches, micro_batches, shard
from training.checkpoint import CheckpointPlan, Progress, Resume, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import Example
from training.errors import TrainingError
from training.model import CausalLMLoss

log = logging.getLogger("loraplex.training")


@dataclass(frozen=True)
class FitResult:
    """The whole run's results: counters carried in checkpoints cover the segments before each resume."""

    steps: int
    first_loss: float | None  # training loss of the run's first step
    final_loss: float | None  # training loss of the last step
    eval_loss: float | None  # on the held-out rows after the last step; None without --eval-fraction
    trained_tokens: int  # tokens that carried a label (all processes)
    real_tokens: int  # non-padding tokens fed through the model (all processes)
    seconds: float  # in the training loop; model loading is left out
    peak_memory_bytes: int  # the highest of every segment's peak
    resumes: tuple[Resume, ...]  # empty for a run that was never resumed


def total_steps(config: TrainConfig, n_rows: int, world: int) -> int:
    if config.max_steps:
        return config.max_steps
    return config.epochs * math.ceil(batches_per_epoch(n_rows, config.batch_size, world) / config.grad_accum)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, cuda: bool) -> torch.optim.Optimizer:
    if cuda:
        import bitsandbytes as bnb

        # Paged 8-bit AdamW: state in 8 bits, paged to host memory under pressure instead of OOM.
        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def fit(
    model: PeftModel,
    train: Sequence[Example],
    evals: Sequence[Example],
    config: TrainConfig,
    accelerator: Accelerator,
    pad_id: int,
    *,
    checkpoints: CheckpointPlan | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `model` in place for total_steps(config) optimizer steps; without `checkpoints` none are
    read or written (benchmarks), with them the run starts where the plan says and saves every save_every."""
    cuda = accelerator.device.type == "cuda"
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(config, len(train), world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, cuda)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    before = checkpoints.start if checkpoints else Progress()
    if checkpoints and checkpoints.resume_from:
        load_checkpoint(checkpoints.resume_from, model, optimizer, scheduler)
    start = before.step
    # The scheduler stays outside prepare(): it steps once per optimizer step, on every process alike.
    loss_module, optimizer = accelerator.prepare(CausalLMLoss(model), optimizer)
    loss_module.train()
    lengths = [len(e.input_ids) for e in train]
    stream = micro_batches(lengths, config.batch_size, config.seed, rank, world)
    # Batch order depends only on (seed, epoch), so skipping replays a resumed run's exact data order.
    stream = itertools.islice(stream, start * config.grad_accum, None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    bar = tqdm(
        total=steps,
        initial=start,
        unit="step",
        disable=not (progress and accelerator.is_main_process),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # With the bar off (logs, CI) progress goes to log lines instead: the first step, every log_every, the last.
    log_lines = not progress and accelerator.is_main_process
    say = log.info if log_lines else bar.write
    first_loss, final_loss, eval_loss = before.first_loss, None, None
    trained = real = 0  # this segment's; `real` this process's alone
    began = time.perf_counter()

    def so_far(step: int) -> Progress:  # the whole run up to `step`; a collective: every process calls it
        return before.model_copy(
            update={
                "step": step,
                "trained_tokens": before.trained_tokens + trained,
                "real_tokens": before.real_tokens + int(_sum(accelerator, real)),
                "seconds": before.seconds + time.perf_counter() - began,
                "first_loss": first_loss,
                "peak_memory_bytes": max(before.peak_memory_bytes, _peak_memory(accelerator.device)),
            }
        )

    for step in range(start + 1, steps + 1):
        window = [[train[i] for i in next(stream)] for _ in range(config.grad_accum)]
        # Normalise by the trained tokens of the whole step (all micro-batches, all processes): every
        # token weighs the same however the rows fall into micro-batches. DDP averages gradients over
        # processes, hence the factor world.
        step_tokens = _sum(accelerator, sum(e.trained_tokens for rows in window for e in rows))
        loss_sum = torch.zeros((), device=accelerator.device)
        for k, rows in enumerate(window):
            batch = {key: t.to(accelerator.device) for key, t in collate(rows, pad_id).items()}
            real += sum(len(e.input_ids) for e in rows)
            last = k == len(window) - 1
            try:
                with contextlib.nullcontext() if last else accelerator.no_sync(loss_module):
                    batch_loss, _ = loss_module(batch["input_ids"], batch["labels"])
                    accelerator.backward(batch_loss * world / step_tokens)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(_out_of_memory(config, step, batch["input_ids"].shape, checkpoints)) from exc
            loss_sum += batch_loss.detach()
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        final_loss = _sum(accelerator, loss_sum).item() / step_tokens
        first_loss = first_loss if first_loss is not None else final_loss
        trained += step_tokens
        elapsed = time.perf_counter() - began
        rate = f"{real * world / elapsed:,.0f}"
        bar.set_postfix(loss=f"{final_loss:.4f}", tok_s=rate, refresh=False)
        bar.update(1)
        if log_lines and (step == start + 1 or step % config.log_every == 0 or step == steps):
            log.info("step %d/%d: loss %.4f, %s tokens/s, %.0f s", step, steps, final_loss, rate, elapsed)
        if evals and (step % config.eval_every == 0 or step == steps):
            eval_loss = evaluate(loss_module, evals, config.batch_size, accelerator, pad_id)
            if accelerator.is_main_process:
                say(f"step {step}: eval loss {eval_loss:.4f}")
        if checkpoints and step % config.save_every == 0 and step < steps:
            _save(accelerator, checkpoints, so_far(step), loss_module, optimizer, scheduler)
    bar.close()
    done = so_far(steps)
    return FitResult(
        steps=steps,
        first_loss=done.first_loss,
        final_loss=final_loss,
        eval_loss=eval_loss,
        trained_tokens=done.trained_tokens,
        real_tokens=done.real_tokens,
        seconds=done.seconds,
        peak_memory_bytes=done.peak_memory_bytes,
        resumes=done.resumes,
    )


@torch.no_grad()
def evaluate(
    loss_module: torch.nn.Module, evals: Sequence[Example], batch_size: int, accelerator: Accelerator, pad_id: int
) -> float:
    """Mean token loss on the held-out rows (dropout off), summed over every process's share."""
    loss_module.eval()
    lengths = [len(e.input_ids) for e in evals]
    batches = shard(
        length_grouped_batches(lengths, batch_size, seed=0), accelerator.process_index, accelerator.num_processes
    )
    total = torch.zeros((), device=accelerator.device)
    count = 0
    for indices in batches:
        batch = {k: t.to(accelerator.device) for k, t in collate([evals[i] for i in indices], pad_id).items()}
        loss, n = loss_module(batch["input_ids"], batch["labels"])
        total += loss
        count += int(n)
    loss_module.train()
    return _sum(accelerator, total).item() / _sum(accelerator, count)


def _save(
    accelerator: Accelerator, plan: CheckpointPlan, progress: Progress, loss_module, optimizer, scheduler
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(loss_module).model
        save_checkpoint(plan, progress, model, optimizer, scheduler)
    accelerator.wait_for_everyone()


def _out_of_memory(config: TrainConfig, step: int, shape: torch.Size, checkpoints: CheckpointPlan | None) -> str:
    """What to change after the device ran out of memory on a micro-batch of `shape` [rows, tokens]."""
    fixes = "lower --batch-size (a higher --grad-accum keeps the rows of a step) or --max-seq-len"
    if not config.gradient_checkpointing:
        fixes += ", or drop --no-gradient-checkpointing (activations recomputed instead of kept)"
    elif config.checkpoint_share < 1:
        fixes += f", or raise --checkpoint-share ({config.checkpoint_share}: more layers recomputed, fewer kept)"
    saved = checkpoints is not None and (checkpoints.resume_from is not None or step > config.save_every)
    resume = "; --resume goes on from the last checkpoint" if saved else ""
    return f"out of memory at step {step} on a micro-batch of {shape[0]} rows x {shape[1]} tokens: {fixes}{resume}"


def _sum(accelerator: Accelerator, value):
    """Sum a count or a scalar tensor over processes (identity on one process)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.as_tensor(value, device=accelerator.device)
    reduced = accelerator.reduce(tensor, reduction="sum")
    return reduced if isinstance(value, torch.Tensor) else reduced.item()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
