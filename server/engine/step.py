"""One engine step as a flat token batch: the layout that the forward, the attention and the LoRA layers read.

Each sequence of a step (a decode token, or a chunk of a prompt) is a contiguous run of tokens; runs are
ordered by adapter slot, so each slot's tokens form one range and the LoRA delta runs once per range with no
gather. Everything a step needs is written into one int64 host buffer, which reaches the device in one copy;
CUDA graphs replay over a static device copy of the same layout, so a step's shape is just its token bucket.
A decode token the previous step drew and the host has not read yet is fed on the device: its id is taken
from that step's sampled tokens (the FEED row names which), so a step can be launched before the last one ends.
There are two host buffers, filled in turn: one may still be on its way to the device while the other is filled.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy
import torch

# Rows of the token block [5, max_tokens] at the start of the buffer. FEED: for a token whose id the previous step
# drew on the device, the index of that draw among its sampled rows; -1 where IDS holds the id.
IDS, POSITIONS, WRITE_ROWS, SLOTS, FEED = range(5)
ROWS = 5


class Sequence(NamedTuple):
    """What one request runs in a step (a tuple: one is made per row and step)."""

    row: int  # its KV cache row
    slot: int  # its adapter slot
    tokens: list[int]  # the new tokens, at positions start, start + 1, ...
    start: int
    sample: bool  # its last token's logits are sampled (a decode token, or the end of the prompt)
    feed: int = -1  # a decode token drawn by the previous step, not read yet: its index there (tokens: [0])


@dataclass(frozen=True)
class StepTensors:
    """Views of a step buffer (host or device) for a batch of `width` tokens."""

    ids: torch.Tensor  # [1, width]: FEED's tokens hold a placeholder
    feed: torch.Tensor  # [width]: index into the previous step's sampled tokens, or -1
    positions: torch.Tensor  # [1, width]
    write_rows: torch.Tensor  # [width]: the cache row each token's K/V goes to (the dummy row for padding)
    slots: torch.Tensor  # [width]: each token's adapter slot
    # the first min(max_seqs, width) sequences: every sequence with tokens (each owns one at least, and the
    # padding ones come last)
    query_start: torch.Tensor  # [seqs + 1]: sequence s owns tokens query_start[s]:query_start[s + 1]
    seq_rows: torch.Tensor  # [seqs]: its cache row
    seq_lens: torch.Tensor  # [seqs]: its KV length after this step
    sample_index: torch.Tensor  # [max_seqs]: token whose logits are sampled, for the sampled sequences first


Segment = tuple[int, int, int]  # (slot, first token, end token) of a run of tokens sharing an adapter


class StepBuffer:
    """The host side of a step: `fill` lays sequences out; `views` reads any buffer of the same layout."""

    def __init__(self, max_tokens: int, max_seqs: int, dummy_row: int, no_adapter: int, pin: bool) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.dummy_row, self.no_adapter = dummy_row, no_adapter
        size = ROWS * max_tokens + 4 * max_seqs + 1
        self._hosts = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._views = [host.numpy() for host in self._hosts]  # the same memory, for cheap element writes
        self._turn = 0
        # ids, positions, write rows, slots, feed
        self._padding = numpy.array([[0], [0], [dummy_row], [no_adapter], [-1]])
        self.fill([], max_tokens)  # all padding: what graphs are captured on

    @property
    def host(self) -> torch.Tensor:
        """The buffer the last fill wrote."""
        return self._hosts[self._turn]

    def fill(self, seqs: list[Sequence], width: int) -> list[Segment]:
        """Lay out `seqs` (already in slot order) in `width` >= their tokens; the rest is padding that writes to
        the dummy row and belongs to no sequence. Returns the adapter segments (base-model runs left out). It
        writes the other host buffer than the last fill did: the last one's copy to the device may be pending."""
        self._turn ^= 1
        # Gathered in lists and written in one assignment per array: numpy's per-call cost dominates
        # element writes, and a decode step has one token per sequence.
        ids: list[int] = []
        positions: list[int] = []
        write_rows: list[int] = []
        slots: list[int] = []
        feeds: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        lens: list[int] = []
        samples: list[int] = []
        segments: list[Segment] = []
        no_adapter = self.no_adapter
        for seq in seqs:
            at, n, slot, end = len(ids), len(seq.tokens), seq.slot, seq.start + len(seq.tokens)
            starts.append(at)
            rows.append(seq.row)
            lens.append(end)
            ids += seq.tokens
            positions += range(seq.start, end)
            write_rows += [seq.row] * n
            slots += [slot] * n
            feeds += [-1] * (n - 1) + [seq.feed]
            if seq.sample:
                samples.append(at + n - 1)
            if slot != no_adapter:
                if segments and segments[-1][0] == slot and segments[-1][2] == at:
                    segments[-1] = (slot, segments[-1][1], at + n)
                else:
                    segments.append((slot, at, at + n))
        t, s, at = self.max_tokens, len(seqs), len(ids)
        assert at <= width <= t and s <= self.max_seqs, "a step larger than its buffer"
        view = self._views[self._turn]
        tokens = view[: ROWS * t].reshape(ROWS, t)
        tokens[:, :at] = (ids, positions, write_rows, slots, feeds)
        tokens[:, at:width] = self._padding  # padding tokens write to the dummy row with no adapter
        query_start, seq_rows, seq_lens, sample_index = self._seq_fields(view)
        query_start[:s], query_start[s:] = starts, at  # padding sequences own no tokens
        seq_rows[:s], seq_rows[s:] = rows, self.dummy_row
        seq_lens[:s], seq_lens[s:] = lens, 0
        sample_index[: len(samples)], sample_index[len(samples) :] = samples, 0
        return segments

    def _seq_fields(self, v):  # the four per-sequence arrays after the token block
        t, m = self.max_tokens, self.max_seqs
        base = ROWS * t
        return (v[base : base + m + 1], v[base + m + 1 : base + 2 * m + 1], v[base + 2 * m + 1 : base + 3 * m + 1],
                v[base + 3 * m + 1 : base + 4 * m + 1])  # fmt: skip

    def views(self, buffer: torch.Tensor, width: int, sampled: int | None = None) -> StepTensors:
        """Named views of `buffer` (this layout, on any device) for `width` tokens; `sampled`: keep only that
        many sample indices (eager), None: all max_seqs (a graph's static shape)."""
        t = self.max_tokens
        tokens = buffer[: ROWS * t].view(ROWS, t)[:, :width]
        query_start, seq_rows, seq_lens, sample_index = self._seq_fields(buffer)
        # A step of `width` tokens has at most `width` sequences: the attention's grid and its split of each
        # sequence's KV range are sized by that, not by max_seqs (a one-token decode step otherwise ran one
        # program a KV head over the whole context, its grid padded with max_seqs - 1 empty sequences).
        seqs = min(self.max_seqs, width)
        return StepTensors(
            tokens[IDS][None], tokens[FEED], tokens[POSITIONS][None], tokens[WRITE_ROWS], tokens[SLOTS],
            query_start[: seqs + 1], seq_rows[:seqs], seq_lens[:seqs],
            sample_index if sampled is None else sample_index[:sampled],
        )  # fmt: skip
