"""Length-grouped micro-batches and dynamic padding.

Rows of similar length share a micro-batch, so padding stays small without packing (and without one
row attending to another). Batch order is a pure function of (seed, epoch): a resumed run replays the
same order and skips what it already trained on.
"""

import random
from collections.abc import Iterator, Sequence

import torch

from training.data import IGNORE, Example

MEGABATCH = 64  # micro-batches sorted together: large enough to group lengths, small enough to stay shuffled


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Indices shuffled, sorted by length within megabatches, cut into batches, batch order shuffled.

    The batch holding the longest row goes first, so a run that does not fit in memory fails at once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's share under data parallelism; every process gets the same number of batches."""
    if len(batches) < world:  # a tiny dataset: every process still needs a batch per step
        batches = (batches * world)[:world]
    usable = len(batches) - len(batches) % world
    return batches[rank:usable:world]


def micro_batches(
    lengths: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[list[int]]:
    """Endless stream of this process's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from shard(length_grouped_batches(lengths, batch_size, seed + epoch), rank, world)
        epoch += 1


def batches_per_epoch(n_rows: int, batch_size: int, world: int = 1) -> int:
    total = -(-n_rows // batch_size)
    return max(1, total // world)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids [B, T] and labels [B, T] (-100 on padding).

    No attention mask: with right padding and causal attention a real token never attends to the padding
    after it, and padding carries no label, so the model runs mask-free (see CausalLMLoss.forward)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "labels": labels}


def choose_pad_id(tokenizer) -> int:
    """A pad id that is not EOS, without growing the vocabulary.

    Padding is never attended to by real tokens and carries no label, so any existing id works as filler;
    what must not happen is pad == EOS, where masking padding by id would also mask the EOS to be learned.
    Adding a new token would resize the embeddings and tie the adapter to a vocabulary the server's base lacks.
    """
    eos = tokenizer.eos_token_id
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids, 0, 1]
    return next(c for c in candidates if c is not None and c != eos)
