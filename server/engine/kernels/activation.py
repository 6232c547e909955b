"""A SiLU-gated MLP's activation, silu(gate) * up, and the LoRA shrink of its down projection as one kernel in a
decode step, in place of three (silu, the product, the shrink).

Same arithmetic as the modules it replaces: silu in fp32 rounded to the input dtype, then the product in fp32
rounded again; the shrink as lora.py's, from the rounded values.
"""

import torch
import transformers.activations
import triton
import triton.language as tl
from torch import nn

from server.engine.kernels.lora import SHRINK_BLOCK_K, shrink_chunk, shrink_shape, shrink_warps
from server.engine.kernels.pdl import depend, options

# The act_fn modules of SiLU-gated MLPs (Llama, Mistral, Qwen): transformers 5 has its own SiLU module
SILU = tuple(c for c in (nn.SiLU, getattr(transformers.activations, "SiLUActivation", None)) if c is not None)


@triton.jit
def _silu_mul_shrink_kernel(
    gate_ptr,  # [B, N], row stride stride_g
    up_ptr,  # [B, N], row stride stride_u
    out_ptr,  # [B, N] contiguous
    a_ptr,  # [S+1, R, N] view of the A store: strides (stride_as, stride_ar, 1)
    slot_ptr,  # [B] long
    rank_ptr,  # [B] int32: each row's adapter rank
    partial_ptr,  # [1, B, CHUNKS_PAD, R_PAD] fp32
    N,
    stride_g,
    stride_u,
    stride_as,
    stride_ar,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    # A program per (row, chunk of BLOCK_K columns), as _shrink_kernel's grid: the chunk's activation, stored,
    # then its part of the shrink. Elementwise, so nothing is read twice.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < N
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_g + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_u + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    h = (silu * up).to(dtype)
    tl.store(out_ptr + row * N + offs_k, h, mask=k_mask)
    shrink_chunk(h.to(tl.float32), offs_k, k_mask, a_ptr, slot_ptr, rank_ptr, partial_ptr, row, chunk, 0, 0, N,
                 stride_as, stride_ar, CHUNKS_PAD, R_PAD)  # fmt: skip


def silu_mul_shrink(
    gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
    """(silu(gate) * up, lora_shrink of it for one layer): gate, up [..., N] of B rows (column views of one
    output are fine); a: [S+1, R, N] with unit column stride; slots: [B] long; ranks: [B] int32."""
    n = gate.shape[-1]
    g, u = (t.reshape(-1, n) for t in (gate, up))
    g, u = (t if t.stride(1) == 1 else t.contiguous() for t in (g, u))
    rows = g.shape[0]
    out = torch.empty(rows, n, dtype=gate.dtype, device=gate.device)
    chunks, chunks_pad, r_pad = shrink_shape(n, a.shape[1])
    partial = torch.empty(1, rows, chunks_pad, r_pad, dtype=torch.float32, device=gate.device)
    _silu_mul_shrink_kernel[(rows, chunks)](
        g, u, out, a, slots, ranks, partial, n, g.stride(0), u.stride(0), a.stride(0), a.stride(1),
        CHUNKS_PAD=chunks_pad, R_PAD=r_pad, BLOCK_K=SHRINK_BLOCK_K, **options(gate.device),
        num_warps=shrink_warps(rows),
    )  # fmt: skip
    return out.view(gate.shape), (partial, chunks)
