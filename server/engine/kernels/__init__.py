"""Kernels of the decode step on CUDA: the NF4 projections (in CUDA nf4_mma for up to 16 bf16 rows, 32 without
wgmma, and nf4_wide for up to 64; in Triton a GEMV for one row and a tensor-core matmul for up to 256), the per-row
LoRA delta (past 256 tokens, a tile of tokens sharing a slot at a time), RMSNorm, the gated MLP's activation (the last
two with the LoRA shrink of the layers reading their output), rotary embeddings, the KV cache write, and a greedy
step's tokens and logprobs.

The engine installs them on CUDA only; the tests run the Triton ones on the CPU under Triton's interpreter.
"""

import torch
from torch import nn

from server.engine.kernels.activation import SILU, silu_mul_shrink
from server.engine.kernels.greedy import greedy_pick
from server.engine.kernels.lora import finish_projection, lora_shrink
from server.engine.kernels.nf4 import (
    MAX_ROWS,
    FusedNf4Linear,
    LoraEpilogue,
    fuse_nf4_linears,
    nf4_segments,
    project_sums,
)
from server.engine.kernels.nf4_mma import Nf4Segments, nf4_mma_segments
from server.engine.kernels.nf4_wide import available as wide_available
from server.engine.kernels.nf4_wide import mma_serves, nf4_wide_finished
from server.engine.kernels.rmsnorm import FusedRMSNorm, fuse_rms_norms
from server.engine.kernels.rope import fuse_rotary
from server.engine.kernels.segmented_lora import segment_tiles, segmented_lora

__all__ = ["FusedDecode", "greedy_pick", "install"]


def install(model: nn.Module) -> None:
    """Swap `model`'s NF4 linear layers, RMSNorms and rotary embeddings for their fused forms (the LoRA delta
    is the multi-LoRA layers': `FusedDecode`)."""
    fuse_nf4_linears(model)
    fuse_rms_norms(model)
    fuse_rotary(model)


class FusedDecode:
    """The decode step's multi-LoRA kernels, as the multi-LoRA layers call them (multilora.DecodeKernels)."""

    shrink = staticmethod(lora_shrink)
    segment_tiles = staticmethod(segment_tiles)
    segmented = staticmethod(segmented_lora)

    def __init__(self) -> None:
        self._segments: dict[tuple[int, ...], Nf4Segments | None] = {}  # by the layers' ids: None, not fusable

    @staticmethod
    def linear(
        base: nn.Module,
        x: torch.Tensor,
        partial: torch.Tensor,
        chunks: int,
        b: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """base(x) + each row's LoRA delta (+ residual [B, out], added last): x [B, in] -> [B, out]; partial: the
        shrink's [B, CHUNKS_PAD, R_PAD] for this layer; b: [S+1, R, out] (a view of the B store); slots: [B]
        long; ranks: [B] int32. An NF4 layer adds the delta and the residual in its kernel's epilogue where it
        can; otherwise the base layer, then one launch adding both to its output in place."""
        if isinstance(base, FusedNf4Linear):
            return base.project(x, LoraEpilogue(partial, chunks, b, slots, ranks), residual)
        y = base(x)
        finish_projection(y, y, LoraEpilogue(partial, chunks, b, slots, ranks), residual)
        return y

    @staticmethod
    def norm_shrink(
        norm: nn.Module, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]] | None:
        """(norm(x), lora_shrink of norm(x)) in one kernel where `norm` is a FusedRMSNorm, else None."""
        if not isinstance(norm, FusedRMSNorm):
            return None
        return norm.forward_and_shrink(x, a, slots, ranks, groups)

    @staticmethod
    def act_shrink(
        act: nn.Module,
        gate: torch.Tensor,
        up: torch.Tensor,
        a: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]] | None:
        """(act(gate) * up, lora_shrink of it for one layer) in one kernel where `act` is SiLU, else None."""
        if not isinstance(act, SILU):
            return None
        return silu_mul_shrink(gate, up, a, slots, ranks)

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
        """NF4 layers sharing x (q/k/v, gate/up) in one launch: nf4_mma with each row's LoRA delta in its epilogue,
        or for more rows nf4_wide (which adds them in its epilogue where it takes K in one part) or the Triton
        matmul, then one launch for the cast, the deltas of all the layers:
        x [B, in], partial [G, B, CHUNKS_PAD, R_PAD], b [S+1, R, sum of outs] -> G outputs [B, out_g] (column
        views of one tensor); None where those launches do not run (the layers then run one by one)."""
        key = tuple(map(id, bases))
        if key not in self._segments:
            self._segments[key] = nf4_segments(bases)
        segments = self._segments[key]
        rows = x.shape[0]
        if segments is None or x.dtype != segments.dtype or x.stride(1) != 1 or rows > MAX_ROWS:
            return None
        lora = LoraEpilogue(partial, chunks, b, slots, ranks)
        if mma_serves(x, lora):
            return list(nf4_mma_segments(x, segments, lora, ahead=bases[-1].ahead).split(segments.n, dim=1))
        if rows == 1:  # the GEMV, each layer's delta in its epilogue
            return None
        y = nf4_wide_finished(x, segments.parts, lora) if wide_available(x, segments.parts) else None
        if y is None:  # the sums, then the cast and the deltas in a launch of their own
            y = torch.empty(rows, sum(segments.n), dtype=x.dtype, device=x.device)
            project_sums(y, x, segments.parts, lora, bases[0].zeroed, widths=segments.n)
        return list(y.split(segments.n, dim=1))
