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


def nf4_matmul(
    x: torch.Tensor,
    w: Nf4Weight,
    block_n: int = 32,
    split_k: int = 1,
    lookup: str = "gather",
    groups: int = 2,
    warps: int = 4,
    stages: int = 4,
) -> torch.Tensor:
    """x @ W.T (+ bias); x: [M, K] with M <= MAX_ROWS -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.out_features
    dtype = x.dtype
    x = x.to(w.dtype).contiguous()
    chunks = k // (64 * groups)
    split_k = max(1, min(split_k, chunks))
    partial = torch.empty(split_k, m, n, dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    _nf4_matmul_kernel[grid](
        x, w.packed, w.code, w.qabsmax, w.code2, w.absmax2, w.offset, partial,
        m, n, k, triton.cdiv(chunks, split_k),
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        GROUPS=groups,
        BLOCKSIZE2=w.blocksize2,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SELECT=lookup == "select",
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    out = partial[0] if split_k == 1 else partial.sum(0).to(x.dtype)
    out = out if w.bias is None else out + w.bias.to(out.dtype)
    return out.to(dtype)


if triton is not None:

    @triton.jit
    def _level(nibble, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        b0, b1, b2 = (nibble & 1) != 0, (nibble & 2) != 0, (nibble & 4) != 0
        lo = tl.where(
            b2,
            tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)),
            tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0)),
        )
        hi = tl.where(
            b2,
            tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12)),
            tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8)),
        )
        return tl.where((nibble & 8) != 0, hi, lo)

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr, w_ptr, code_ptr, qabs_ptr, code2_ptr, abs2_ptr, offset, out_ptr,
        M, N, K, CHUNKS_PER_SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, BLOCKSIZE2: tl.constexpr,
        PRECISION: tl.constexpr, SELECT: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_N output features for all M rows, over CHUNKS_PER_SPLIT chunks of GROUPS
        # 64-element quantization blocks. Byte j of a block holds elements 2j (high nibble) and 2j+1, so x
        # is read de-interleaved (even and odd columns) and the weight never needs re-interleaving.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)  # [BM]
        m_mask = offs_m < M
        offs_b = tl.arange(0, 32)  # byte within a block
        blocks_per_row = K // 64
        c0, c1, c2, c3 = tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
        c4, c5, c6, c7 = tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7)
        c8, c9, c10, c11 = tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11)
        c12, c13, c14, c15 = (
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15)
        )  # fmt: skip
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        first = tl.program_id(1) * CHUNKS_PER_SPLIT
        last = tl.minimum(first + CHUNKS_PER_SPLIT, blocks_per_row // GROUPS)
        for chunk in range(first, last):
            for g in tl.static_range(GROUPS):
                blk = chunk * GROUPS + g  # quantization block within the row
                block = offs_n * blocks_per_row + blk  # [BN]
                q = tl.load(qabs_ptr + block, mask=n_mask, other=0).to(tl.int32)
                scale2 = tl.load(abs2_ptr + block // BLOCKSIZE2, mask=n_mask, other=0.0)
                absmax = (tl.load(code2_ptr + q) * scale2 + offset)[:, None]  # [BN, 1]
                byte = offs_n[:, None] * (K // 2) + (blk * 32 + offs_b)[None, :]  # [BN, 32]
                packed = tl.load(w_ptr + byte, mask=n_mask[:, None], other=0).to(tl.int32)
                if SELECT:
                    hi = _level(packed >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                    lo = _level(packed & 15, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                else:
                    hi = tl.load(code_ptr + (packed >> 4))
                    lo = tl.load(code_ptr + (packed & 15))
                column = blk * 64 + 2 * offs_b  # [32] even columns of x
                x_even = tl.load(x_ptr + offs_m[:, None] * K + column[None, :], mask=m_mask[:, None], other=0.0)
                x_odd = tl.load(x_ptr + offs_m[:, None] * K + column[None, :] + 1, mask=m_mask[:, None], other=0.0)
                # weights rounded to the compute dtype, as bitsandbytes rounds its dequantized weight
                acc = tl.dot(x_even, tl.trans((hi * absmax).to(x_even.dtype)), acc, input_precision=PRECISION)
                acc = tl.dot(x_odd, tl.trans((lo * absmax).to(x_odd.dtype)), acc, input_precision=PRECISION)
        out = out_ptr + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
