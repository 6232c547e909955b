"""CUDA graphs of the engine step, one per token bucket, over one static device copy of the step buffer.

Every step (decode tokens and prompt chunks alike) is one forward over a flat token batch whose metadata lives
in device tensors (step.py), so a step's only shape is its token count: padded up to a bucket, it replays a
graph. Adapters are activated by copying into the LoRA slot stores in place, so graphs are never recaptured.

Each bucket has a second graph for steps that score prompt positions (prompt_logprobs): it also keeps the logits
of up to `scored_tokens` flat token indices, read from a static index buffer (the unused ones index token 0, their
logits ignored), and writes its logits into one output that every scoring graph shares. Run eagerly instead, such
a step took the host ~3,000 kernel launches: every decoding row beside it waited many times a replay's time.
"""

from collections.abc import Callable

import torch

from server.engine.sampling import device_tensor

# forward(step buffer on the device, width in tokens, flat indices of scored positions or None) -> logits
# [max_seqs (+ scored), V]: of the sampled tokens, then of the scored positions
StepForward = Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]


def buckets_up_to(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


# replays a captured step -> its logits [max_seqs (+ scored_tokens), V]
Replay = Callable[[], torch.Tensor]


class StepGraphs:
    def __init__(
        self,
        forward: StepForward,
        buckets: list[int],
        empty_step: torch.Tensor,
        device: torch.device,
        scored_tokens: int,
    ) -> None:
        """`empty_step`: a host step buffer laid out with no sequence (every token padding), replayed at capture;
        `scored_tokens`: the most prompt positions a step scores."""
        self.buckets = sorted(buckets)
        self.device = device
        self._buffer = empty_step.to(device)  # the static input every graph reads
        self._scored = torch.zeros(scored_tokens, dtype=torch.long, device=device)  # [S] flat token indices
        # (width, whether it scores) -> its replay
        self._replays: dict[tuple[int, bool], Replay] = self._capture(forward)

    def _capture(self, forward: StepForward) -> dict[tuple[int, bool], Replay]:
        replays: dict[tuple[int, bool], Replay] = {}
        scoring_logits = None  # [max_seqs + S, V]: written by every scoring graph
        pool = None
        for width in reversed(self.buckets):  # largest first, so smaller graphs fit in its memory pool
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy inits and autotuning happen outside the capture
                    forward(self._buffer, width, None)
                scoring = forward(self._buffer, width, self._scored)  # the head's wider matmul, once
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if scoring_logits is None:
                scoring_logits = torch.empty_like(scoring)
            del scoring
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward(self._buffer, width, None)
            pool = graph.pool()
            replays[width, False] = self._replay(graph, logits)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):  # its logits are freed in the pool: the next capture's to reuse
                scoring_logits.copy_(forward(self._buffer, width, self._scored))
            replays[width, True] = self._replay(graph, scoring_logits)
        return replays

    @staticmethod
    def _replay(graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> Replay:
        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def run(self, step: torch.Tensor, width: int, scored: list[int]) -> torch.Tensor:
        """Replay the graph of `width` (a bucket) on `step`, a host step buffer (pinned: the copy does not
        block), keeping the logits of the `scored` flat token indices (at most scored_tokens) where there are any
        -> logits [max_seqs + len(scored), V], the sampled sequences' first and the scored positions' last."""
        self._buffer.copy_(step, non_blocking=True)
        if not scored:
            return self._replays[width, False]()
        unused = len(self._scored) - len(scored)
        self._scored.copy_(device_tensor(scored + [0] * unused, self.device))
        logits = self._replays[width, True]()
        return logits[: logits.shape[0] - unused]
