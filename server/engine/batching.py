"""Which tokens the next engine step runs: the policy of chunked prefill, kept apart from building tensors.

Every step is one forward over a flat token batch. Every decoding request contributes its one next token
(decode first, so running streams never wait behind a new prompt); prompts then fill the step's prompt-token
budget in admission order, the last one cut into a chunk that fits (its rest runs in the next steps). The
budget bounds a step's cost, hence the inter-token latency that running requests see while others arrive.
"""

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def plan_step(decoding: Sequence[K], prefilling: Sequence[tuple[K, int]], budget: int) -> list[tuple[K, int]]:
    """(request, tokens this step) for every decoding request (1 token each) and the prompt chunks that fit
    `budget` prompt tokens; `prefilling`: (request, prompt tokens not yet in the cache), in admission order."""
    plan = [(key, 1) for key in decoding]
    left = budget
    for key, remaining in prefilling:
        if left <= 0:
            break
        take = min(remaining, left)
        plan.append((key, take))
        left -= take
    return plan
