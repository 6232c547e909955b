"""CUDA graphs of the decode step, one per (batch bucket, KV-length bucket), over one static input buffer.

A graph attends over its KV bucket only, so short sequences do not pay for max_seq_len. Adapters are
activated by copying into the LoRA slot stores in place, so graphs are never recaptured.
"""

from collections.abc import Callable

import torch

# forward(input_ids [B, 1], positions [B, 1], write_rows [B, 1], slot_ids [B], kv_len) -> logits [B, V]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# Rows of the packed step inputs [4, B]: what each batch row feeds the decode step.
IDS, POSITIONS, WRITE_ROWS, SLOTS = range(4)


def decode_args(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split packed inputs [4, B] into (ids [B, 1], positions [B, 1], write_rows [B, 1], slots [B])."""
    return inputs[IDS, :, None], inputs[POSITIONS, :, None], inputs[WRITE_ROWS, :, None], inputs[SLOTS]


def buckets_up_to(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class DecodeGraphs:
    def __init__(
        self, forward: DecodeForward, batch_buckets: list[int], kv_buckets: list[int], device: torch.device
    ) -> None:
        self.batch_buckets, self.kv_buckets = sorted(batch_buckets), sorted(kv_buckets)
        self._inputs = torch.zeros(4, self.batch_buckets[-1], dtype=torch.long, device=device)  # [4, B_max]
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        pool = None
        # Largest first, so smaller graphs fit in its memory pool. The zero inputs write into cache row 0,
        # position 0, which holds no request yet when graphs are captured at start-up.
        for b in reversed(self.batch_buckets):
            for kv in reversed(self.kv_buckets):
                args = (*decode_args(self._inputs[:, :b]), kv)
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: lazy inits and autotuning happen outside the capture
                        forward(*args)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._logits[b, kv] = forward(*args)
                pool = graph.pool()
                self._graphs[b, kv] = graph

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    def run(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Replay the graph of `inputs`' width (a batch bucket, padded by the caller) and the smallest KV bucket
        holding kv_len positions; inputs: [4, b] long (pinned host memory: the copy does not block)."""
        b = inputs.shape[1]
        kv = next(k for k in self.kv_buckets if k >= kv_len)
        self._inputs[:, :b].copy_(inputs, non_blocking=True)
        self._graphs[b, kv].replay()
        return self._logits[b, kv]  # [b, V]
