"""CUDA graphs of the decode step, one per batch-size bucket, over static input buffers.

Adapters are activated by copying into the LoRA slot buffers in place, so graphs are never recaptured.
"""

from collections.abc import Callable

import torch

# forward(input_ids [B, 1], positions [B, 1], write_rows [B], slot_ids [B]) -> logits [B, V]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraphs:
    def __init__(
        self, forward: DecodeForward, buckets: list[int], dummy_row: int, no_adapter: int, device: torch.device
    ) -> None:
        self.buckets = sorted(buckets)
        size = self.buckets[-1]
        self._ids = torch.zeros(size, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, 1, dtype=torch.long, device=device)
        self._rows = torch.full((size,), dummy_row, dtype=torch.long, device=device)
        self._slots = torch.full((size,), no_adapter, dtype=torch.long, device=device)
        self._pad = (dummy_row, no_adapter)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs fit in its memory pool
            args = (self._ids[:b], self._positions[:b], self._rows[:b], self._slots[:b])
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy inits and autotuning happen outside the capture
                    forward(*args)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[b] = forward(*args)
            pool = graph.pool()
            self._graphs[b] = graph

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # ids, positions: [n, 1]; rows, slots: [n]  ->  logits [n, V]
        n = ids.shape[0]
        b = self.bucket(n)
        self._ids[:n].copy_(ids)
        self._positions[:n].copy_(positions)
        self._rows[:n].copy_(rows)
        self._slots[:n].copy_(slots)
        self._ids[n:b].zero_()
        self._positions[n:b].zero_()
        self._rows[n:b].fill_(self._pad[0])
        self._slots[n:b].fill_(self._pad[1])
        self._graphs[b].replay()
        return self._logits[b][:n]
