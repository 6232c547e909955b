"""Triton kernels of the decode step on CUDA: the NF4 matmul, the per-row LoRA delta and RMSNorm.

The engine installs them on CUDA only; the tests run them on the CPU under Triton's interpreter.
"""

from torch import nn

from server.engine.kernels.lora import add_lora_delta
from server.engine.kernels.nf4 import fuse_nf4_linears
from server.engine.kernels.rmsnorm import fuse_rms_norms

__all__ = ["add_lora_delta", "install"]


def install(model: nn.Module) -> None:
    """Swap `model`'s NF4 linear layers and RMSNorms for their fused forms (the LoRA delta is the engine's)."""
    fuse_nf4_linears(model)
    fuse_rms_norms(model)
