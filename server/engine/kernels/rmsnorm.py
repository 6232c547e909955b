"""RMSNorm in one kernel per call, in place of the seven elementwise kernels of the HF modules' forward; in a
decode step, with the LoRA shrink of the layers that read its output (q/k/v, gate/up) in the same kernel.

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

from server.engine.kernels.lora import SHRINK_BLOCK_K, shrink_chunk, shrink_shape, shrink_warps
from server.engine.kernels.pdl import depend, options

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


@triton.jit
def _rmsnorm_shrink_kernel(
    x_ptr,  # [B, D], row stride stride_x
    w_ptr,  # [D]
    out_ptr,  # [B, D] contiguous
    a_ptr,  # [S+1, R, G * D] view of the A store: strides (stride_as, stride_ar, 1)
    slot_ptr,  # [B] long
    rank_ptr,  # [B] int32: each row's adapter rank
    partial_ptr,  # [G, B, CHUNKS_PAD, R_PAD] fp32
    B,
    D,
    eps,
    stride_x,
    stride_as,
    stride_ar,
    ONE_PLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    # A program per (row, chunk of BLOCK_K columns, layer reading the output), as _shrink_kernel's grid (one
    # program for all G layers had a third of the programs at batch 1, and was slower there than the two
    # kernels): the row's statistics over the whole row (8 KB at D 4096, read by each of its programs), then its
    # chunk normalized (stored by the first layer's program), then that chunk's part of lora.py's shrink for the
    # program's layer, as _shrink_kernel computes it from the stored values.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    group = tl.program_id(2)
    offs = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    offs_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < D
    normed = tl.load(x_ptr + row * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32) * rstd
    w = tl.load(w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        y = normed * (1.0 + w)
    else:
        y = w * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    if group == 0:
        tl.store(out_ptr + row * D + offs_k, y, mask=k_mask)
    shrink_chunk(y.to(tl.float32), offs_k, k_mask, a_ptr, slot_ptr, rank_ptr, partial_ptr, row, chunk, group, B, D,
                 stride_as, stride_ar, CHUNKS_PAD, R_PAD)  # fmt: skip


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        eps_attribute, self.one_plus = NORMS[type(norm)]
        self.eps = float(getattr(norm, eps_attribute))
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]
        flat, out = self._rows(x)
        d = flat.shape[1]
        block = triton.next_power_of_2(d)
        _rmsnorm_kernel[(flat.shape[0],)](
            flat, self.weight, out, d, self.eps, flat.stride(0), ONE_PLUS=self.one_plus, BLOCK_D=block
        )
        return out.view(*x.shape[:-1], d)

    def forward_and_shrink(
        self, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        """(forward(x), lora_shrink(forward(x) as [B, D], a, slots, ranks, groups)) in one kernel: x [..., D] with
        B rows; a: [S+1, R, groups * D] with unit column stride; slots: [B] long; ranks: [B] int32."""
        flat, out = self._rows(x)
        rows, d = flat.shape
        chunks, chunks_pad, r_pad = shrink_shape(d, a.shape[1])
        partial = torch.empty(groups, rows, chunks_pad, r_pad, dtype=torch.float32, device=x.device)
        _rmsnorm_shrink_kernel[(rows, chunks, groups)](
            flat, self.weight, out, a, slots, ranks, partial, rows, d, self.eps, flat.stride(0), a.stride(0),
            a.stride(1), ONE_PLUS=self.one_plus, BLOCK_D=triton.next_power_of_2(d), CHUNKS_PAD=chunks_pad, R_PAD=r_pad,
            BLOCK_K=SHRINK_BLOCK_K, **options(x.device), num_warps=shrink_warps(rows),
        )  # fmt: skip
        return out.view(*x.shape[:-1], d), (partial, chunks)

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] as rows [B, D] with unit column stride, and the output [B, D] they are normalized into."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        dtype = x.dtype if self.one_plus else torch.promote_types(self.weight.dtype, x.dtype)
        return flat, torch.empty(flat.shape, dtype=dtype, device=x.device)


def fuse_rms_norms(model: nn.Module) -> None:
    """Swap every RMSNorm of a supported family in `model` for a FusedRMSNorm."""
    for name, module in list(model.named_modules()):
        if type(module) in NORMS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedRMSNorm(module))
