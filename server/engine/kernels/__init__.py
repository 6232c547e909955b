"""Triton kernels of the decode step on CUDA: the NF4 GEMV of one-row steps, the per-row LoRA delta, RMSNorm
and rotary embeddings.

The engine installs them on CUDA only; the tests run them on the CPU under Triton's interpreter.
"""

import torch
from torch import nn

from server.engine.kernels.lora import add_lora_delta, lora_shrink
from server.engine.kernels.nf4 import FusedNf4Linear, LoraEpilogue, fuse_nf4_linears
from server.engine.kernels.rmsnorm import fuse_rms_norms
from server.engine.kernels.rope import fuse_rotary

__all__ = ["decode_lora_linear", "install"]


def install(model: nn.Module) -> None:
    """Swap `model`'s NF4 linear layers, RMSNorms and rotary embeddings for their fused forms (the LoRA delta
    is the engine's: `decode_lora_linear`)."""
    fuse_nf4_linears(model)
    fuse_rms_norms(model)
    fuse_rotary(model)


def decode_lora_linear(
    base: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """base(x) + each row's LoRA delta for a decode step: x [B, in] -> [B, out]; a: [S+1, R, in],
    b: [S+1, R, out] (views of the slot stores); slots: [B] long. One NF4 row: the shrink, then the GEMV with
    the expand fused in; otherwise the base layer, then the two LoRA kernels in place on its output."""
    if x.shape[0] == 1 and isinstance(base, FusedNf4Linear):
        partial, chunks = lora_shrink(x, a, slots)
        return base.one_row(x, LoraEpilogue(partial, chunks, b, slots))
    y = base(x)
    add_lora_delta(y, x, a, b, slots)
    return y
