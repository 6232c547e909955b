"""The LoRA delta of a step too wide for the per-row kernels (one carrying prompt chunks), over the runs of tokens
that share an adapter slot (the SGMV of Punica/S-LoRA).

A step's tokens are cut into tiles of at most BLOCK_M consecutive tokens of one slot (`segment_tiles`), on the
device: no list of runs comes from the host, so a CUDA graph replays it whatever runs its step has. Each program
multiplies one tile by its slot's A (shrink) or B (expand), so every slot's A and B are read once a tile, each
slot's rows past its adapter's rank are never read, and a tile's work does not grow with the slots of the store
(the dense form this replaces multiplied every token with every slot). A decode token is a tile of its own; a
prompt chunk of 256 tokens is 8.

shrink: partial[c, t, :] = A[slot_t][:, chunk c] @ x[t, chunk c]   (K split in chunks for parallelism)
expand: y[t, :] += (sum over c of partial[c, t, :]) @ B[slot_t]    (in place, into the base layer's output)
"""

import torch
import triton
import triton.language as tl

from server.engine.kernels.pdl import depend, options

BLOCK_M = 32  # tokens a tile at most
BLOCK_K = 64
CHUNK_K = 512  # the shrink's K a program: 4,096 inputs are 8 chunks, so that a step's few tiles fill the device
BLOCK_N = 128


def segment_tiles(slots: torch.Tensor, runs: int) -> torch.Tensor:
    """[3, max_tiles] int32: the first token, end token and slot of each tile of at most BLOCK_M consecutive tokens
    sharing a slot, in order; past the step's tiles, first == end == T. slots: [T] long; runs: how many runs of
    one slot the tokens make at most (a step in slot order: a run per slot), which bounds the tiles."""
    tokens = slots.shape[0]
    max_tiles = min(tokens, triton.cdiv(tokens, BLOCK_M) + runs)
    index = torch.arange(tokens, device=slots.device)  # [T]
    run_starts = torch.ones(tokens, dtype=torch.bool, device=slots.device)
    run_starts[1:] = slots[1:] != slots[:-1]
    first = torch.cummax(torch.where(run_starts, index, 0), 0).values  # [T]: the first token of each one's run
    tile_starts = (index - first) % BLOCK_M == 0  # [T]
    tile = torch.cumsum(tile_starts, 0) - 1  # [T]: each token's tile
    # begins[max_tiles] stays T, the end of the last tile; writes of tokens that start no tile go to the spare entry
    begins = torch.full((max_tiles + 2,), tokens, dtype=torch.long, device=slots.device)
    begins.scatter_(0, torch.where(tile_starts & (tile < max_tiles), tile, max_tiles + 1), index)
    firsts = begins[:max_tiles]
    return torch.stack([firsts, begins[1 : max_tiles + 1], slots[firsts.clamp(max=tokens - 1)]]).to(torch.int32)


@triton.jit
def _tile(tiles_ptr, max_tiles):
    """The program's tile: its first token, end token and slot (int64: a slot's offset in a store of many slots of
    a high rank passes 2**31 elements)."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + 2 * max_tiles + tile).to(tl.int64)
    return tl.load(tiles_ptr + tile), tl.load(tiles_ptr + max_tiles + tile), slot


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K], row stride stride_x
    a_ptr,  # [S+1, R, K] view of the A store: strides (stride_as, stride_ar, 1)
    tiles_ptr,  # [3, max_tiles] int32 (segment_tiles)
    slot_rank_ptr,  # [S+1] int32: each slot's adapter rank (A rows past it are not read)
    partial_ptr,  # [chunks, T, R_PAD] fp32
    T,
    K,
    max_tiles,
    no_adapter,  # slot S: its tiles need no product
    stride_x,
    stride_as,
    stride_ar,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs multiplied in fp32 (tensor cores would round them to tf32)
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    first, end, slot = _tile(tiles_ptr, max_tiles)
    if (first < end) & (slot != no_adapter):
        chunk = tl.program_id(1)
        offs_m = first + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        offs_r = tl.arange(0, R_PAD)
        rank = tl.load(slot_rank_ptr + slot)
        acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        k_end = tl.minimum((chunk + 1) * CHUNK_K, K)
        for k0 in range(chunk * CHUNK_K, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x_tile = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
            x = tl.load(x_tile, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
            a_tile = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None]
            a = tl.load(a_tile, mask=(offs_r[None, :] < rank) & k_mask[:, None], other=0.0)  # [BK, R_PAD]
            if IEEE:
                acc = tl.dot(x, a, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, a, acc)
        tl.store(partial_ptr + (chunk * T + offs_m[:, None]) * R_PAD + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _expand_kernel(
    partial_ptr,  # [chunks, T, R_PAD] fp32
    b_ptr,  # [S+1, R, N] view of the B store (scaling folded in): strides (stride_bs, stride_br, 1)
    tiles_ptr,  # [3, max_tiles] int32 (segment_tiles)
    slot_rank_ptr,  # [S+1] int32 (B rows past a slot's rank are not read)
    y_ptr,  # [T, N], row stride stride_y: the base layer's output, the delta added in place
    T,
    N,
    chunks,
    max_tiles,
    no_adapter,  # slot S: its tiles keep the base layer's output as it is
    stride_y,
    stride_bs,
    stride_br,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    depend(PDL)
    first, end, slot = _tile(tiles_ptr, max_tiles)
    if (first < end) & (slot != no_adapter):
        dtype = y_ptr.dtype.element_ty
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < end
        n_mask = offs_n < N
        offs_r = tl.arange(0, R_PAD)
        rank = tl.load(slot_rank_ptr + slot)
        shrunk = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for c in range(chunks):
            shrunk += tl.load(partial_ptr + (c * T + offs_m[:, None]) * R_PAD + offs_r[None, :],
                              mask=m_mask[:, None], other=0.0)  # fmt: skip
        # rounded to the compute dtype, as the unfused x @ A.T would leave it
        shrunk = shrunk.to(dtype)  # [BM, R_PAD]
        b_tile = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :]
        b = tl.load(b_tile, mask=(offs_r[:, None] < rank) & n_mask[None, :], other=0.0)  # [R_PAD, BN]
        if IEEE:
            delta = tl.dot(shrunk, b, input_precision="ieee")
        else:
            delta = tl.dot(shrunk, b)
        y_tile = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
        tile_mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_tile, mask=tile_mask, other=0.0).to(tl.float32)
        # the delta rounded to y's dtype, then added, as `y += (shrunk @ B).to(y.dtype)` rounds
        tl.store(y_tile, (y + delta.to(dtype).to(tl.float32)).to(dtype), mask=tile_mask)


def segmented_lora(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, slot_ranks: torch.Tensor
) -> None:
    """y [T, N] += each token's LoRA delta, in place: x [T, K] @ A[slot].T @ B[slot] per token, in two launches;
    a: [S+1, R, K] and b: [S+1, R, N] views of the slot stores (slot S all zero: no adapter), unit column stride,
    x's dtype; tiles: segment_tiles of the tokens' slots; slot_ranks: [S+1] int32, each slot's adapter rank;
    y: unit column stride."""
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, k = x.shape
    n = y.shape[1]
    r_pad = max(16, triton.next_power_of_2(a.shape[1]))  # tl.dot's least size
    chunks = triton.cdiv(k, CHUNK_K)
    max_tiles = tiles.shape[1]
    no_adapter = a.shape[0] - 1
    ieee = x.dtype == torch.float32
    partial = torch.empty(chunks, tokens, r_pad, dtype=torch.float32, device=x.device)
    _shrink_kernel[(max_tiles, chunks)](
        x, a, tiles, slot_ranks, partial, tokens, k, max_tiles, no_adapter, x.stride(0), a.stride(0), a.stride(1),
        R_PAD=r_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, CHUNK_K=CHUNK_K, IEEE=ieee, **options(x.device),
    )  # fmt: skip
    _expand_kernel[(max_tiles, triton.cdiv(n, BLOCK_N))](
        partial, b, tiles, slot_ranks, y, tokens, n, chunks, max_tiles, no_adapter, y.stride(0), b.stride(0),
        b.stride(1), R_PAD=r_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IEEE=ieee, **options(y.device),
    )  # fmt: skip
