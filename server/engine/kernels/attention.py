"""Attention over a ragged token batch in one launch: the decode tokens and prefill chunks of a step
concatenated, each sequence reading its own row of the static KV cache (vLLM's unified Triton attention,
adapted to a cache of one row per request).

A program takes BLOCK_Q tokens of one sequence times the GROUP query heads of one KV head (the M rows of its
tensor-core products) and streams that sequence's K/V positions in BLOCK_N tiles with an online softmax.
The grid depends only on the token and sequence counts, and nothing syncs with the host, so a step can be
captured in a CUDA graph per token-count bucket. With few programs (small decode batches), each one's KV
range is split over SPLITS programs whose partial results a second kernel merges (flash-decoding).
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.engine.kernels.lora import shrink_chunk, shrink_shape
from server.engine.kernels.pdl import depend, options

LOG2E = math.log2(math.e)  # scores are kept in base 2: exp2 is one instruction, exp is not
MIN_SPLIT_POSITIONS = 64  # the fewest KV positions worth a split of their own (choose_config)
SEARCH = tl.constexpr(128)  # sequence starts _find_sequence loads at once


@triton.jit
def _find_sequence(query_start_ptr, block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query block `block`: each sequence's blocks start at query_start[s] // BLOCK_Q + s,
    strictly increasing in s (zero-token sequences own one empty block), so the owner is the count of starts
    <= block, less one. The starts are loaded SEARCH at a time: one memory round trip up to SEARCH sequences,
    where a binary search waits for one a halving."""
    count = 0
    for first in range(0, num_seqs, SEARCH):
        s = first + tl.arange(0, SEARCH)
        starts = tl.load(query_start_ptr + s, mask=s < num_seqs, other=0)
        count += tl.sum(((starts // BLOCK_Q + s <= block) & (s < num_seqs)).to(tl.int32), 0)
    return count - 1


# num_seqs is not specialized: Triton would turn a count of 1 into a constant and the search's bounds would
# change type inside the loop.
@triton.jit(do_not_specialize=["num_seqs"])
def _attention_kernel(
    q_ptr,  # [N, Hq, D]: strides (stride_qn, stride_qh, 1)
    k_ptr,  # [R, Hkv, S, D]: strides (stride_kr, stride_kh, stride_ks, 1)
    v_ptr,  # [R, Hkv, S, D]: strides (stride_vr, stride_vh, stride_vs, 1)
    out_ptr,  # [N, Hq, D]: strides (stride_on, stride_oh, 1); written when SPLITS == 1
    part_acc_ptr,  # [N, Hq, SPLITS, HEAD_DP] fp32: unnormalized outputs of each split; when SPLITS > 1
    part_ml_ptr,  # [N, Hq, SPLITS, 2] fp32: each split's running max (base 2) and softmax sum
    query_start_ptr,  # [num_seqs + 1] int32
    seq_rows_ptr,  # [num_seqs] int32
    seq_lens_ptr,  # [num_seqs] int32
    num_seqs,
    num_tokens,  # N
    qk_scale,  # softmax scale * log2(e)
    stride_qn,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_ks,
    stride_vr,
    stride_vh,
    stride_vs,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_D: tl.constexpr,
    HEAD_DP: tl.constexpr,  # HEAD_D padded to a power of two (at least 16, for tl.dot)
    BLOCK_M: tl.constexpr,  # rows of the products: BLOCK_Q tokens x GROUP heads, padded to a power of two
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # KV positions per tile
    SPLITS: tl.constexpr,
    WINDOW: tl.constexpr,  # sliding window (a query at p sees keys k with p - k < WINDOW); 0: none
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # products on fp32 operands: Triton's CPU interpreter miscomputes bf16 ones
    ZERO_PAD: tl.constexpr,  # zeros to the padding tokens' output (SPLITS == 1: the merge writes them otherwise)
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DP)
    d_valid = offs_d < HEAD_D
    if ZERO_PAD:
        # The padding tokens past the last sequence are no sequence's: program (b, h) zeroes tokens b * BLOCK_Q
        # onwards, as many as a block holds, at the heads of KV head h (the grid's blocks cover every token), where
        # a fill of the whole output would cost a launch.
        pad_tok = block * BLOCK_Q + offs_m // GROUP  # [BM]
        pad_head = kv_head * GROUP + offs_m % GROUP
        pad = (offs_m < BLOCK_Q * GROUP) & (pad_tok >= tl.load(query_start_ptr + num_seqs)) & (pad_tok < num_tokens)
        pad_tile = out_ptr + pad_tok.to(tl.int64)[:, None] * stride_on + pad_head[:, None] * stride_oh + offs_d[None, :]
        zero = tl.zeros([BLOCK_M, HEAD_DP], dtype=out_ptr.dtype.element_ty)
        tl.store(pad_tile, zero, mask=pad[:, None] & d_valid[None, :])
    seq = _find_sequence(query_start_ptr, block, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    local = block - (q_begin // BLOCK_Q + seq)  # this block's index among its sequence's blocks
    # The grid has num_seqs spare blocks (one a sequence at most is partly filled): they, and the blocks of
    # zero-token sequences, do nothing. A token past query_start[-1] belongs to no block.
    if local * BLOCK_Q >= q_len:
        return
    row = tl.load(seq_rows_ptr + seq).to(tl.int64)  # int64: R * Hkv * S * D may pass 2**31
    context = tl.load(seq_lens_ptr + seq) - q_len  # positions cached before this step's tokens

    offs_n = tl.arange(0, BLOCK_N)
    tok = local * BLOCK_Q + offs_m // GROUP  # [BM] each row's token, counted within its sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BM] each row's query head
    row_valid = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)  # [BM]: pad rows, tokens of the next sequence
    pos = context + tok  # [BM] each row's position in the cache row
    q_rows = (q_begin + tok).to(tl.int64)
    q_tile = q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_tile, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BM, DP]
    if DOT_FP32:
        q = q.to(tl.float32)

    # Positions [lo, hi) cover what any row of the block sees: causality ends them at the block's last
    # token, hence never past seq_len (positions from seq_len on may hold another request's stale values),
    # and the window starts them at the first token's window.
    hi = context + tl.minimum(q_len, (local + 1) * BLOCK_Q)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(context + local * BLOCK_Q - WINDOW + 1, 0)
    first_tile = lo // BLOCK_N
    tiles = tl.cdiv(hi, BLOCK_N) - first_tile
    per_split = tl.cdiv(tiles, SPLITS)
    tile_begin = first_tile + split * per_split
    tile_end = tl.minimum(tile_begin + per_split, first_tile + tiles)  # empty for a split past the range

    k_base = k_ptr + row * stride_kr + kv_head * stride_kh
    v_base = v_ptr + row * stride_vr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    for t in range(tile_begin, tile_end):
        kpos = t * BLOCK_N + offs_n  # [BN]
        # Positions from hi on are never loaded: masked loads read 0, so no stale NaN/inf enters a product
        # (a 0 weight times a loaded NaN would still be NaN). Loaded positions are all this request's.
        kv_valid = kpos < hi
        k = tl.load(
            k_base + kpos[None, :] * stride_ks + offs_d[:, None], mask=d_valid[:, None] & kv_valid[None, :], other=0.0
        )  # [DP, BN]
        v = tl.load(
            v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0
        )  # [BN, DP]
        p_dtype = v.dtype  # the weights are rounded to the cache dtype for the P @ V product
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        visible = row_valid[:, None] & (kpos[None, :] <= pos[:, None])
        if WINDOW > 0:
            visible = visible & (pos[:, None] - kpos[None, :] < WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no position yet (a window starting inside the tile, a pad row) keeps max -inf;
        # subtracting 0 instead gives it weights exp2(-inf) = 0 rather than NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])  # [BM, BN]
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(p_dtype).to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    mask = row_valid[:, None] & d_valid[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every valid row saw its own position: l_i > 0
        out_tile = out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Every split stores, an empty one (max -inf, sum 0, acc 0) too: the merge reads them all.
        part = (q_rows * (tl.num_programs(1) * GROUP) + head) * SPLITS + split  # [BM]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DP + offs_d[None, :], acc, mask=mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_kernel(
    part_acc_ptr,  # [N, Hq, SPLITS, HEAD_DP] fp32
    part_ml_ptr,  # [N, Hq, SPLITS, 2] fp32
    out_ptr,  # [N, Hq, D]: strides (stride_on, stride_oh, 1)
    query_start_ptr,  # [num_seqs + 1] int32
    a_ptr,  # [S+1, R, Hq * D] view of o_proj's A store: strides (stride_as, stride_ar, 1) (SHRINK only)
    slot_ptr,  # [N] long (SHRINK only)
    rank_ptr,  # [N] int32 (SHRINK only)
    partial_ptr,  # [1, N, CHUNKS_PAD, R_PAD] fp32: chunk h the shrink of head h's D columns (SHRINK only)
    num_seqs,
    stride_on,
    stride_oh,
    stride_as,
    stride_ar,
    HEAD_D: tl.constexpr,
    HEAD_DP: tl.constexpr,
    SPLITS: tl.constexpr,
    SHRINK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    ZERO_PAD: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):
    depend(PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DP)
    d_mask = offs_d < HEAD_D
    if token >= tl.load(query_start_ptr + num_seqs):  # padding past the last sequence: nothing was written
        if ZERO_PAD:  # a new output: its padding zero, here rather than by a fill of the whole output first
            zero = tl.zeros([HEAD_DP], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + token.to(tl.int64) * stride_on + head * stride_oh + offs_d, zero, mask=d_mask)
        if SHRINK:  # its output is zero: so is its shrink
            zeros = tl.zeros([R_PAD], dtype=tl.float32)
            tl.store(partial_ptr + (token * CHUNKS_PAD + head) * R_PAD + tl.arange(0, R_PAD), zeros)
        return
    offs_s = tl.arange(0, SPLITS)
    part = (token.to(tl.int64) * tl.num_programs(1) + head) * SPLITS + offs_s  # [SPLITS]
    m = tl.load(part_ml_ptr + part * 2)
    l = tl.load(part_ml_ptr + part * 2 + 1)  # noqa: E741
    m_max = tl.max(m, 0)  # finite: the split holding the token's own position saw it
    w = tl.exp2(m - m_max)  # [SPLITS]: 0 for empty splits (max -inf), whose acc is 0 too
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DP + offs_d[None, :])  # [SPLITS, DP]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    out_row = out_ptr + token.to(tl.int64) * stride_on + head * stride_oh + offs_d
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_row, out, mask=d_mask)
    if SHRINK:  # o_proj's shrink of the head's columns of the output as stored: one chunk of its K
        x = tl.where(d_mask, out.to(tl.float32), 0.0)
        shrink_chunk(x, head * HEAD_D + offs_d, d_mask, a_ptr, slot_ptr, rank_ptr, partial_ptr, token, head, 0,
                     tl.num_programs(0), 0, stride_as, stride_ar, CHUNKS_PAD, R_PAD)  # fmt: skip


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows (tokens x heads of a group) per program
    block_n: int  # KV positions per tile
    splits: int  # programs sharing one block's KV range (a power of two; 1: no merge kernel)
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class OutputShrink:
    """The LoRA shrink of a layer taking the attention's output [N, Hq * D] as its input (o_proj, alone in its shrink
    group), made by the merge kernel as it writes each head's output: one launch fewer a layer. The same partial
    sums as lora_shrink's, chunked by head (chunk h: head h's D columns)."""

    a: torch.Tensor  # [S+1, R, Hq * D] view of the A store, unit column stride
    slots: torch.Tensor  # [N] long
    ranks: torch.Tensor  # [N] int32: each row's adapter rank
    partial: torch.Tensor  # [1, N, CHUNKS_PAD, R_PAD] fp32: written by the merge

    @staticmethod
    def of(a: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, q_heads: int) -> "OutputShrink":
        r_pad = shrink_shape(a.shape[2], a.shape[1])[2]
        partial = torch.empty(1, slots.shape[0], triton.next_power_of_2(q_heads), r_pad, dtype=torch.float32,
                              device=a.device)  # fmt: skip
        return OutputShrink(a, slots, ranks, partial)


def _floor_power_of_2(n: int) -> int:
    """The largest power of two <= n; 1 below 1."""
    return 1 << max(n.bit_length() - 1, 0)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H100/H200's, so that CPU runs pick what those GPUs would


def choose_config(
    tokens: int, num_seqs: int, q_heads: int, kv_heads: int, device: torch.device, span: int
) -> AttentionConfig:
    """The launch configuration for a batch shape; a function of the static shapes only, so that one CUDA graph
    per bucket replays it. Measured on an H200 (bf16, 32 query heads, 8 KV heads, D 128): decode-only batches
    (a token a sequence, whose programs hold one token's GROUP heads) are fastest with 16 rows a program, the
    least a tensor-core product takes, and 3-6% slower with 64; prefill chunks are 2-2.7x faster with 64 rows
    (each K/V tile loaded serves four times as many queries) than with 16. So 64 as soon as the bucket holds
    more tokens than one or two a sequence."""
    group = q_heads // kv_heads
    prefill = tokens >= 2 * max(num_seqs, 1)
    block_m = max(64 if prefill else 16, triton.next_power_of_2(group))
    block_q = block_m // group
    target = 2 * _sm_count(device)  # two programs an SM
    if prefill:  # fewer programs than two waves: split each one's KV range so the GPU fills (flash-decoding)
        programs = (tokens // block_q + num_seqs) * kv_heads
        splits = triton.next_power_of_2(triton.cdiv(target, max(programs, 1))) if programs < target else 1
    else:
        # A decode step has a block a sequence (its other blocks are empty), and its split count is fixed at
        # capture while its context is not. Splitting up to two programs an SM paid at 1 and 8 sequences of 8 KV
        # heads at 256-4,096 positions; at 32 and 64 sequences one program a sequence and KV head was the fastest
        # at all of them (bench/attention.py on an H200): the merge costs a launch and a round trip of partials.
        splits = _floor_power_of_2(target // max(num_seqs * kv_heads, 1))
    # Past 16 splits, or below MIN_SPLIT_POSITIONS positions a split of the longest KV range (`span`, a bound on
    # every sequence's), the merge costs more than streaming in more programs saves.
    splits = min(splits, 16, _floor_power_of_2(span // MIN_SPLIT_POSITIONS))
    # 3 stages of K/V loads in flight: prefill and mixed batches 8-20% faster than 2 on the H200, decode-only
    # ones up to 12% slower.
    return AttentionConfig(block_m=block_m, block_n=64, splits=splits, num_stages=3 if prefill else 2)


def ragged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    seq_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    shrink: OutputShrink | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch over the per-request KV cache rows; no host syncs; with `shrink`, the
    merge kernel also makes that LoRA shrink of the output (merges() must hold).

    q: [N, Hq, D], each sequence's tokens contiguous in position order; k_cache, v_cache: [R, Hkv, S, D];
    query_start: [num_seqs + 1] int32 (sequence s owns tokens query_start[s]:query_start[s + 1], possibly
    none); seq_rows, seq_lens: [num_seqs] int32 (cache row; KV length after this step, its new tokens being
    the last ones). Returns out [N, Hq, D] in q's dtype; tokens past query_start[-1] are left as they were
    (zero in a new output)."""
    config = _config(q, k_cache, seq_rows)
    return launch(q, k_cache, v_cache, query_start, seq_rows, seq_lens, scale, sliding_window, out, config, shrink)


def merges(q: torch.Tensor, k_cache: torch.Tensor, seq_rows: torch.Tensor) -> bool:
    """Whether ragged_attention of these shapes splits the KV ranges, so that its merge kernel runs (and can make
    an OutputShrink)."""
    return _config(q, k_cache, seq_rows).splits > 1


def _config(q: torch.Tensor, k_cache: torch.Tensor, seq_rows: torch.Tensor) -> AttentionConfig:
    """choose_config for these operands: no sequence's KV range is longer than a cache row."""
    return choose_config(q.shape[0], seq_rows.shape[0], q.shape[1], k_cache.shape[1], q.device, k_cache.shape[2])


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    seq_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None,
    config: AttentionConfig,
    shrink: OutputShrink | None = None,
) -> torch.Tensor:
    """`ragged_attention` with an explicit configuration (tests and benchmarks pick their own), and `shrink` of its
    output made by the merge kernel (a configuration of more than one split)."""
    tokens, q_heads, head_d = q.shape
    kv_heads = k_cache.shape[1]
    num_seqs = seq_rows.shape[0]
    if q_heads % kv_heads or k_cache.shape[-1] != head_d or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a unit stride along the head dimension")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}")
    group = q_heads // kv_heads
    block_m = max(config.block_m, 16, triton.next_power_of_2(group))
    block_q = block_m // group
    head_dp = max(16, triton.next_power_of_2(head_d))
    # >= the sum over sequences of cdiv(q_len, BLOCK_Q), and with a sequence past every token's block // BLOCK_Q
    blocks = tokens // block_q + num_seqs
    splits = config.splits
    zero_pad = out is None and num_seqs > 0 and tokens > 0  # the launch zeroes a new output's padding tokens
    if out is None:  # tokens past the last sequence are not attended: zero, not garbage
        out = torch.empty_like(q) if zero_pad else torch.zeros_like(q)
    if num_seqs == 0 or tokens == 0:
        return out
    if shrink is not None and splits == 1:
        raise ValueError("the output's shrink is made by the merge kernel, which runs only with more than one split")
    if shrink is not None and (shrink.slots.shape[0] != tokens or shrink.a.shape[2] != q_heads * head_d):
        raise ValueError(f"a shrink of {shrink.slots.shape[0]} rows of {shrink.a.shape[2]} columns does not take "
                         f"the output of {tokens} tokens of {q_heads} heads of {head_d}")  # fmt: skip
    if splits > 1:
        part_acc = torch.empty(tokens, q_heads, splits, head_dp, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(tokens, q_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _attention_kernel[(blocks, kv_heads, splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, query_start, seq_rows, seq_lens, num_seqs, tokens, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, HEAD_D=head_d, HEAD_DP=head_dp, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        SPLITS=splits, WINDOW=sliding_window or 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no silent TF32 rounding
        DOT_FP32=q.device.type == "cpu", ZERO_PAD=zero_pad and splits == 1,  # the merge writes them after splits
        **options(q.device), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1:
        a, slots, ranks, partial = (shrink.a, shrink.slots, shrink.ranks, shrink.partial) if shrink else (out,) * 4
        _merge_kernel[(tokens, q_heads)](
            part_acc, part_ml, out, query_start, a, slots, ranks, partial, num_seqs, out.stride(0), out.stride(1),
            a.stride(0), a.stride(1), HEAD_D=head_d, HEAD_DP=head_dp, SPLITS=splits, SHRINK=shrink is not None,
            CHUNKS_PAD=partial.shape[2] if shrink else 1, R_PAD=partial.shape[3] if shrink else 1, ZERO_PAD=zero_pad,
            **options(q.device),
        )  # fmt: skip
    return out
