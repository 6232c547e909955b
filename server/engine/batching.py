"""Which tokens the next engine step runs: the policy of chunked prefill, kept apart from building tensors.

Every step is one forward over a flat token batch. Every decoding request contributes its one next token
(decode first, so running streams never wait behind a new prompt); prompts then fill the step's prompt-token
budget, cut into chunks that fit (a prompt's rest runs in the next steps). The budget bounds a step's cost, hence
the inter-token latency that running requests see while others arrive.

Prompts take the budget in a rotation between clients: each client's first prompt still prefilling goes in the
order it became its client's first (a client whose prompt is filled goes behind the others' waiting first prompts),
then the later prompts in admission order. With one prompt a client (many clients, each sending its own) that is
admission order. Without it, prompts went in admission order alone, and one client's burst of long prompts
(thousands of tokens each, admitted into free rows just before) held every step's budget for as many steps as they
had tokens: another client's short prompt, admitted a moment later, waited behind all of them for its first token;
now it waits for one of them at most. Splitting each step's budget equally between clients instead (max-min) served
that short prompt at once, but filled every client's prompt side by side: with many clients of one long prompt
each, every first token came as late as the last one (in a simulation of distinct clients at 80% load, p99 30 ->
57 steps).

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
    turn: Callable[[K], int] = lambda key: 0,
) -> list[tuple[K, int]]:
    """(request, tokens this step) for every decoding request (1 token each), then the prompt chunks that fit
    `budget` prompt tokens, in admission order; `prefilling`: (request, prompt tokens not yet in the cache), in
    admission order; `scored`: whether a prompt's every position is scored (at most SCORED_TOKENS of those a
    step); `client`: whose request it is; `turn`: a client's first prompt's place in the rotation between clients,
    asked of each client's first prompt, in admission order (the engine numbers a prompt as first asked)."""
    firsts: list[int] = []
    later: list[int] = []
    clients: set[Hashable] = set()
    for i, (key, _) in enumerate(prefilling):
        who = client(key)
        (later if who in clients else firsts).append(i)
        clients.add(who)
    chunks: dict[int, int] = {}
    left, scored_left = budget, SCORED_TOKENS
    for i in sorted(firsts, key=lambda i: turn(prefilling[i][0])) + later:
        if left <= 0:
            break
        key, remaining = prefilling[i]
        is_scored = scored(key)
        take = min(remaining, left, scored_left) if is_scored else min(remaining, left)
        if not take:  # the scored prompts have their share of this step: the next prompt may still fit
            continue
        chunks[i] = take
        left -= take
        scored_left -= take if is_scored else 0
    return [(key, 1) for key in decoding] + [(prefilling[i][0], chunks[i]) for i in sorted(chunks)]
