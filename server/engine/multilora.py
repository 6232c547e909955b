"""Multi-LoRA linear layer: one base matmul for the batch, plus a per-row LoRA delta from slot-stacked weights.

Slots are allocated once and padded to max_lora_rank; slot `num_slots` stays all-zero and means "no
adapter", so base rows run the same kernels as adapter rows (no branching, graph-capturable).
"""

import torch
from torch import nn

from adapters.lora import LoraModule


class LoraContext:
    """Per-forward slot of every row, shared by all wrapped layers; the engine fills it before each forward."""

    def __init__(self, slot_ids: torch.Tensor) -> None:
        self.slot_ids = slot_ids  # [B] long: slot of each batch row


class MultiLoraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        context: LoraContext,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.context = context
        # B is kept as [S, r, out] (not PEFT's [out, r]) so both matmuls are plain bmm on contiguous slots.
        self.register_buffer("lora_a", torch.zeros(num_slots + 1, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(num_slots + 1, max_rank, out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, in]
        y = self.base(x)  # [B, T, out]
        slots = self.context.slot_ids  # [B]
        if x.shape[0] == 1:  # prefill (one request): index the slot instead of gathering copies per row
            a = self.lora_a.index_select(0, slots)[0]  # [r, in]; index_select: no host sync under capture
            b = self.lora_b.index_select(0, slots)[0]  # [r, out]
            return y + ((x[0].to(a.dtype) @ a.T) @ b)[None].to(y.dtype)
        a = self.lora_a.index_select(0, slots)  # [B, r, in]
        b = self.lora_b.index_select(0, slots)  # [B, r, out]
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b)  # [B, T, out]
        return y + delta.to(y.dtype)

    def load(self, slot: int, module: LoraModule | None) -> None:
        """Copy one adapter's A and scaled B into `slot` (zeros where it does not target this module)."""
        a, b = self.lora_a[slot], self.lora_b[slot]  # [r_max, in], [r_max, out]
        if module is None:
            a.zero_()
            b.zero_()
            return
        r = module.rank
        a[:r].copy_(module.a, non_blocking=True)
        b[:r].T.copy_(module.b, non_blocking=True)  # transposed on the device: the CPU source stays contiguous
        b[:r].mul_(module.scaling)  # scaling folded into B on the device, after the copy
        a[r:].zero_()
        b[r:].zero_()
