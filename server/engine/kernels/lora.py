"""The per-row LoRA delta of a decode step in two kernels (the BGMV of Punica/S-LoRA), reading each row's
slot straight from the slot stores: no per-layer gather copies, no mask over every slot.

shrink: partial[g, b, c, :] = A_g[slot_b][:, chunk c] @ x[b, chunk c]   (K split in chunks for parallelism;
        g: layers sharing the input, e.g. q/k/v, whose A columns are adjacent in the store: one launch for all)
expand: y[b, :] += (sum over c of partial[g, b, c, :]) @ B[slot_b]      (in place, into the base output; or
        from a matmul's fp32 split-K sums, cast in the same launch, and with the layer's residual added last)

Slots are padded to the store's rank; both kernels read only each row's own adapter rank of them (the store
keeps every slot's, the step gathers them per row): with max_lora_rank 64 and rank-16 adapters that is a
quarter of the bytes, and a row without adapter (rank 0) reads none.
"""

import itertools

import torch
import triton
import triton.language as tl

from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.pdl import depend, options

SHRINK_BLOCK_K = 256
EXPAND_BLOCK_N = 1024  # output columns per program: at batch 32 on the H100, 0.66 ms a step vs 2.17 at 256


@triton.jit
def shrink_chunk(
    x,  # [BLOCK_K] fp32: row `row`'s inputs in columns offs_k (zero where k_mask is not set)
    offs_k,
    k_mask,
    a_ptr,  # [S+1, R, G * K] view of the A store: strides (stride_as, stride_ar, 1)
    slot_ptr,  # [B] long
    rank_ptr,  # [B] int32: each row's adapter rank (A rows past it are not read: their partial sums are zero)
    partial_ptr,  # [G, B, CHUNKS_PAD, R_PAD] fp32
    row,
    chunk,
    group,
    B,
    K,
    stride_as,
    stride_ar,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """partial[group, row, chunk, :] = A_group[slot of row][:, offs_k] @ x: one program's part of the shrink, in
    this kernel and in those that make the shrink's input (the norms', the gated activation's)."""
    slot = tl.load(slot_ptr + row)
    rank = tl.load(rank_ptr + row)
    offs_r = tl.arange(0, R_PAD)
    a_tile = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + group * K + offs_k[None, :]
    a = tl.load(a_tile, mask=(offs_r[:, None] < rank) & k_mask[None, :], other=0.0).to(tl.float32)  # [R_PAD, BK]
    partial = partial_ptr + ((group * B + row) * CHUNKS_PAD + chunk) * R_PAD + offs_r
    tl.store(partial, tl.sum(a * x[None, :], axis=1))


@triton.jit
def _shrink_kernel(
    x_ptr,  # [B, K], row stride stride_x
    a_ptr,  # [S+1, R, G * K] view of the A store: strides (stride_as, stride_ar, 1)
    slot_ptr,  # [B] long
    rank_ptr,  # [B] int32: each row's adapter rank (A rows past it are not read: their partial sums are zero)
    partial_ptr,  # [G, B, CHUNKS_PAD, R_PAD] fp32
    B,
    K,
    stride_x,
    stride_as,
    stride_ar,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    group = tl.program_id(2)
    offs_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + row * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
    shrink_chunk(x, offs_k, k_mask, a_ptr, slot_ptr, rank_ptr, partial_ptr, row, chunk, group, B, K, stride_as,
                 stride_ar, CHUNKS_PAD, R_PAD)  # fmt: skip


@triton.jit
def _expand_kernel(
    partial_ptr,  # [G, B, CHUNKS_PAD, R_PAD] fp32 at stride_pg, chunks past `chunks` unwritten (HAS_LORA only)
    b_ptr,  # [S+1, R, N] view of the B store (scaling folded in): strides (stride_bs, stride_br, 1) (HAS_LORA)
    slot_ptr,  # [B] long (HAS_LORA only)
    rank_ptr,  # [B] int32: each row's adapter rank (B rows past it are not read) (HAS_LORA only)
    src_ptr,  # [B, N], row stride stride_src: the base output (y itself, or a matmul's fp32 split-K sums)
    res_ptr,  # [B, N], row stride stride_res: the residual (HAS_RESIDUAL only)
    y_ptr,  # [B, N], row stride stride_y
    N,
    end0,  # the first columns of layers 1 and 2 of the G side by side (N where there are fewer)
    end1,
    chunks,
    stride_pg,
    stride_src,
    stride_res,
    stride_y,
    stride_bs,
    stride_br,
    HAS_LORA: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CLEAN: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    dtype = y_ptr.dtype.element_ty
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Each stage rounded to y's dtype as the separate cast, expand and add would leave it: the same bits.
    y = tl.load(src_ptr + row * stride_src + offs_n, mask=n_mask, other=0.0).to(dtype).to(tl.float32)  # [BN]
    if HAS_LORA:
        slot = tl.load(slot_ptr + row)
        rank = tl.load(rank_ptr + row)
        first = tl.program_id(1) * BLOCK_N  # the block's columns are one layer's: the layers' widths are multiples
        group = (first >= end0).to(tl.int32) + (first >= end1).to(tl.int32)
        offs_r = tl.arange(0, R_PAD)
        offs_c = tl.arange(0, CHUNKS_PAD)
        partials = partial_ptr + group * stride_pg + (row * CHUNKS_PAD + offs_c[:, None]) * R_PAD + offs_r[None, :]
        partial = tl.load(partials, mask=offs_c[:, None] < chunks, other=0.0)  # [CHUNKS_PAD, R_PAD]
        # The shrunk activations are rounded to the compute dtype, as the unfused x @ A.T would leave them.
        shrunk = tl.sum(partial, axis=0).to(dtype).to(tl.float32)  # [R_PAD]
        b_tile = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :]
        b = tl.load(b_tile, mask=(offs_r[:, None] < rank) & n_mask[None, :], other=0.0).to(tl.float32)  # [R, BN]
        y = (y + tl.sum(b * shrunk[:, None], axis=0)).to(dtype).to(tl.float32)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + row * stride_res + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs_n, y.to(dtype), mask=n_mask)
    if CLEAN:  # the sums' zeros given back for the next split-K matmul (zeroed.py)
        # once every thread has read its sums: a narrow block holds each column in several warps, and one storing
        # its zero before another had loaded the sum gave that one a zero
        tl.debug_barrier()
        tl.store(src_ptr + row * stride_src + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask)


def shrink_warps(rows: int) -> int:
    """num_warps of a shrink launch over `rows` rows (this kernel's, the norms' and the gated activation's): 8 up to
    16 rows, where a launch is few programs and each one's latency is the launch's (1 request +3% decode on the
    H200), 4 above (8 is no faster there with adapters, 2% slower without)."""
    return 8 if rows <= 16 else 4


def shrink_shape(k: int, rank: int) -> tuple[int, int, int]:
    """(chunks, CHUNKS_PAD, R_PAD) of a shrink over K = k for a store of rank `rank` (tl.arange sizes)."""
    chunks = triton.cdiv(k, SHRINK_BLOCK_K)
    return chunks, triton.next_power_of_2(chunks), max(16, triton.next_power_of_2(rank))


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, int]:
    """Per-chunk partial products of x [B, K] @ A_g[slots].T for each of `groups` layers taking x, whose A
    columns are adjacent: ([G, B, CHUNKS_PAD, R_PAD] fp32, chunks written; zero past each row's rank);
    a: [S+1, R, G * K] with unit column stride (a view of the slot store); slots: [B] long; ranks: [B] int32,
    each row's adapter rank."""
    rows, k = x.shape
    chunks, chunks_pad, r_pad = shrink_shape(k, a.shape[1])
    partial = torch.empty(groups, rows, chunks_pad, r_pad, dtype=torch.float32, device=x.device)
    _shrink_kernel[(rows, chunks, groups)](
        x, a, slots, ranks, partial, rows, k, x.stride(0), a.stride(0), a.stride(1),
        CHUNKS_PAD=chunks_pad, R_PAD=r_pad, BLOCK_K=SHRINK_BLOCK_K, **options(x.device),
        num_warps=shrink_warps(rows),
    )  # fmt: skip
    return partial, chunks


def finish_projection(
    y: torch.Tensor,
    src: torch.Tensor,
    lora: LoraEpilogue | None = None,
    residual: torch.Tensor | None = None,
    widths: list[int] | None = None,
    clean: bool = False,
) -> None:
    """y [B, N] = src [B, N] in y's dtype, + each row's LoRA delta (`lora`), + `residual` [B, N], in one launch,
    each stage rounded to y's dtype as a cast, the expand in place and `y += residual` in turn would leave it.
    src is y itself (in place) or a matmul's fp32 split-K sums (the cast fused), which `clean` leaves zero (not
    with src y); y and src: unit column stride.
    widths: the N of up to three layers side by side in y (q/k/v), for which lora.partial is the shrink's
    [G, B, CHUNKS_PAD, R_PAD] and lora.b their B columns side by side, [S+1, R, N]; one layer by default."""
    rows, n = y.shape
    if clean and src.data_ptr() == y.data_ptr():
        raise ValueError("clean zeroes the sums once read: src cannot be y itself")
    starts = list(itertools.accumulate(widths[:-1])) if widths else []  # the first columns of layers 1 and 2
    block_n = EXPAND_BLOCK_N
    while any(start % block_n for start in starts):  # a program's columns must be one layer's
        block_n //= 2
    end0, end1 = (*starts, n, n)[:2]
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    if lora is None:  # HAS_LORA off: its pointers are never read
        partial = b = slots = ranks = src
        chunks, chunks_pad, r_pad, stride_pg, stride_bs, stride_br = 0, 1, 1, 0, 0, 0
    else:
        partial, chunks, b, slots, ranks = lora.partial, lora.chunks, lora.b, lora.slots, lora.ranks
        chunks_pad, r_pad = partial.shape[-2:]
        stride_pg, stride_bs, stride_br = partial.stride(0) if widths else 0, b.stride(0), b.stride(1)
    res = src if residual is None else residual
    _expand_kernel[(rows, triton.cdiv(n, block_n))](
        partial, b, slots, ranks, src, res, y, n, end0, end1, chunks, stride_pg, src.stride(0), res.stride(0),
        y.stride(0), stride_bs, stride_br, HAS_LORA=lora is not None, HAS_RESIDUAL=residual is not None, CLEAN=clean,
        CHUNKS_PAD=chunks_pad, R_PAD=r_pad, BLOCK_N=block_n, **options(y.device),
    )  # fmt: skip
