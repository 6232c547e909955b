"""Triton kernels of the decode step on CUDA: the per-row LoRA delta, RMSNorm and rotary embeddings.

The engine installs them on CUDA only; the tests run them on the CPU under Triton's interpreter.
"""

from torch import nn

from server.engine.kernels.lora import add_lora_delta
from server.engine.kernels.rmsnorm import fuse_rms_norms
from server.engine.kernels.rope import fuse_rotary

__all__ = ["add_lora_delta", "install"]


def install(model: nn.Module) -> None:
    """Swap `model`'s RMSNorms and rotary embeddings for their fused forms (the LoRA delta is the engine's)."""
    fuse_rms_norms(model)
    fuse_rotary(model)
