"""Zeros for split-K sums without a fill launch before every matmul.

A matmul that splits K over programs adds their sums atomically into fp32 zeros, and a launch after it
(finish_projection) reads the sums. A fill before every such matmul is 96 launches a decode step of 17-64 rows on
Llama-3-8B shapes (q/k/v, o and down in each layer). Instead, each model keeps one buffer per device that holds
zeros between projections: a matmul adds into a view of it, and the launch reading the sums stores zeros back
where it read them.

The host keeps the buffer honest: a view taken and not yet given back marks it dirty (an error between the two
launches, or a reader that did not clean), and the next take fills it again first. While a CUDA graph is being
captured nothing can be filled or grown (the fill would only run at replay), so a take then gives a new zeroed
tensor, as before. The engine projects on one stream a device, in order, which is what lets every projection of
a step share the buffer.
"""

import torch


class ZeroedSums:
    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}  # flat fp32, zero outside a taken view
        self._dirty: set[torch.device] = set()

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """[rows, cols] fp32 zeros: a view of the device's buffer, to be left zero and given back (give_back), or
        a new tensor where the buffer cannot serve (while capturing, too small or dirty)."""
        need = rows * cols
        buffer = self._buffers.get(device)
        usable = buffer is not None and buffer.numel() >= need
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            if not usable or device in self._dirty:
                return torch.zeros(rows, cols, dtype=torch.float32, device=device)
        elif not usable:
            buffer = self._buffers[device] = torch.zeros(need, dtype=torch.float32, device=device)
        elif device in self._dirty:
            buffer.zero_()
        assert buffer is not None
        self._dirty.add(device)
        return buffer[:need].view(rows, cols)

    def holds(self, sums: torch.Tensor) -> bool:
        """Whether `sums` is a view of a buffer here (its reader must store zeros back)."""
        buffer = self._buffers.get(sums.device)
        return buffer is not None and sums.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()

    def give_back(self, sums: torch.Tensor) -> None:
        """`sums` was read and zeroed by a launch already queued: the buffer is clean again."""
        if self.holds(sums):
            self._dirty.discard(sums.device)
