"""Which tokens the next engine step runs: the policy of chunked prefill, kept apart from building tensors.

Every step is one forward over a flat token batch. Every decoding request contributes its one next token
(decode first, so running streams never wait behind a new prompt); prompts then fill the step's prompt-token
budget, cut into chunks that fit (a prompt's rest runs in the next steps). The budget bounds a step's cost, hence
the inter-token latency that running requests see while others arrive.

The budget is shared between clients, max-min fair: each client with a prompt to fill takes an equal part of what
is left, a client needing less gives the rest to the others, and each client's prompts take its part in admission
order. Without it, prompts filled in admission order alone, and one client's burst of long prompts (thousands of
tokens each, admitted into free rows just before) held every step's budget for as many steps as they had tokens:
another client's short prompt, admitted a moment later, waited behind all of them for its first token. One client
alone keeps admission order, as before.

A prompt whose every token is scored (prompt logprobs) keeps the logits of each of its chunk's positions, [chunk,
vocabulary] beside the sampled rows' (fp32 once scored: 256 positions of a 152K vocabulary are ~156 MB, twice
that for the log-softmax's intermediates): such prompts take at most SCORED_TOKENS of a step between them, which
bounds that memory whatever the prompt budget is; the other prompts take the rest of the budget as before.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

K = TypeVar("K")

SCORED_TOKENS = 256  # prompt tokens of a step whose logits are kept for scoring, in all of its scored prompts


def plan_step(
    decoding: Sequence[K],
    prefilling: Sequence[tuple[K, int]],
    budget: int,
    scored: Callable[[K], bool] = lambda key: False,
    client: Callable[[K], Hashable] = lambda key: None,
) -> list[tuple[K, int]]:
    """(request, tokens this step) for every decoding request (1 token each), then the prompt chunks that fit
    `budget` prompt tokens, in admission order; `prefilling`: (request, prompt tokens not yet in the cache), in
    admission order; `scored`: whether a prompt's every position is scored (at most SCORED_TOKENS of those a
    step); `client`: whose request it is (the budget is shared between clients, max-min fair)."""
    queues: dict[Hashable, list[int]] = {}  # client -> indexes into `prefilling` still wanting tokens, in order
    for i, (key, _) in enumerate(prefilling):
        queues.setdefault(client(key), []).append(i)
    wanted = [remaining for _, remaining in prefilling]
    chunks = [0] * len(prefilling)
    left, scored_left = budget, SCORED_TOKENS
    while left > 0 and queues:
        part = max(1, left // len(queues))  # each client's part of this round; what one leaves goes to the next
        for who in list(queues):
            queue, give = queues[who], min(part, left)
            while give and queue:
                i = queue[0]
                is_scored = scored(prefilling[i][0])
                take = min(wanted[i], give, scored_left) if is_scored else min(wanted[i], give)
                if take == wanted[i] or not take:  # filled, or the scored prompts have their share of this step
                    queue.pop(0)
                chunks[i] += take
                wanted[i] -= take
                give -= take
                left -= take
                scored_left -= take if is_scored else 0
            if not queue:
                del queues[who]
            if not left:
                break
    return [(key, 1) for key in decoding] + [(key, n) for (key, _), n in zip(prefilling, chunks, strict=True) if n]
