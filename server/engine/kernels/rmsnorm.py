"""RMSNorm in one kernel per call, in place of the seven elementwise kernels of the HF modules' forward.

Same arithmetic as the modules it replaces: fp32 statistics; Llama-style multiplies the weight after
rounding to the input dtype, Gemma-style multiplies by (1 + weight) in fp32 and rounds last.
"""

import torch
import triton
import triton.language as tl
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

# The norm classes of the supported families -> (eps attribute, Gemma-style (1 + weight) scaling)
NORMS: dict[type[nn.Module], tuple[str, bool]] = {
    LlamaRMSNorm: ("variance_epsilon", False),
    MistralRMSNorm: ("variance_epsilon", False),
    Qwen2RMSNorm: ("variance_epsilon", False),
    Qwen3RMSNorm: ("variance_epsilon", False),
    GemmaRMSNorm: ("eps", True),
}


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # [rows, D], row stride stride_x
    w_ptr,  # [D]
    out_ptr,  # [rows, D] contiguous
    D,
    eps,
    stride_x,
    ONE_PLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        y = normed * (1.0 + w)
    else:
        y = w * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        eps_attribute, self.one_plus = NORMS[type(norm)]
        self.eps = float(getattr(norm, eps_attribute))
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]
        d = x.shape[-1]
        flat = x.reshape(-1, d)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        dtype = x.dtype if self.one_plus else torch.promote_types(self.weight.dtype, x.dtype)
        out = torch.empty(flat.shape, dtype=dtype, device=x.device)
        block = triton.next_power_of_2(d)
        _rmsnorm_kernel[(flat.shape[0],)](
            flat, self.weight, out, d, self.eps, flat.stride(0), ONE_PLUS=self.one_plus, BLOCK_D=block
        )
        return out.view(*x.shape[:-1], d)


def fuse_rms_norms(model: nn.Module) -> None:
    """Swap every RMSNorm of a supported family in `model` for a FusedRMSNorm."""
    for name, module in list(model.named_modules()):
        if type(module) in NORMS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedRMSNorm(module))
