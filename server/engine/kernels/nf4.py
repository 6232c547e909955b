"""NF4 matrix products for decode steps in Triton, W never materialized: a GEMV for one row, a tensor-core kernel
for 2-256 rows (y = x @ dequant(W).T); FusedNf4Linear takes nf4_mma (CUDA) before them where it runs.

bitsandbytes' own 4-bit GEMV reads the weights at about a quarter of the H100's bandwidth, and for more rows it
dequantizes the whole weight to bf16 and multiplies densely: 4.5 bytes of traffic per weight instead of the
0.5 of NF4 (BENCHMARKS.md). Both kernels here read bitsandbytes' storage in place: two NF4 codes per byte, the
even column in the high nibble; one absmax per 64 weights, itself 8-bit quantized per 256 blocks under double
quantization. The bytes are loaded as int32 words (8 codes each) and decoded with register byte permutes (not
a table in memory).
- The GEMV: each program owns a few output rows and every x value it loads serves all of them; the scale
  multiplies a word's 8 products at once, not each weight. The row's LoRA delta can be added in the epilogue
  (the expand half of the LoRA kernels), so a projection with a LoRA is two launches.
- The matmul: each program decodes a [BLOCK_N, BLOCK_K] weight tile once, scaled, into registers and feeds it
  to one tensor-core dot with all the rows' x; K is split over several programs that add into one fp32 output,
  so even a 1,024-row weight keeps every SM streaming. Weights sharing x (q/k/v, gate/up) can be one launch,
  each weight's programs after the previous weight's. On CUDA, nf4_wide (nf4_wide.cu) takes the bf16 steps of up
  to 64 rows.
"""

import functools
import itertools

import torch
import triton
import triton.language as tl
from bitsandbytes.functional import QuantState, get_4bit_type
from bitsandbytes.nn import Linear4bit
from torch import nn

from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.lora import finish_projection
from server.engine.kernels.nf4_mma import Nf4Segments, Part, nf4_bf16_bits, nf4_mma, second_level
from server.engine.kernels.nf4_wide import available as wide_available
from server.engine.kernels.nf4_wide import mma_serves, nf4_wide_finished, nf4_wide_sums
from server.engine.kernels.zeroed import ZeroedSums

QBLOCK = 64  # weights per absmax: bitsandbytes' 4-bit default, the only block size these kernels read
QBLOCK2 = 256  # absmax values per second-level scale under double quantization
MAX_ROWS = 256  # above this many rows (prefill), the weight dequantized + a dense matmul


def _decode_asm() -> str:
    """PTX decoding one int32 word (8 codes) into four words of two bf16 NF4 values each.

    A 16-entry byte table is two `prmt` lookups (each picks among 8 bytes by the low 3 bits of a selector
    nibble) and a select on the code's high bit; a bf16 needs a table for its high and one for its low byte.
    Register permutes instead of loads: the decode costs about 4 integer instructions per weight.
    """
    bits = nf4_bf16_bits()

    def words(table: list[int]) -> list[str]:  # 16 bytes as four little-endian words
        return [hex(sum(table[4 * w + i] << (8 * i) for i in range(4))) for w in range(4)]

    high, low = words([b >> 8 for b in bits]), words([b & 0xFF for b in bits])
    lines = [".reg .b32 w, s, m, a, b, h, l, k, t0, t1, t2, t3, u0, u1, u2, u3;"]
    lines += ["mov.b32 w, $4;", "mov.b32 k, 0x8000;"]
    lines += [f"mov.b32 t{i}, {high[i]};" for i in range(4)] + [f"mov.b32 u{i}, {low[i]};" for i in range(4)]
    for half in range(2):  # selector nibbles: columns 1, 0, 3, 2 of the half word (the even column is the high nibble)
        lines += [
            "and.b32 s, w, 0x7777;",  # the low 3 bits: which of 8 bytes
            "shr.b32 m, w, 3;",
            "lop3.b32 m, m, 0x1111, 0x8888, 0xEA;",  # (m & 0x1111) | 0x8888: sign-replicate byte 0 or 1 of k
            "prmt.b32 m, k, 0, m;",  # byte i: 0xFF where code i >= 8
            "prmt.b32 a, t0, t1, s;",
            "prmt.b32 b, t2, t3, s;",
            "lop3.b32 h, a, b, m, 0xD8;",  # (a & ~m) | (b & m): the high bytes of the four values
            "prmt.b32 a, u0, u1, s;",
            "prmt.b32 b, u2, u3, s;",
            "lop3.b32 l, a, b, m, 0xD8;",  # their low bytes
            f"prmt.b32 ${2 * half}, l, h, 0x5140;",  # bf16 pairs: (column 1 low, column 0 high), then 3 and 2
            f"prmt.b32 ${2 * half + 1}, l, h, 0x7362;",
            "shr.b32 w, w, 16;",
        ]
    return "{\n" + "\n".join(lines) + "\n}"


_DECODE_PTX = tl.constexpr(_decode_asm())


@triton.jit
def _decode_words(words):
    # [...] int32 -> four [...] int32, each two bf16 values: columns (0, 1), (2, 3), (4, 5), (6, 7) of each word
    return tl.inline_asm_elementwise(
        _DECODE_PTX, "=r,=r,=r,=r,r", [words], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1
    )


@triton.jit
def _high_half(pair):
    return (pair & -65536).to(tl.float32, bitcast=True)  # a bf16's bits in a float's high half: the same value


@triton.jit
def _low_half(pair):
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _add_columns(part, even, odd, x_even_ptr):
    # part, even, odd: [BN, B, 8] fp32; x_even_ptr: [B, 8] pointers to each word's even column
    part += even * tl.load(x_even_ptr).to(tl.float32)[None, :, :]
    return part + odd * tl.load(x_even_ptr + 1).to(tl.float32)[None, :, :]


@triton.jit
def _decoded_columns(words, nf4_ptr, DECODE_ASM: tl.constexpr):
    # words [...] int32 -> eight [...] fp32: columns 0..7 of each word (2i: the high nibble of byte i)
    if DECODE_ASM:
        pair0, pair1, pair2, pair3 = _decode_words(words)
        columns = (_high_half(pair0), _low_half(pair0), _high_half(pair1), _low_half(pair1),
                   _high_half(pair2), _low_half(pair2), _high_half(pair3), _low_half(pair3))  # fmt: skip
    else:  # Triton's CPU interpreter runs no PTX: the same bf16 values from a table in memory
        columns = (tl.load(nf4_ptr + ((words >> 4) & 15)), tl.load(nf4_ptr + (words & 15)),
                   tl.load(nf4_ptr + ((words >> 12) & 15)), tl.load(nf4_ptr + ((words >> 8) & 15)),
                   tl.load(nf4_ptr + ((words >> 20) & 15)), tl.load(nf4_ptr + ((words >> 16) & 15)),
                   tl.load(nf4_ptr + ((words >> 28) & 15)), tl.load(nf4_ptr + ((words >> 24) & 15)))  # fmt: skip
    return columns


@triton.jit
def _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr):
    scale = tl.load(absmax_ptr + block, mask=mask, other=0)
    if NESTED:
        scale = tl.load(code2_ptr + scale.to(tl.int32)) * tl.load(absmax2_ptr + block // 256) + tl.load(offset_ptr)
    return scale


@triton.jit
def _dot(x, w, acc):
    # x [BM, K] @ w [BN, K].T + acc: fp32 (the CPU tests' models) exactly, bf16 on the tensor cores
    if x.dtype == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # [K] compute dtype
    w_ptr,  # [N * K / 8] int32: bitsandbytes' packed bytes, 8 codes per word
    absmax_ptr,  # [N * K / 64] fp32, or uint8 indices into code2_ptr when NESTED
    absmax2_ptr,  # [N * K / 64 / 256] fp32 (NESTED only)
    code2_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 added to every absmax (NESTED only)
    nf4_ptr,  # [16] fp32: the NF4 code book rounded to bf16 (not DECODE_ASM only)
    bias_ptr,  # [N] (HAS_BIAS only)
    partial_ptr,  # [CHUNKS_PAD, R_PAD] fp32: the LoRA shrink's partial sums for this row (HAS_LORA only)
    lora_b_ptr,  # [S+1, R, N] view of the B store, strides (stride_bs, stride_br, 1) (HAS_LORA only)
    slot_ptr,  # [1] long: the row's slot (HAS_LORA only)
    rank_ptr,  # [1] int32: the row's adapter rank (HAS_LORA only)
    out_ptr,  # [N] compute dtype
    N,
    chunks,
    stride_bs,
    stride_br,
    BLOCKS_PER_ROW: tl.constexpr,  # K / 64: a constant per layer shape, so the loop bound is known at compile time
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,  # add the row's LoRA delta: the expand half of the LoRA kernels, fused
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    DECODE_ASM: tl.constexpr,  # decode codes with byte permutes (CUDA), not a table in memory
    BLOCK_N: tl.constexpr,  # output rows per program
    BLOCKS: tl.constexpr,  # quantization blocks (of 64 weights = 8 words) per row per iteration
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < N
    offs_b = tl.arange(0, BLOCKS)
    offs_w = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_N, BLOCKS, 8), dtype=tl.float32)
    for b0 in range(0, BLOCKS_PER_ROW, BLOCKS):
        block = rows[:, None] * BLOCKS_PER_ROW + b0 + offs_b[None, :]  # [BN, B] quantization block ids
        words = tl.load(w_ptr + block[:, :, None] * 8 + offs_w[None, None, :], mask=row_mask[:, None, None], other=0)
        x_words = x_ptr + ((b0 + offs_b[:, None]) * 8 + offs_w[None, :]) * 8  # [B, 8] first column of each word
        v0, v1, v2, v3, v4, v5, v6, v7 = _decoded_columns(words, nf4_ptr, DECODE_ASM)
        part = _add_columns(tl.zeros((BLOCK_N, BLOCKS, 8), dtype=tl.float32), v0, v1, x_words)
        part = _add_columns(part, v2, v3, x_words + 2)
        part = _add_columns(part, v4, v5, x_words + 4)
        part = _add_columns(part, v6, v7, x_words + 6)
        scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, row_mask[:, None], NESTED)  # [BN, B]
        acc += part * scale[:, :, None]
    result = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_mask, other=0).to(tl.float32)
    if HAS_LORA:  # rounded as the unfused layers round: the base output, the shrunk activations, then the sum
        offs_c, offs_r = tl.arange(0, CHUNKS_PAD), tl.arange(0, R_PAD)
        partials = partial_ptr + offs_c[:, None] * R_PAD + offs_r[None, :]
        partial = tl.load(partials, mask=offs_c[:, None] < chunks, other=0.0)  # [CHUNKS_PAD, R_PAD]
        shrunk = tl.sum(partial, axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)  # [R_PAD]
        b_tile = lora_b_ptr + tl.load(slot_ptr) * stride_bs + offs_r[:, None] * stride_br + rows[None, :]
        b_mask = (offs_r[:, None] < tl.load(rank_ptr)) & row_mask[None, :]
        b = tl.load(b_tile, mask=b_mask, other=0.0).to(tl.float32)  # [R_PAD, BN]
        result = result.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.sum(b * shrunk[:, None], axis=0)
    tl.store(out_ptr + rows, result.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _nf4_matmul_tile(
    x_ptr,  # [M, K] compute dtype, row stride stride_xm
    w_ptr,  # [N * K / 8] int32: bitsandbytes' packed bytes, 8 codes per word
    absmax_ptr,  # as _nf4_gemv_kernel's
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    nf4_ptr,
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N] at row stride stride_out: compute dtype when SPLIT_K is 1, else fp32 zeros to add into
    n_tile,  # which BLOCK_N rows of the weight
    M,
    N,
    stride_xm,
    stride_out,
    BLOCKS_PER_ROW: tl.constexpr,  # K / 64
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 64
    SPLIT_K: tl.constexpr,  # programs sharing one output tile, each over K / SPLIT_K columns
):
    """One program's part of x @ dequant(W).T: output columns [n_tile * BLOCK_N, +BLOCK_N), K split program_id(1)."""
    dtype = x_ptr.dtype.element_ty
    WORDS: tl.constexpr = BLOCK_K // 8
    BLOCKS: tl.constexpr = BLOCK_K // 64
    STEPS: tl.constexpr = BLOCKS_PER_ROW * 64 // (BLOCK_K * SPLIT_K)
    rows = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows[:, None] < N  # [BN, 1]
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m[:, None] < M
    block0 = tl.program_id(1) * STEPS * BLOCKS
    word = rows[:, None] * (BLOCKS_PER_ROW * 8) + block0 * 8 + tl.arange(0, WORDS)[None, :]  # [BN, W]
    block = rows[:, None] * BLOCKS_PER_ROW + block0 + tl.arange(0, BLOCKS)[None, :]  # [BN, BLOCKS]
    x_tile = x_ptr + offs_m[:, None] * stride_xm + block0 * 64 + tl.arange(0, BLOCK_K)[None, :]  # [BM, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(STEPS):
        words = tl.load(w_ptr + word, mask=row_mask, other=0)
        scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, row_mask, NESTED)  # [BN, BLOCKS]
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCKS, 8)), (BLOCK_N, WORDS))
        v0, v1, v2, v3, v4, v5, v6, v7 = _decoded_columns(words, nf4_ptr, DECODE_ASM)
        # a join's two halves become the new last axis, so the last join picks the fastest bit of the column:
        # [BN, W, 2, 2, 2] holds column 8 w + 4 h + 2 p + q (v_(4h + 2p + q)) at [:, w, h, p, q]
        even = tl.join(tl.join(v0 * scale, v4 * scale), tl.join(v2 * scale, v6 * scale))
        odd = tl.join(tl.join(v1 * scale, v5 * scale), tl.join(v3 * scale, v7 * scale))
        tile = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K)).to(dtype)  # [BN, BK]
        acc = _dot(tl.load(x_tile, mask=m_mask, other=0.0), tile, acc)
        x_tile += BLOCK_K
        word += WORDS
        block += BLOCKS
    if HAS_BIAS:  # added by one of the programs sharing the tile
        bias = tl.load(bias_ptr + rows, mask=rows < N, other=0).to(tl.float32)  # [BN]
        acc += tl.where(tl.program_id(1) == 0, bias, 0.0)[None, :]
    out = out_ptr + offs_m[:, None] * stride_out + rows[None, :]
    mask = m_mask & (rows[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] compute dtype, row stride stride_xm
    nf4_ptr,  # as _nf4_gemv_kernel's
    out_ptr,  # [M, sum of the segments' N]: the segments' outputs side by side (as _nf4_matmul_tile's out_ptr)
    M,
    stride_xm,
    stride_out,
    # Each segment's weight (its words, absmax, second level, bias: as _nf4_matmul_tile's), its N, and the
    # program_id(0) where the next segment's tiles start; segments past SEGMENTS are never read. Segment 0:
    s0_w,
    s0_absmax,
    s0_absmax2,
    s0_code2,
    s0_offset,
    s0_bias,
    n0,
    end0,
    # segment 1
    s1_w,
    s1_absmax,
    s1_absmax2,
    s1_code2,
    s1_offset,
    s1_bias,
    n1,
    end1,
    # segment 2
    s2_w,
    s2_absmax,
    s2_absmax2,
    s2_code2,
    s2_offset,
    s2_bias,
    n2,
    BLOCKS_PER_ROW: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SEGMENTS: tl.constexpr,  # weights sharing x (q/k/v: 3), each a run of programs
):
    # Each segment's tile is its own inlined copy with its own pointer arguments (not pointers picked at run time):
    # Triton then knows each weight's alignment and keeps its vectorized, pipelined loads.
    tile = tl.program_id(0)
    if tile < end0:
        _nf4_matmul_tile(x_ptr, s0_w, s0_absmax, s0_absmax2, s0_code2, s0_offset, nf4_ptr, s0_bias,
                         out_ptr, tile, M, n0, stride_xm, stride_out, BLOCKS_PER_ROW, NESTED, HAS_BIAS, DECODE_ASM,
                         BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)  # fmt: skip
    elif SEGMENTS > 1:
        if tile < end1:
            _nf4_matmul_tile(x_ptr, s1_w, s1_absmax, s1_absmax2, s1_code2, s1_offset, nf4_ptr,
                             s1_bias, out_ptr + n0, tile - end0, M, n1, stride_xm, stride_out, BLOCKS_PER_ROW,
                             NESTED, HAS_BIAS, DECODE_ASM, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)  # fmt: skip
        elif SEGMENTS > 2:
            _nf4_matmul_tile(x_ptr, s2_w, s2_absmax, s2_absmax2, s2_code2, s2_offset, nf4_ptr,
                             s2_bias, out_ptr + n0 + n1, tile - end1, M, n2, stride_xm, stride_out,
                             BLOCKS_PER_ROW, NESTED, HAS_BIAS, DECODE_ASM, BLOCK_M, BLOCK_N, BLOCK_K,
                             SPLIT_K)  # fmt: skip


@triton.jit
def _nf4_dequantize_kernel(
    w_ptr,  # [N * K / 2] uint8: bitsandbytes' packed codes, the even column in the high nibble
    absmax_ptr,  # as _nf4_gemv_kernel's
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    nf4_ptr,  # [16] fp32: bitsandbytes' NF4 code book
    out_ptr,  # [N * K] out dtype
    total,  # bytes of w
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,  # bytes a program, a multiple of 32 (a quantization block)
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] byte indices
    mask = offs < total
    codes = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs // 32, mask, NESTED)  # [BLOCK]
    even = tl.load(nf4_ptr + (codes >> 4)) * scale  # code * absmax in fp32, then rounded once: bitsandbytes' ops
    odd = tl.load(nf4_ptr + (codes & 15)) * scale
    values = tl.join(even, odd).to(out_ptr.dtype.element_ty)  # [BLOCK, 2]: columns 2i, 2i + 1
    pairs = 2 * offs[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out_ptr + pairs, values, mask=mask[:, None])


@functools.cache
def _code_book(device: torch.device) -> torch.Tensor:
    return get_4bit_type("nf4", device=device)  # [16] fp32


def nf4_dequantize(weight: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, as bitsandbytes' dequantize_4bit computes it (each code's fp32 value times its
    block's absmax, rounded once), in one launch where bitsandbytes takes three under double quantization (the
    absmax, its offset, the weight): the prefill's path (steps of more than MAX_ROWS rows)."""
    n, k = state.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    absmax2, code2, offset = second_level(state)
    total = n * k // 2
    block = 1024 if weight.device.type == "cuda" else 1 << 16  # the CPU interpreter: few large programs
    # no fused multiply-adds: bitsandbytes rounds the absmax's product and its offset's sum apart
    _nf4_dequantize_kernel[(triton.cdiv(total, block),)](
        weight.view(-1), state.absmax, absmax2, code2, offset, _code_book(weight.device), out, total,
        NESTED=bool(state.nested), BLOCK=block, enable_fp_fusion=False,
    )  # fmt: skip
    return out


@functools.cache
def _bf16_code_book(device: torch.device) -> torch.Tensor:
    return get_4bit_type("nf4", device=device).to(torch.bfloat16).float()  # [16]


def pick_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCKS, num_warps) for an [n, k] weight: the best found per Llama-3-8B projection shape on the
    H100 (`bench/nf4_kernel.py --rows 1 --sweep`), by the nearest shape; BLOCKS shrinks to divide K / 64."""
    if n <= 2048:
        block_n, blocks, warps = 4, 16, 8
    elif k > 8192:
        block_n, blocks, warps = 4, 8, 4
    elif n > 8192:
        block_n, blocks, warps = 16, 8, 8
    else:
        block_n, blocks, warps = 8, 8, 8
    while (k // QBLOCK) % blocks:
        blocks //= 2
    return block_n, blocks, warps


def nf4_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    lora: LoraEpilogue | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [K] (unit stride) @ dequant(weight).T (+ bias, + the row's LoRA delta) -> [N] in x's dtype; `state` is
    the weight's bitsandbytes QuantState (nf4, block size 64, K a multiple of 64)."""
    n, k = state.shape
    on_cuda = x.device.type == "cuda"
    # Triton's CPU interpreter runs programs one by one: there, few large ones
    block_n, blocks, warps = config or (pick_config(n, k) if on_cuda else (min(128, triton.next_power_of_2(n)), 1, 1))
    # state.offset stays a tensor: reading it on the host would synchronize, which CUDA graph capture forbids
    absmax2, code2, offset = second_level(state)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if lora is None:
        partial, b, slots, ranks, chunks, chunks_pad, r_pad = out, out, out, out, 0, 1, 1
        stride_bs = stride_br = 0
    else:
        partial, b, slots, ranks, chunks = lora.partial, lora.b, lora.slots, lora.ranks, lora.chunks
        chunks_pad, r_pad = partial.shape[1:]
        stride_bs, stride_br = b.stride(0), b.stride(1)
    _nf4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight.view(-1).view(torch.int32), state.absmax, absmax2, code2, offset,
        out if on_cuda else _bf16_code_book(x.device), out if bias is None else bias, partial, b, slots, ranks,
        out, n, chunks, stride_bs, stride_br, k // QBLOCK, NESTED=bool(state.nested), HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None, CHUNKS_PAD=chunks_pad, R_PAD=r_pad, DECODE_ASM=on_cuda, BLOCK_N=block_n,
        BLOCKS=blocks, num_warps=warps,
    )  # fmt: skip
    return out


def pick_matmul_config(n: int, k: int, rows: int, on_cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for `rows` rows of x and an [n, k] weight: on CUDA the
    best found on the H200 per Llama-3-8B projection shape, by the nearest shape, for one tile of 64 rows (up to 64
    rows of the steps nf4_mma and nf4_wide do not serve), of 128 (65-128) or of 256 (129-256); q/k/v (n 6144) and
    gate/up (n 28672) are one launch each (`bench/nf4_kernel.py --rows 64,128,256 --shapes ... --sweep`). Under
    Triton's CPU interpreter few large programs. BLOCK_K and SPLIT_K shrink until they divide K."""
    if not on_cuda:
        block_n, block_k, split_k, warps, stages = min(128, max(16, triton.next_power_of_2(n))), 512, 1, 1, 1
    elif rows > 128:
        block_n, block_k, split_k, warps, stages = 64, 64, 4, 8 if 4096 < n <= 8192 else 4, 3 if n > 4096 else 2
    elif rows > 64:
        if k > 8192:
            block_n, block_k, split_k, warps, stages = 128, 64, 16, 4, 3
        elif n > 8192:
            block_n, block_k, split_k, warps, stages = 128, 64, 1, 4, 3
        elif n > 4096 or n <= 2048:
            block_n, block_k, split_k, warps, stages = 64, 64, 4, 4, 2
        else:
            block_n, block_k, split_k, warps, stages = 128, 128, 8, 4, 2
    elif n <= 2048:
        block_n, block_k, split_k, warps, stages = 64, 128, 16, 8, 1
    elif k > 8192:
        block_n, block_k, split_k, warps, stages = 128, 128, 8, 4, 3
    elif n > 8192:
        block_n, block_k, split_k, warps, stages = 128, 64, 8, 4, 3
    elif n > 4096:
        block_n, block_k, split_k, warps, stages = 128, 64, 8, 4, 1
    else:
        block_n, block_k, split_k, warps, stages = 128, 64, 16, 4, 3
    while k % (block_k * split_k):
        if split_k > 1:
            split_k //= 2
        else:
            block_k //= 2
    return block_n, block_k, split_k, warps, stages


def nf4_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit column stride) @ dequant(weight).T (+ bias) -> [M, N] in x's dtype, on the
    tensor cores; `state` as for nf4_gemv. With SPLIT_K > 1 the programs add into fp32 atomically, so the
    order of those additions (and a result's last bits) can change from call to call."""
    return nf4_matmul_sums(x, [(weight, state, bias)], config).to(x.dtype)


def nf4_matmul_sums(
    x: torch.Tensor,
    parts: list[Part],
    config: tuple[int, int, int, int, int] | None = None,
    zeroed: ZeroedSums | None = None,
) -> torch.Tensor:
    """nf4_matmul before its cast, for one to three weights sharing x (q/k/v, gate/up: Nf4Segments' parts, of one
    K, kind and bias presence) in one launch: [M, sum of N], the weights' outputs side by side, in x's dtype
    where K is not split, else the programs' fp32 sums. config: pick_matmul_config's for the weights together;
    without one, nf4_wide's fp32 sums where it runs (bf16 CUDA steps of up to WIDE_ROWS rows). zeroed: where
    split-K sums take their zeros from (a new tensor by default)."""
    if config is None and wide_available(x, parts):
        return nf4_wide_sums(x, parts, zeroed=zeroed)
    m, k = x.shape
    ns = [state.shape[0] for _, state, _ in parts]
    on_cuda = x.device.type == "cuda"
    block_n, block_k, split_k, warps, stages = config or pick_matmul_config(sum(ns), k, m, on_cuda)
    if split_k == 1:
        out = torch.empty(m, sum(ns), dtype=x.dtype, device=x.device)
    elif zeroed is not None:
        out = zeroed.take(m, sum(ns), x.device)
    else:
        out = torch.zeros(m, sum(ns), dtype=torch.float32, device=x.device)
    ends = list(itertools.accumulate(triton.cdiv(n, block_n) for n in ns))
    segments = []  # three segments' arguments; segment 0's again where there are fewer (never read)
    for i in range(3):
        weight, state, bias = parts[min(i, len(parts) - 1)]
        absmax2, code2, offset = second_level(state)
        segments += [weight.view(-1).view(torch.int32), state.absmax, absmax2, code2, offset]
        segments += [out if bias is None else bias, ns[i] if i < len(parts) else 0]
        segments += [ends[min(i, len(ends) - 1)]] if i < 2 else []
    _nf4_matmul_kernel[(ends[-1], split_k)](
        x, out if on_cuda else _bf16_code_book(x.device), out, m, x.stride(0), out.stride(0), *segments,
        k // QBLOCK, NESTED=bool(parts[0][1].nested), HAS_BIAS=parts[0][2] is not None, DECODE_ASM=on_cuda,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        SEGMENTS=len(parts), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def project_sums(
    y: torch.Tensor,
    x: torch.Tensor,
    parts: list[Part],
    lora: LoraEpilogue | None,
    zeroed: ZeroedSums,
    residual: torch.Tensor | None = None,
    widths: list[int] | None = None,
) -> None:
    """y [M, sum of N] = the projection of x by `parts` (+ each row's LoRA delta, + residual): nf4_matmul_sums
    (split-K sums added into `zeroed`'s zeros), then finish_projection, which stores the zeros back as it reads."""
    sums = nf4_matmul_sums(x, parts, zeroed=zeroed)
    finish_projection(y, sums, lora, residual, widths, clean=zeroed.holds(sums))
    zeroed.give_back(sums)


def supported(module: nn.Module) -> bool:
    """Whether `module` is an NF4 linear layer these kernels read: bitsandbytes' layout, block size 64."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (
        isinstance(module, Linear4bit)
        and state is not None
        and state.quant_type == "nf4"
        and state.blocksize == QBLOCK
        and (not state.nested or state.state2.blocksize == QBLOCK2)
        and state.shape[1] % QBLOCK == 0
    )


class FusedNf4Linear(nn.Module):
    """An NF4 Linear4bit whose forwards of up to mma_rows rows run nf4_mma (bf16 on CUDA), of one row otherwise
    the GEMV above, of up to MAX_ROWS rows nf4_matmul_sums (nf4_wide for bf16 on CUDA up to WIDE_ROWS, else the
    Triton tensor-core kernel), of more (prefill) nf4_dequantize (on CUDA; bitsandbytes' elsewhere) + a dense
    matmul."""

    def __init__(self, base: Linear4bit, zeroed: ZeroedSums | None = None) -> None:
        super().__init__()
        # bitsandbytes would repack the weight on a CPU with AVX512-BF16 the first time it runs there (prefill
        # under Triton's CPU interpreter): the kernels read bitsandbytes' standard layout only.
        base.support_avx512bf16_for_cpu = False
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.zeroed = zeroed or ZeroedSums()  # split-K sums' zeros: the model's layers share one
        # the weight of the launch after this layer's, which nf4_mma asks L2 for as its copies end (link_ahead)
        self.ahead: Part | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]
        rows = x.numel() // self.in_features
        return self.project(x.reshape(rows, self.in_features)).view(*x.shape[:-1], self.out_features)

    def project(
        self, x: torch.Tensor, lora: LoraEpilogue | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [rows, in] -> [rows, out] in x's dtype, computed in the layer's compute dtype, + each row's LoRA
        delta when `lora` is given, then + `residual` [rows, out] when given: both in the kernel's epilogue where it
        has one (nf4_mma; nf4_wide where K is one part; the GEMV adds the delta), else in one launch after it
        (finish_projection)."""
        rows = x.shape[0]
        expand = lora  # the delta still to add
        if rows > MAX_ROWS and x.device.type == "cuda":  # prefill: the weight dequantized, a dense matmul, the expand
            compute = self.base.compute_dtype or x.dtype
            weight = nf4_dequantize(self.base.weight, self.base.weight.quant_state, compute)  # [out, in]
            y = torch.nn.functional.linear(x.to(compute), weight, self._bias(compute)).to(x.dtype)
        elif rows > MAX_ROWS:  # bitsandbytes' own dequantize + matmul (the interpreter's bf16 rounding is not CUDA's)
            y = self.base(x)  # [rows, out]
        else:
            compute = self.base.compute_dtype or x.dtype
            weight, state, bias = self.base.weight, self.base.weight.quant_state, self._bias(compute)
            flat = x.to(compute).contiguous()
            if mma_serves(flat, lora, residual):
                return nf4_mma(flat, weight, state, bias, lora, residual=residual, ahead=self.ahead).to(x.dtype)
            if rows == 1:
                y, expand = nf4_gemv(flat[0], weight, state, bias, lora).to(x.dtype)[None], None
            else:
                part = [(weight, state, bias)]
                if wide_available(flat, part) and (residual is None or residual.dtype == torch.bfloat16):
                    finished = nf4_wide_finished(flat, part, lora, residual)  # the delta and the residual in it
                    if finished is not None:
                        return finished.to(x.dtype)
                # the split-K sums' cast, the delta and the residual in one launch after them
                y = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)
                project_sums(y, flat, part, lora, self.zeroed, residual)
                return y
        if expand is not None or residual is not None:
            finish_projection(y, y, expand, residual)
        return y

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.base.bias is None else self.base.bias.to(dtype)


def nf4_segments(layers: list[nn.Module]) -> Nf4Segments | None:
    """The NF4 layers sharing an input as one launch's segments (nf4_mma's, nf4_wide's or the Triton matmul's), or
    None where one launch cannot serve them: a layer not a FusedNf4Linear, or layers of different compute dtype, K,
    kind or bias presence."""
    if not all(isinstance(layer, FusedNf4Linear) and layer.base.compute_dtype is not None for layer in layers):
        return None
    dtypes = {layer.base.compute_dtype for layer in layers}
    if len(dtypes) > 1:
        return None
    parts = [(layer.base.weight, layer.base.weight.quant_state, layer._bias(*dtypes)) for layer in layers]
    segments = Nf4Segments(parts, *dtypes)  # type: ignore[arg-type]
    return segments if segments.supported() else None


def fuse_nf4_linears(model: nn.Module) -> None:
    """Swap every NF4 linear layer of `model` the kernels read for a FusedNf4Linear (sharing one ZeroedSums)."""
    zeroed = ZeroedSums()
    for name, module in list(model.named_modules()):
        if supported(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedNf4Linear(module, zeroed))
    link_ahead([module for module in model.modules() if isinstance(module, FusedNf4Linear)])


def link_ahead(layers: list[FusedNf4Linear]) -> None:
    """Give each layer the weight of the layer after it (`ahead`): `layers` in the order a step runs them, as a
    decoder's modules are declared (q, k, v, o, gate, up, down). A launch of several layers (q/k/v, gate/up) takes
    its last one's. The last layer has none."""
    for layer, after in itertools.pairwise(layers):
        layer.ahead = (after.base.weight, after.base.weight.quant_state, None)
