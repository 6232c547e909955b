"""Token constraints (structured output) on the engine side: what a per-request matcher must do, and the step's
masks for the constrained rows. The grammar engine itself lives outside the engine (server/grammar.py); here a
matcher is anything with `fill_mask`, `advance`, `is_finished` and a `family`.

Masks are token bitmasks, as xgrammar and llguidance fill them: int32 words, bit b of word w allowing token
32 w + b. The engine fills them after it has launched the forward and before it samples, so the CPU work overlaps
the device's; rows without a constraint are not looked at. They are filled on the engine thread, and on a few threads
beside it where the rows' masks cost enough for that to pay (MaskFiller)."""

import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.engine.errors import GrammarDeadEnd, GrammarFailed
from server.engine.sampling import device_tensor

# Threads filling a step's masks, the engine's own among them, at most: the host's other cores serve the event loop,
# the tokenizer's processes and the grammar compiles
MAX_MASK_THREADS = 8
# What filling a step's masks on threads must save, by the rows' estimates, to be done: on 2 cores the hand-off to a
# thread and back cost 0.03-0.09 ms a step (4-16 rows of JSON mode), and the engine thread waits longer for a busy one
MIN_SAVING_S = 0.5e-3
# Of a matcher's newest fill in its estimate: a mask's cost varies from token to token (JSON mode's median is 7 us,
# its mean 40 us), and a complex grammar's does not fall to a cheap one's in a few tokens
ESTIMATE_WEIGHT = 0.25

log = logging.getLogger("loraplex.engine")


class TokenConstraint(Protocol):
    @property
    def family(self) -> object | None:
        """What this matcher's fills share with other matchers' (None: nothing), which makes them take turns: filled
        on threads at once, the matchers of one family only wait for each other (llguidance's copies of a matcher,
        a request's choices, share its lexer)."""

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


class MaskFiller:
    """Fills each step's masks, on the calling thread (the engine's) alone or with a few threads of its own.

    llguidance fills a mask without the interpreter lock, so several rows' masks can be filled at once. A mask of a
    complex grammar costs 0.3-4 ms: 16 requests of a regex of words (1.5 ms a mask) took 22-26 ms a step on the engine
    thread alone and 11-12 ms on two threads (2 cores, bench/masks.py). But a hand-off to a thread costs about what a
    cheap mask does: rows of JSON mode (0.01-0.02 ms a mask) went 0.44-0.84x as fast on two threads. So each matcher's
    fills are timed (a moving estimate, kept for the matchers of the last step), and a step's rows go to as many threads
    as threads_for finds worth it by the estimates. The matchers of one family (TokenConstraint.family) take turns
    whatever the threads, so each family is filled by one thread, row after row: a request's n choices, alone, stay on
    the engine thread (even llguidance's own LLExecutor filled them no faster than one thread: bench/masks.py --choices
    --executor). The calling thread fills families too, taking them in turn with the threads, costliest first. `threads`
    counts the calling thread; the others start once, at the first step that uses them. Where none can start, this
    thread fills the step's rows, and every later step's: masks never depend on the pool. Not thread-safe: one engine
    calls it."""

    def __init__(self, threads: int | None = None, min_saving_s: float = MIN_SAVING_S) -> None:
        self.threads = max(1, threads if threads is not None else min(os.cpu_count() or 1, MAX_MASK_THREADS))
        self._min_saving_s = min_saving_s
        self._pool = ThreadPoolExecutor(self.threads - 1, "loraplex-masks") if self.threads > 1 else None
        # id(matcher) -> (the matcher, seconds its fills take): held, so that its id is no other matcher's
        self._estimates: dict[int, tuple[TokenConstraint, float]] = {}

    def fill(
        self, constraints: Sequence[TokenConstraint | None], vocab: int, banned: Sequence[frozenset[int]] | None = None
    ) -> StepMasks | None:
        """The masks of the rows that have a constraint; None (no work at all) when no row has one. A row whose
        matcher raises, or allows no token, is recorded in `failed` and left unmasked (its token is thrown away): as
        GrammarDeadEnd when the grammar cannot go on (a mask with no token says so too), else as GrammarFailed.
        `banned[i]`: tokens row i may not draw now (its stop tokens, short of min_tokens), left out of its mask."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:  # every step of unconstrained rows: nothing more
            self._estimates.clear()
            return None
        matchers = [c for c in constraints if c is not None]
        masks = StepMasks(rows, torch.zeros(len(rows), mask_words(vocab), dtype=torch.int32))
        known = [self._estimates.get(id(m)) for m in matchers]
        expected = [e[1] if e is not None else 0.0 for e in known]  # a new matcher has none: taken as cheap
        bans = [banned[i] if banned is not None else frozenset() for i in rows]

        def fill_row(j: int) -> tuple[BaseException | None, float]:
            start = time.perf_counter()
            failure = _fill_one(matchers[j], masks.bits[j], bans[j], vocab)
            return failure, time.perf_counter() - start

        families: dict[int, list[int]] = {}  # the rows of each family (a matcher alone is its own), in order
        for j, matcher in enumerate(matchers):
            families.setdefault(id(matcher.family if matcher.family is not None else matcher), []).append(j)
        units = [(sum(expected[j] for j in family), family) for family in families.values()]
        threads = threads_for([cost for cost, _ in units], self.threads, self._min_saving_s)
        if threads > 1:
            order = [family for _, family in sorted(units, key=lambda unit: unit[0], reverse=True)]
            outcomes = self._fill_together(fill_row, order, len(rows), threads - 1)
        else:
            outcomes = [fill_row(j) for j in range(len(rows))]
        estimates: dict[int, tuple[TokenConstraint, float]] = {}
        for i, matcher, (failure, seconds), previous in zip(rows, matchers, outcomes, known, strict=True):
            if failure is not None:
                masks.failed[i] = failure
            if previous is not None:
                seconds = previous[1] + ESTIMATE_WEIGHT * (seconds - previous[1])
            estimates[id(matcher)] = (matcher, seconds)
        self._estimates = estimates
        return masks

    def _fill_together(
        self,
        fill_row: Callable[[int], tuple[BaseException | None, float]],
        order: list[list[int]],
        count: int,
        helpers: int,
    ) -> list[tuple[BaseException | None, float]]:
        """The `count` rows, by families in `order`, filled by this thread and `helpers` of the pool's, each taking
        the next family not taken and filling its rows in turn; their outcomes by row."""
        assert self._pool is not None
        outcomes: list[tuple[BaseException | None, float]] = [(None, 0.0)] * count
        taken = itertools.count()  # its next() is atomic: each family is taken once

        def work() -> None:
            while (n := next(taken)) < len(order):
                for j in order[n]:
                    outcomes[j] = fill_row(j)

        started: list[Future[None]] = []
        try:
            for _ in range(helpers):
                started.append(self._pool.submit(work))
        except RuntimeError as exc:  # no thread could start: serial from now on, as masks were always filled
            log.warning("mask threads unavailable (%s): masks are filled on the engine thread alone", exc)
            self.close()
        work()
        for future in started:
            if not future.cancel():  # one that never started has no row to fill
                future.result()
        return outcomes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.threads = None, 1


def threads_for(costs: list[float], threads: int, min_saving_s: float) -> int:
    """The threads, the caller's among them and at most `threads`, that fill a step whose families' masks are
    estimated to cost `costs` seconds: more than the caller's alone only where they save at least `min_saving_s` by
    the estimates (the costs' sum, less the larger of the costliest family's and each thread's share of the sum), and
    as many as the work fills, each given a share worth that saving: waking a thread and taking its rows back cost
    0.1-0.15 ms on 2 cores and on 16, so 16 rows of JSON mode (0.04 ms a mask, 128k tokens) on 8 threads took twice as
    long as on one (bench/masks.py)."""
    total = sum(costs)
    filled = math.ceil(total / min_saving_s) if min_saving_s > 0 else len(costs)
    used = max(1, min(threads, len(costs), filled))
    return used if used > 1 and total - max(max(costs), total / used) >= min_saving_s else 1


def _fill_one(matcher: TokenConstraint, row: torch.Tensor, banned: frozenset[int], vocab: int) -> BaseException | None:
    """Fill one row's mask [ceil(V / 32)]; its failure, if any, with the row set to allow every token (it stays
    finite, and its draw is discarded)."""
    try:
        matcher.fill_mask(row)
        if not row.any():
            raise GrammarDeadEnd("the grammar allows no token at this point")
        if banned:
            # The sampler sets banned tokens to -inf: a grammar allowing nothing else left the row no finite
            # logit, and its NaN draw ended it as a server fault (activations overflowed, a 500)
            row &= _kept_words(banned, vocab)
            if not row.any():
                raise GrammarDeadEnd(
                    "the grammar allows only tokens that end the answer here (the end of sequence, "
                    "stop_token_ids), which min_tokens holds back: send a smaller min_tokens, or a grammar "
                    "whose answers are that long"
                )
    except Exception as exc:
        row.fill_(-1)
        return exc if isinstance(exc, GrammarDeadEnd) else GrammarFailed(f"the grammar failed: {exc}")
    return None


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
