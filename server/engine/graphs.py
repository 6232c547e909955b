"""CUDA graphs of the engine step, one per token bucket, over one static device copy of the step buffer.

Every step (decode tokens and prompt chunks alike) is one forward over a flat token batch whose metadata lives
in device tensors (step.py), so a step's only shape is its token count: padded up to a bucket, it replays a
graph. Adapters are activated by copying into the LoRA slot stores in place, so graphs are never recaptured.
"""

from collections.abc import Callable

import torch

# forward(step buffer on the device, width in tokens) -> logits [max_seqs, V] of the sampled tokens
StepForward = Callable[[torch.Tensor, int], torch.Tensor]


def buckets_up_to(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class StepGraphs:
    def __init__(
        self, forward: StepForward, buckets: list[int], empty_step: torch.Tensor, device: torch.device
    ) -> None:
        """`empty_step`: a host step buffer laid out with no sequence (every token padding), replayed at capture."""
        self.buckets = sorted(buckets)
        self._buffer = empty_step.to(device)  # the static input every graph reads
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        pool = None
        for width in reversed(self.buckets):  # largest first, so smaller graphs fit in its memory pool
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy inits and autotuning happen outside the capture
                    forward(self._buffer, width)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[width] = forward(self._buffer, width)
            pool = graph.pool()
            self._graphs[width] = graph

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def run(self, step: torch.Tensor, width: int) -> torch.Tensor:
        """Replay the graph of `width` (a bucket) on `step`, a host step buffer (pinned: the copy does not
        block) -> logits [max_seqs, V], the sampled sequences' first."""
        self._buffer.copy_(step, non_blocking=True)
        self._graphs[width].replay()
        return self._logits[width]
