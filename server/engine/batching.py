"""Which tokens the next engine step runs: the policy of chunked prefill, kept apart from building tensors.

Every step is one forward over a flat token batch. Every decoding request contributes its one next token
(decode first, so running streams never wait behind a new prompt); prompts then fill the step's prompt-token
budget in admission order, the last one cut into a chunk that fits (its rest runs in the next steps). The
budget bounds a step's cost, hence the inter-token latency that running requests see while others arrive.

A prompt whose every token is scored (prompt logprobs) keeps the logits of each of its chunk's positions, [chunk,
vocabulary] beside the sampled rows' (fp32 once scored: 256 positions of a 152K vocabulary are ~156 MB, twice
that for the log-softmax's intermediates): such prompts take at most SCORED_TOKENS of a step between them, which
bounds that memory whatever the prompt budget is; the other prompts take the rest of the budget as before.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

K = TypeVar("K")

SCORED_TOKENS = 256  # prompt tokens of a step whose logits are kept for scoring, in all of its scored prompts


def plan_step(
    decoding: Sequence[K],
    prefilling: Sequence[tuple[K, int]],
    budget: int,
    scored: Callable[[K], bool] = lambda key: False,
) -> list[tuple[K, int]]:
    """(request, tokens this step) for every decoding request (1 token each) and the prompt chunks that fit
    `budget` prompt tokens; `prefilling`: (request, prompt tokens not yet in the cache), in admission order;
    `scored`: whether a prompt's every position is scored (at most SCORED_TOKENS of those a step)."""
    plan = [(key, 1) for key in decoding]
    left, scored_left = budget, SCORED_TOKENS
    for key, remaining in prefilling:
        if left <= 0:
            break
        is_scored = scored(key)
        take = min(remaining, left, scored_left) if is_scored else min(remaining, left)
        if not take:  # the scored prompts have their share of this step: the next prompt may still fit
            continue
        plan.append((key, take))
        left -= take
        scored_left -= take if is_scored else 0
    return plan
