"""Multi-LoRA linear layers over one slot-stacked weight store, and the packed form adapters are activated from.

Every wrapped layer's A (and scaled, transposed B) lives as a column range of one store per side:
A [S+1, r_max, sum of in_features], B [S+1, r_max, sum of out_features]. Slot `S` stays all-zero and means
"no adapter", so base rows run the same kernels as adapter rows (no branching, graph-capturable). One
adapter is packed once on the CPU into the same column layout, so activating it is two host->device copies.
"""

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adapters.lora import LoraModule, LoraWeights

# (base layer, x [B, in], A [S+1, r, in], B [S+1, r, out], slots [B]) -> base(x) + each row's LoRA delta [B, out]
DecodeLinear = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LoraContext:
    """Per-forward slot of every row, shared by all wrapped layers; the engine sets it before each forward."""

    def __init__(self, num_slots: int, max_rank: int) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_ids = torch.empty(0, dtype=torch.long)  # [B] slot of each batch row
        self.mask: torch.Tensor | None = None  # [B, (S+1) * r_max]: 1 on the row's own slot, for the dense path
        self.decode_linear: DecodeLinear | None = None  # fused kernels for decode steps, where installed

    def set(self, slot_ids: torch.Tensor, dtype: torch.dtype) -> None:
        """Pick the LoRA kernel for this forward: gathering per-row weights reads each row's adapter three
        times (read, write, read), the dense path reads every slot once; dense wins once 3B > S+1 (decode only:
        for prefill its FLOPs grow with the tokens). Where a fused decode kernel is installed, decode takes it."""
        self.slot_ids = slot_ids
        self.mask = None
        if self.decode_linear is None and 3 * slot_ids.shape[0] > self.num_slots + 1:
            columns = torch.arange((self.num_slots + 1) * self.max_rank, device=slot_ids.device)
            self.mask = (columns // self.max_rank == slot_ids[:, None]).to(dtype)


@dataclass(frozen=True)
class LoraLayout:
    """Column ranges of each wrapped layer in the A and B stores (and in every packed adapter)."""

    a_offsets: dict[str, int]
    b_offsets: dict[str, int]
    a_width: int  # sum of in_features
    b_width: int  # sum of out_features


class LoraStore:
    """The device slots: A [S+1, r_max, a_width] and B [S+1, r_max, b_width]; scaling is folded into B."""

    def __init__(
        self, layout: LoraLayout, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.layout = layout
        self.a = torch.zeros(num_slots + 1, max_rank, layout.a_width, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots + 1, max_rank, layout.b_width, dtype=dtype, device=device)

    def views(self, name: str, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's [S+1, r_max, in] and [S+1, r_max, out] views of the stores."""
        a0, b0 = self.layout.a_offsets[name], self.layout.b_offsets[name]
        return self.a[:, :, a0 : a0 + in_features], self.b[:, :, b0 : b0 + out_features]

    def load(self, slot: int, packed: "PackedLora") -> None:
        """Copy a packed adapter into `slot`: the rows above its rank are zeroed, so no stale weights remain."""
        r = packed.a.shape[0]
        self.a[slot, :r].copy_(packed.a, non_blocking=True)  # [r, a_width]: contiguous on both sides
        self.b[slot, :r].copy_(packed.b, non_blocking=True)
        self.a[slot, r:].zero_()
        self.b[slot, r:].zero_()


@dataclass(frozen=True)
class PackedLora:
    a: torch.Tensor  # [r, a_width], modules the adapter does not target are zero
    b: torch.Tensor  # [r, b_width], scaled B transposed


def pack_lora(lora: LoraWeights, layout: LoraLayout, dtype: torch.dtype, pin: bool) -> PackedLora:
    r = lora.rank
    a = torch.zeros(r, layout.a_width, dtype=dtype, pin_memory=pin)
    b = torch.zeros(r, layout.b_width, dtype=dtype, pin_memory=pin)
    for name, module in lora.modules.items():
        a0, b0 = layout.a_offsets[name], layout.b_offsets[name]
        a[: module.rank, a0 : a0 + module.a.shape[1]] = module.a
        b[: module.rank, b0 : b0 + module.b.shape[0]] = module.b.T * module.scaling
    return PackedLora(a, b)


class PackCache:
    """Packed form of each LoraWeights object, kept while that object lives (the registry's CPU tier).

    Packing runs on the submitting thread, so the engine thread only pays the device copies on activation.
    """

    def __init__(self, layout: LoraLayout, dtype: torch.dtype, pin: bool) -> None:
        self._layout, self._dtype, self._pin = layout, dtype, pin
        self._packs: dict[int, PackedLora] = {}  # id(LoraWeights) -> its pack, dropped when it is collected
        self._lock = threading.Lock()

    def get(self, lora: LoraWeights) -> PackedLora:
        with self._lock:
            packed = self._packs.get(id(lora))
        if packed is None:
            packed = self._keep(lora, pack_lora(lora, self._layout, self._dtype, self._pin))
        return packed

    def pack_in_place_of(self, lora: LoraWeights) -> LoraWeights:
        """Pack `lora` and return the same adapter as views of its pack (scaling folded into B), whose pack is
        kept while the views live: whoever holds the views instead of `lora` holds the adapter's memory once."""
        packed = pack_lora(lora, self._layout, self._dtype, self._pin)
        views = {}
        for name, module in lora.modules.items():
            a0, b0 = self._layout.a_offsets[name], self._layout.b_offsets[name]
            a = packed.a[: module.rank, a0 : a0 + module.a.shape[1]]  # [r, in]
            b = packed.b[: module.rank, b0 : b0 + module.b.shape[0]].T  # [out, r]
            views[name] = LoraModule(a, b, 1.0)
        viewed = LoraWeights(views)
        self._keep(viewed, packed)
        return viewed

    def _keep(self, lora: LoraWeights, packed: PackedLora) -> PackedLora:
        key = id(lora)
        with self._lock:
            if key not in self._packs:
                weakref.finalize(lora, self._drop, key)
            self._packs[key] = packed
        return packed

    def _drop(self, key: int) -> None:
        with self._lock:
            self._packs.pop(key, None)


class MultiLoraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        context: LoraContext,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.context = context
        # Views of the shared stores (not buffers: they must keep aliasing the stores).
        self.lora_a = lora_a  # [S+1, r_max, in]
        self.lora_b = lora_b  # [S+1, r_max, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, in]
        slots, mask = self.context.slot_ids, self.context.mask  # [B], [B, (S+1) r] or None
        if self.context.decode_linear is not None and x.shape[1] == 1:
            y = self.context.decode_linear(self.base, x.reshape(-1, self.in_features), self.lora_a, self.lora_b, slots)
            return y.view(*x.shape[:-1], self.out_features)
        y = self.base(x)  # [B, T, out]
        xa = x.to(self.lora_a.dtype)
        if mask is not None and x.shape[1] == 1:  # decode of a large batch: every slot once, own slot masked in
            shrunk = xa[:, 0] @ self.lora_a.flatten(0, 1).T  # [B, (S+1) r]
            delta = ((shrunk * mask) @ self.lora_b.flatten(0, 1))[:, None]  # [B, 1, out]
        elif x.shape[0] == 1:  # one request: index its slot instead of gathering copies per row
            a = self.lora_a.index_select(0, slots)[0]  # [r, in]; index_select: no host sync under capture
            b = self.lora_b.index_select(0, slots)[0]  # [r, out]
            delta = ((xa[0] @ a.T) @ b)[None]
        else:
            a = self.lora_a.index_select(0, slots)  # [B, r, in]
            b = self.lora_b.index_select(0, slots)  # [B, r, out]
            delta = torch.bmm(torch.bmm(xa, a.transpose(1, 2)), b)  # [B, T, out]
        return y + delta.to(y.dtype)
