"""Multi-LoRA linear layers over one slot-stacked weight store, and the packed form adapters are activated from.

Every wrapped layer's A (and scaled, transposed B) lives as a column range of one store per side:
A [S+1, r_max, sum of in_features], B [S+1, r_max, sum of out_features]. Slot `S` stays all-zero and means
"no adapter", so base rows run the same kernels as adapter rows (no branching, graph-capturable). One
adapter is packed once on the CPU into the same column layout, so activating it is two host->device copies.
"""

import threading
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from adapters.bounds import all_finite
from adapters.lora import LoraModule, LoraWeights
from server.engine.errors import AdapterNotFinite, LoraRankTooLarge
from server.engine.step import Segment

# The fused kernels read each token's own slot, up to the NF4 kernels' MAX_ROWS tokens; past it (prompt chunks) the
# base layers dequantize and multiply densely, and the LoRA deltas are products over runs of tokens sharing a slot.
KERNEL_TOKENS = 256

# Elements of one slot's A or B (max_rank rows of the model's LoRA columns) that the kernels address: a row's offset
# and the CUDA kernels' slot stride are 32-bit
MAX_SLOT_ELEMENTS = 2**31 - 1

# Layers that HF modules call on the same input tensor: in decode, one shrink kernel serves each such group
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class DecodeKernels(Protocol):
    """Fused kernels for the LoRA delta of decode steps (the engine installs them on CUDA)."""

    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, int]:
        """x [B, in], a [S+1, r, G * in], slots and ranks [B] -> (partial sums [G, B, chunks_pad, r_pad], chunks
        written)."""
        ...

    def linear(
        self,
        base: nn.Module,
        x: torch.Tensor,
        partial: torch.Tensor,
        chunks: int,
        b: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """base(x) + each row's LoRA delta from its shrink `partial` [B, chunks_pad, r_pad] (+ `residual` [B, out],
        added last): x [B, in] -> [B, out]."""
        ...

    def norm_shrink(
        self, norm: nn.Module, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]] | None:
        """(norm(x), the shrink of norm(x) as `shrink` gives it) in one kernel, or None where the kernels have
        none for that norm: x [..., D] of B rows, a [S+1, r, G * D], slots and ranks [B]."""
        ...

    def act_shrink(
        self,
        act: nn.Module,
        gate: torch.Tensor,
        up: torch.Tensor,
        a: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]] | None:
        """(act(gate) * up, the shrink of it for one layer as `shrink` gives it) in one kernel, or None where the
        kernels have none for that activation: gate, up [..., N] of B rows, a [S+1, r, N], slots and ranks [B]."""
        ...

    def segment_tiles(self, slots: torch.Tensor, runs: int) -> torch.Tensor:
        """The tiles of tokens sharing a slot that `segmented` reads, found on the device: slots [T], in at most
        `runs` runs of one slot."""
        ...

    def segmented(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        tiles: torch.Tensor,
        slot_ranks: torch.Tensor,
    ) -> None:
        """y [T, out] += each token's LoRA delta in place, a tile of tokens sharing a slot at a time (steps of
        more than KERNEL_TOKENS tokens): x [T, in], a [S+1, r, in], b [S+1, r, out], tiles (segment_tiles),
        slot_ranks [S+1]."""
        ...

    def linears(
        self,
        bases: list[nn.Module],
        x: torch.Tensor,
        partial: torch.Tensor,
        chunks: int,
        b: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
    ) -> list[torch.Tensor] | None:
        """Every base(x) + each row's LoRA delta for layers sharing x, in one launch where the kernels can (else
        None): x [B, in], partial [G, B, chunks_pad, r_pad], b [S+1, r, sum of outs] -> G outputs [B, out_g]."""
        ...


class LoraContext:
    """Per-forward adapter slot of every token, shared by all wrapped layers; the engine sets it before each
    forward, and with it how the LoRA deltas run:
    - fused kernels (where installed) for steps of up to KERNEL_TOKENS tokens: each token reads its own slot;
      past it, the segmented kernels: each tile of tokens sharing a slot times that slot's A and B, the tiles
      found on the device once a step (captured steps too);
    - segments (no kernels): the step's tokens are runs sharing a slot (step.py orders them so), one pair of
      matmuls per run; needs the runs on the host, so it serves eager forwards;
    - dense (captured steps without the kernels): every token times every slot, then only its own slot's
      columns kept, by selection, not by multiplying with a mask (0 x NaN is NaN: a faulty slot stays its own);
      the expand then meets other slots' B with zeros, which stays zero because packs are checked finite.
    """

    def __init__(self, num_slots: int, max_rank: int) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_ids = torch.empty(0, dtype=torch.long)  # [N] slot of each token
        self.use_kernels = False
        self.segments: list[Segment] | None = None
        self.own: torch.Tensor | None = None  # [N, (S+1) * r_max] bool: the token's own slot, for the dense path
        self.decode_kernels: DecodeKernels | None = None  # fused kernels, where installed
        self.slot_ranks = torch.zeros(num_slots + 1, dtype=torch.int32)  # [S+1] the store's, set by the engine
        self.ranks = torch.empty(0, dtype=torch.int32)  # [N] each token's adapter rank, for the fused kernels
        self.tiles = torch.empty(0, dtype=torch.int32)  # the segmented kernels' tiles of tokens sharing a slot

    def set(self, slot_ids: torch.Tensor, segments: list[Segment] | None) -> None:
        """slot_ids: [N]; segments: the runs of tokens sharing an adapter (base-model runs left out), or None
        when the forward is being captured (the runs change from step to step, a graph does not)."""
        self.slot_ids = slot_ids
        self.use_kernels = self.decode_kernels is not None and slot_ids.shape[0] <= KERNEL_TOKENS
        if self.use_kernels:  # one gather a step, on the device (a captured step replays it)
            self.ranks = self.slot_ranks[slot_ids]
        elif self.decode_kernels is not None:  # in slot order (step.py): a run per slot at most
            self.tiles = self.decode_kernels.segment_tiles(slot_ids, self.num_slots + 1)
        self.segments = None if self.decode_kernels is not None else segments
        self.own = None
        if self.decode_kernels is None and segments is None:
            columns = torch.arange((self.num_slots + 1) * self.max_rank, device=slot_ids.device)
            self.own = columns // self.max_rank == slot_ids[:, None]


@dataclass(frozen=True)
class LoraLayout:
    """Column ranges of each wrapped layer in the A and B stores (and in every packed adapter)."""

    a_offsets: dict[str, int]
    b_offsets: dict[str, int]
    a_width: int  # sum of in_features
    b_width: int  # sum of out_features

    @classmethod
    def of(cls, targets: list[tuple[str, nn.Module]]) -> "LoraLayout":
        """The layout of `targets` (lora_targets), side by side in their order."""
        a_offsets, b_offsets, a_width, b_width = {}, {}, 0, 0
        for name, module in targets:
            a_offsets[name], b_offsets[name] = a_width, b_width
            a_width += module.in_features
            b_width += module.out_features
        return cls(a_offsets, b_offsets, a_width, b_width)

    def max_rank(self) -> int:
        """The largest rank of a slot whose A and B the kernels can address (MAX_SLOT_ELEMENTS)."""
        return MAX_SLOT_ELEMENTS // max(self.a_width, self.b_width, 1)

    def slot_bytes(self, max_rank: int, dtype: torch.dtype) -> int:
        """What one slot of the store takes on the device: its A and B, padded to max_rank."""
        return max_rank * (self.a_width + self.b_width) * dtype.itemsize


def lora_targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The linear layers of `model` that take LoRA: those whose own name (its last part) is one of `names`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in names and hasattr(module, "in_features")
    ]


class LoraStore:
    """The device slots: A [S+1, r_max, a_width] and B [S+1, r_max, b_width]; scaling is folded into B."""

    def __init__(
        self, layout: LoraLayout, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if max_rank > layout.max_rank():  # before anything is allocated
            raise LoraRankTooLarge(
                f"max_lora_rank {max_rank} is too large for this model: a slot's LoRA rows would span "
                f"{max_rank * max(layout.a_width, layout.b_width):,} elements, past the 2**31 its kernels address; "
                f"set --max-lora-rank to at most {layout.max_rank()}"
            )
        self.layout = layout
        self.a = torch.zeros(num_slots + 1, max_rank, layout.a_width, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots + 1, max_rank, layout.b_width, dtype=dtype, device=device)
        # each slot's adapter rank: the fused kernels read no row past it (slot S, no adapter: 0)
        self.ranks = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)

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
        self.ranks[slot] = r


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
    # Checked where it matters, after scaling and the cast to the serving dtype (3e38 is finite in fp32, not
    # in bf16): the store validates uploads too, but a slot must never hold what could poison a forward.
    if not (all_finite(a) and all_finite(b)):
        raise AdapterNotFinite(f"the adapter's weights are not finite once scaled and cast to {dtype}")
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


def _whole_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b is a's values over all of a's memory in a's order (a itself, or a reshape of it)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.numel() == b.numel()
        and a.is_contiguous()
        and b.is_contiguous()
    )


class ShrinkGroup:
    """Wrapped layers called on the same input whose A and B columns are adjacent in the stores (q/k/v, gate/up,
    or one layer alone): in a decode step the first member's call shrinks x for all of them in one kernel, and
    projects x through all of them in one launch where the kernels can (fewer launches, each streaming more)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bases: list[nn.Module]) -> None:
        self.a = a  # [S+1, r_max, size * in]: a view of the A store
        self.b = b  # [S+1, r_max, sum of the members' out]: a view of the B store
        self.bases = bases  # the members' base layers, in column order
        self.size = len(bases)
        self._x: torch.Tensor | None = None  # the input tensor of the last shrink, held so its id stays unique
        self._shrunk: tuple[torch.Tensor, int] = (torch.empty(0), 0)
        self._outputs: list[torch.Tensor] | None = None  # every member's output, when one launch made them
        self._primed: tuple[torch.Tensor, tuple[torch.Tensor, int]] | None = None  # (input, its shrink), made early

    def prime(self, x: torch.Tensor, shrunk: tuple[torch.Tensor, int] | None) -> None:
        """x's shrink, made by the kernel that made x (NormShrink, GatedMlpShrink, the attention's merge): the
        members' first call on x, or on a view of all of x's memory (HF reshapes the attention's output), takes it.
        None: x has none (one primed before and never taken is dropped)."""
        self._primed = None if shrunk is None else (x, shrunk)

    def project(
        self,
        member: int,
        x: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
        kernels: DecodeKernels,
        lora_b: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Member `member`'s base(x) + each row's LoRA delta (+ `residual` [B, out], added last, in a group of one):
        x [B, 1, in] -> [B, out]; lora_b: its B view."""
        flat = x.reshape(-1, x.shape[-1])
        if self._x is not x:
            primed, self._primed = self._primed, None
            if primed is not None and _whole_view(primed[0], x):
                self._shrunk = primed[1]
            else:
                self._shrunk = kernels.shrink(flat, self.a, slots, ranks, self.size)
            self._outputs = None
            if self.size > 1:
                self._outputs = kernels.linears(self.bases, flat, *self._shrunk, self.b, slots, ranks)
            self._x = x
        if self._outputs is not None:
            if residual is not None:
                raise ValueError("a residual is added by the projection of a group of one")
            return self._outputs[member]
        partial, chunks = self._shrunk
        return kernels.linear(self.bases[member], flat, partial[member], chunks, lora_b, slots, ranks, residual)


def shrink_groups(targets: list[tuple[str, nn.Module]], a_offsets: dict[str, int]) -> list[list[tuple[str, nn.Module]]]:
    """Split the wrapped layers (in store order) into runs that one decode-step shrink can serve: siblings
    that their HF module calls on the same input (SHARED_INPUTS) with adjacent A columns; others alone."""
    groups: list[list[tuple[str, nn.Module]]] = []
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        if groups:
            first_name, first = groups[-1][0]
            last_name, last = groups[-1][-1]
            first_parent, _, first_child = first_name.rpartition(".")
            if (
                parent == first_parent
                and any(first_child in shared and child in shared for shared in SHARED_INPUTS)
                and module.in_features == first.in_features
                and a_offsets[last_name] + last.in_features == a_offsets[name]
            ):
                groups[-1].append((name, module))
                continue
        groups.append([(name, module)])
    return groups


class MultiLoraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        context: LoraContext,
        group: ShrinkGroup,
        member: int,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.context = context
        # Views of the shared stores (not buffers: they must keep aliasing the stores).
        self.lora_a = lora_a  # [S+1, r_max, in]
        self.lora_b = lora_b  # [S+1, r_max, out]
        self.group, self.member = group, member  # this layer's A is columns member * in.. of the group's
        self._residual: torch.Tensor | None = None  # added to the next output

    def add_to_next_output(self, residual: torch.Tensor | None) -> None:
        """Add `residual` [..., out] (as many rows as the next input) to the next forward's output, in the
        projection's kernel where it can: `residual + self(x)`, rounded as that rounds; None: nothing."""
        self._residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, N, in] (the step's flat tokens) -> [1, N, out]
        context, slots = self.context, self.context.slot_ids  # [N]
        kernels = context.decode_kernels
        residual, self._residual = self._residual, None
        if context.use_kernels and kernels is not None:
            flat_residual = None if residual is None else residual.reshape(-1, self.out_features)
            y = self.group.project(self.member, x, slots, context.ranks, kernels, self.lora_b, flat_residual)
            return y.view(*x.shape[:-1], self.out_features)
        y = self.base(x)
        xa = x.reshape(-1, self.in_features).to(self.lora_a.dtype)  # [N, in]
        flat = y.view(-1, self.out_features)  # [N, out]
        if kernels is not None:
            kernels.segmented(flat, xa, self.lora_a, self.lora_b, context.tiles, context.slot_ranks)
        elif context.segments is not None:
            for slot, start, end in context.segments:
                shrunk = xa[start:end] @ self.lora_a[slot].T  # [n, r_max]
                flat[start:end] += (shrunk @ self.lora_b[slot]).to(y.dtype)
        else:
            shrunk = xa @ self.lora_a.flatten(0, 1).T  # [N, (S+1) r_max]
            own = torch.where(context.own, shrunk, 0.0)  # type: ignore[arg-type]
            flat += (own @ self.lora_b.flatten(0, 1)).to(y.dtype)
        return y if residual is None else residual + y
