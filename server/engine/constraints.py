"""Token constraints (structured output) on the engine side: what a per-request matcher must do, and the step's
masks for the constrained rows. The grammar engine itself lives outside the engine (server/grammar.py); here a
matcher is anything with `fill_mask`, `advance` and `is_finished`.

Masks are token bitmasks, as xgrammar and llguidance fill them: int32 words, bit b of word w allowing token
32 w + b. The engine fills them on its thread after it has launched the forward and before it samples, so the
CPU work overlaps the device's; rows without a constraint are not looked at."""

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.engine.errors import GrammarDeadEnd, GrammarFailed
from server.engine.sampling import device_tensor


class TokenConstraint(Protocol):
    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the tokens allowed next into `row` (int32 [ceil(V / 32)], CPU), every word of it; raise
        GrammarDeadEnd if the grammar cannot go on (any other error is the matcher's own failure)."""

    def advance(self, token: int) -> None:
        """Take the emitted token; raise if the grammar refuses it."""

    def is_finished(self) -> bool:
        """The grammar is complete and nothing but the end of the sequence may follow."""


def mask_words(vocab: int) -> int:
    return (vocab + 31) // 32


@dataclass
class StepMasks:
    """The masks of one step's constrained rows, by their position among the step's sampled rows."""

    rows: list[int]
    bits: torch.Tensor  # int32 [len(rows), ceil(V / 32)], CPU
    failed: dict[int, BaseException] = field(default_factory=dict)  # rows whose matcher raised: they end alone

    def allowed(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [m], allowed [m, V] bool) on `device`: the words unpacked bit by bit on the device."""
        # from pinned memory, so the host does not wait for the step's forward to end (sampling.device_tensor)
        bits = (self.bits.pin_memory() if device.type == "cuda" else self.bits).to(device, non_blocking=True)  # [m, W]
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [m, W * 32] -> [m, V]
        return device_tensor(self.rows, device), allowed


def fill_masks(
    constraints: Sequence[TokenConstraint | None], vocab: int, banned: Sequence[frozenset[int]] | None = None
) -> StepMasks | None:
    """The masks of the rows that have a constraint; None (no work at all) when no row has one. A row whose
    matcher raises, or allows no token, is recorded in `failed` and left unmasked (its token is thrown away): as
    GrammarDeadEnd when the grammar cannot go on (a mask with no token says so too), else as GrammarFailed.
    `banned[i]`: tokens row i may not draw now (its stop tokens, short of min_tokens), left out of its mask."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    masks = StepMasks(rows, torch.zeros(len(rows), mask_words(vocab), dtype=torch.int32))
    for j, i in enumerate(rows):
        constraint = constraints[i]
        assert constraint is not None
        try:
            constraint.fill_mask(masks.bits[j])
            if not masks.bits[j].any():
                raise GrammarDeadEnd("the grammar allows no token at this point")
            if banned is not None and banned[i]:
                # The sampler sets banned tokens to -inf: a grammar allowing nothing else left the row no finite
                # logit, and its NaN draw ended it as a server fault (activations overflowed, a 500)
                masks.bits[j] &= _kept_words(banned[i], vocab)
                if not masks.bits[j].any():
                    raise GrammarDeadEnd(
                        "the grammar allows only tokens that end the answer here (the end of sequence, "
                        "stop_token_ids), which min_tokens holds back: send a smaller min_tokens, or a grammar "
                        "whose answers are that long"
                    )
        except Exception as exc:
            masks.failed[i] = exc if isinstance(exc, GrammarDeadEnd) else GrammarFailed(f"the grammar failed: {exc}")
            masks.bits[j] = -1  # all bits set: the row stays finite, and its draw is discarded
    return masks


@functools.lru_cache(maxsize=256)
def _kept_words(banned: frozenset[int], vocab: int) -> torch.Tensor:
    """A mask [ceil(V / 32)] int32 of every token but `banned`'s: built once per distinct set (a request bans the same
    set at each of its first min_tokens draws), touching only the words that hold a banned token."""
    cleared: dict[int, int] = {}  # word -> its banned bits
    for token in banned:
        if token < vocab:
            cleared[token >> 5] = cleared.get(token >> 5, 0) | 1 << (token & 31)
    words = torch.full((mask_words(vocab),), -1, dtype=torch.int32)
    if cleared:
        kept = [~bits & 0xFFFFFFFF for bits in cleared.values()]  # as unsigned 32-bit words; then as int32
        signed = [word - (word >> 31 << 32) for word in kept]
        words[torch.tensor(list(cleared))] = torch.tensor(signed, dtype=torch.int32)
    return words
