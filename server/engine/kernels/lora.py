"""The per-row LoRA delta of a decode step (the BGMV of Punica/S-LoRA), reading each row's slot straight
from the slot stores: no per-layer gather copies, no mask over every slot.

Batches of several rows take two kernels, K split in chunks so the shrink fills the device:
    shrink: partial[b, c, :] = A[slot_b][:, chunk c] @ x[b, chunk c]
    expand: y[b, :] += (sum over c of partial[b, c, :]) @ B[slot_b]      (in place, into the base output)
One row (a single request decoding) takes one kernel: each program recomputes the whole shrink (r x K, from
L2) and expands its own columns, which costs less than a second launch.
"""

import torch
import triton
import triton.language as tl

SHRINK_BLOCK_K = 256
EXPAND_BLOCK_N = 256


@triton.jit
def _shrink_chunk(x_ptr, a_ptr, row, slot, chunk, K, R, stride_x, stride_as, stride_ar, R_PAD, BLOCK_K):
    """[R_PAD] fp32: A[slot][:, chunk] @ x[row, chunk]."""
    offs_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_mask = offs_k < K
    x = tl.load(x_ptr + row * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
    a_tile = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :]
    a = tl.load(a_tile, mask=(offs_r[:, None] < R) & k_mask[None, :], other=0.0).to(tl.float32)  # [R_PAD, BK]
    return tl.sum(a * x[None, :], axis=1)


@triton.jit
def _expand_into(shrunk, b_ptr, y_ptr, row, slot, N, R, stride_y, stride_bs, stride_br, R_PAD, BLOCK_N):
    """y[row, this program's columns] += shrunk [R_PAD] @ B[slot]."""
    # The shrunk activations are rounded to the compute dtype, as the unfused x @ A.T would leave them.
    shrunk = shrunk.to(y_ptr.dtype.element_ty).to(tl.float32)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    n_mask = offs_n < N
    b_tile = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :]
    b = tl.load(b_tile, mask=(offs_r[:, None] < R) & n_mask[None, :], other=0.0).to(tl.float32)  # [R_PAD, BN]
    y_row = y_ptr + row * stride_y + offs_n
    y = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_row, (y + tl.sum(b * shrunk[:, None], axis=0)).to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [B, K], row stride stride_x
    a_ptr,  # [S+1, R, K] view of the A store: strides (stride_as, stride_ar, 1)
    slot_ptr,  # [B] long
    partial_ptr,  # [B, CHUNKS_PAD, R_PAD] fp32
    K,
    R,
    stride_x,
    stride_as,
    stride_ar,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    shrunk = _shrink_chunk(x_ptr, a_ptr, row, slot, chunk, K, R, stride_x, stride_as, stride_ar, R_PAD, BLOCK_K)
    tl.store(partial_ptr + (row * CHUNKS_PAD + chunk) * R_PAD + tl.arange(0, R_PAD), shrunk)


@triton.jit
def _expand_kernel(
    partial_ptr,  # [B, CHUNKS_PAD, R_PAD] fp32, chunks past `chunks` unwritten
    b_ptr,  # [S+1, R, N] view of the B store (scaling folded in): strides (stride_bs, stride_br, 1)
    slot_ptr,  # [B] long
    y_ptr,  # [B, N], row stride stride_y: the base output, updated in place
    N,
    R,
    chunks,
    stride_y,
    stride_bs,
    stride_br,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    offs_c = tl.arange(0, CHUNKS_PAD)
    partials = partial_ptr + (row * CHUNKS_PAD + offs_c[:, None]) * R_PAD + tl.arange(0, R_PAD)[None, :]
    shrunk = tl.sum(tl.load(partials, mask=offs_c[:, None] < chunks, other=0.0), axis=0)  # [R_PAD]
    _expand_into(shrunk, b_ptr, y_ptr, row, slot, N, R, stride_y, stride_bs, stride_br, R_PAD, BLOCK_N)


@triton.jit
def _shrink_expand_kernel(
    x_ptr,  # [B, K], row stride stride_x
    a_ptr,  # [S+1, R, K] view of the A store
    b_ptr,  # [S+1, R, N] view of the B store
    slot_ptr,  # [B] long
    y_ptr,  # [B, N], row stride stride_y, updated in place
    K,
    N,
    R,
    stride_x,
    stride_as,
    stride_ar,
    stride_y,
    stride_bs,
    stride_br,
    CHUNKS: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    shrunk = tl.zeros((R_PAD,), dtype=tl.float32)
    for chunk in range(0, CHUNKS):
        shrunk += _shrink_chunk(x_ptr, a_ptr, row, slot, chunk, K, R, stride_x, stride_as, stride_ar, R_PAD, BLOCK_K)
    _expand_into(shrunk, b_ptr, y_ptr, row, slot, N, R, stride_y, stride_bs, stride_br, R_PAD, BLOCK_N)


def add_lora_delta(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> None:
    """y [B, N] += x [B, K] @ A[slots].T @ B[slots], in place; a: [S+1, R, K], b: [S+1, R, N] with unit
    column strides (views of the slot stores); slots: [B] long."""
    rows, k = x.shape
    n, rank = y.shape[1], a.shape[1]
    chunks, columns = triton.cdiv(k, SHRINK_BLOCK_K), triton.cdiv(n, EXPAND_BLOCK_N)
    r_pad = max(16, triton.next_power_of_2(rank))  # tl.arange sizes are powers of two
    if rows == 1:
        _shrink_expand_kernel[(rows, columns)](
            x, a, b, slots, y, k, n, rank, x.stride(0), a.stride(0), a.stride(1), y.stride(0), b.stride(0),
            b.stride(1), CHUNKS=chunks, R_PAD=r_pad, BLOCK_K=SHRINK_BLOCK_K, BLOCK_N=EXPAND_BLOCK_N,
        )  # fmt: skip
        return
    chunks_pad = triton.next_power_of_2(chunks)
    partial = torch.empty(rows, chunks_pad, r_pad, dtype=torch.float32, device=x.device)
    _shrink_kernel[(rows, chunks)](
        x, a, slots, partial, k, rank, x.stride(0), a.stride(0), a.stride(1),
        CHUNKS_PAD=chunks_pad, R_PAD=r_pad, BLOCK_K=SHRINK_BLOCK_K,
    )  # fmt: skip
    _expand_kernel[(rows, columns)](
        partial, b, slots, y, n, rank, chunks, y.stride(0), b.stride(0), b.stride(1),
        CHUNKS_PAD=chunks_pad, R_PAD=r_pad, BLOCK_N=EXPAND_BLOCK_N,
    )  # fmt: skip
