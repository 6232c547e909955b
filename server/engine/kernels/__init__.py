"""Triton kernels of the decode step on CUDA: the per-row LoRA delta and RMSNorm.

The engine installs them on CUDA only; the tests run them on the CPU under Triton's interpreter.
"""

from torch import nn

from server.engine.kernels.lora import add_lora_delta
from server.engine.kernels.rmsnorm import fuse_rms_norms

__all__ = ["add_lora_delta", "install"]


def install(model: nn.Module) -> None:
    """Swap `model`'s RMSNorms for their fused form (the LoRA delta is the engine's to call)."""
    fuse_rms_norms(model)
