"""A fused NF4 matmul for small batches: weights are dequantized in registers, never written out.

Above one token, bitsandbytes dequantizes each whole weight to bf16 in memory and then runs a GEMM, which
for a decode step of a few dozen rows costs more than the GEMM itself. This kernel reads the packed 4-bit
weight and its double-quantized block scales once and multiplies as it goes. Used for 2..MAX_ROWS rows on
CUDA (one row stays on bitsandbytes' own GEMV; prefill stays on dequantize + GEMM, which is compute-bound).
"""

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine falls back to bitsandbytes
    triton = None

MAX_ROWS = 64
BLOCK = 64  # bitsandbytes' 4-bit block size this kernel supports


class Nf4Weight:
    """The tensors of one bitsandbytes Linear4bit (NF4, double-quantized) that the kernel reads."""

    def __init__(self, layer: nn.Module) -> None:
        state = layer.weight.quant_state
        self.out_features, self.in_features = state.shape
        self.packed = layer.weight.data.view(-1)  # [N * K / 2] uint8, element 2j in the high nibble
        self.code = state.code.float()  # [16] NF4 levels
        self.qabsmax = state.absmax  # [N * K / 64] uint8: block scales, quantized once more
        self.code2 = state.state2.code.float()  # [256]
        self.absmax2 = state.state2.absmax.float()  # [N * K / 64 / blocksize2]
        self.blocksize2 = state.state2.blocksize
        self.offset = float(state.offset)
        self.bias = layer.bias
        self.dtype = layer.compute_dtype or torch.float32  # what bitsandbytes computes in


def fused_nf4(layer: nn.Module) -> Nf4Weight | None:
    """The kernel's view of `layer` if it is a CUDA NF4 double-quantized Linear4bit it supports, else None."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if triton is None or state is None or not layer.weight.is_cuda:
        return None
    if state.quant_type != "nf4" or state.blocksize != BLOCK or state.state2 is None:
        return None
    return Nf4Weight(layer) if state.shape[1] % BLOCK == 0 else None


def nf4_matmul(x: torch.Tensor, w: Nf4Weight) -> torch.Tensor:
    """x @ W.T (+ bias); x: [M, K] with M <= MAX_ROWS -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.out_features
    dtype = x.dtype
    x = x.to(w.dtype).contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = 32 if n <= 8192 else 64  # enough programs to fill the SMs for the narrow projections
    grid = (triton.cdiv(n, block_n),)
    _nf4_matmul_kernel[grid](
        x, w.packed, w.code, w.qabsmax, w.code2, w.absmax2, w.offset, out,
        m, n, k,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=128 if k % 128 == 0 else 64,
        BLOCKSIZE2=w.blocksize2,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=4,
    )  # fmt: skip
    out = out if w.bias is None else out + w.bias.to(out.dtype)
    return out.to(dtype)


if triton is not None:

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr, w_ptr, code_ptr, qabs_ptr, code2_ptr, abs2_ptr, offset, out_ptr,
        M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE2: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_N output features for all M rows, over the whole K.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)  # [BM]
        m_mask = offs_m < M
        groups: tl.constexpr = BLOCK_K // 64
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            byte = offs_n[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]  # [BN, BK/2]
            packed = tl.load(w_ptr + byte, mask=n_mask[:, None], other=0).to(tl.int32)
            nibbles = tl.join(packed >> 4, packed & 15).reshape(BLOCK_N, BLOCK_K)  # high nibble first
            levels = tl.load(code_ptr + nibbles)  # [BN, BK] fp32
            block = offs_n[:, None] * (K // 64) + (k0 // 64 + tl.arange(0, groups))[None, :]  # [BN, G]
            q = tl.load(qabs_ptr + block, mask=n_mask[:, None], other=0).to(tl.int32)
            scale2 = tl.load(abs2_ptr + block // BLOCKSIZE2, mask=n_mask[:, None], other=0.0)
            absmax = tl.load(code2_ptr + q) * scale2 + offset  # [BN, G]
            scale = tl.broadcast_to(absmax[:, :, None], (BLOCK_N, groups, 64)).reshape(BLOCK_N, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_mask[:, None], other=0.0
            )  # [BM, BK]
            w = (levels * scale).to(x.dtype)  # [BN, BK], rounded as bitsandbytes rounds its dequantized weight
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
