"""A greedy step's tokens and their logprobs straight from the logits, in two short launches: each row's argmax
and log-sum-exp made over chunks of the vocabulary in parallel, then combined.

In place of the cast to fp32, log_softmax, argmax and gather of a greedy step: log_softmax and argmax are each
one block a row on torch, ~30 us apiece over a 128K vocabulary whatever the batch (a tenth of a decode step at
one request). A row's token is the first index of its largest logit, as torch's argmax; its logprob is
-log(sum(exp(logits - max))), log_softmax at that index, summed in another order. Logits holding NaN or +inf
give a NaN logprob, as log_softmax does: the engine ends such a row.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 2048  # vocabulary columns a program of the first launch


@triton.jit
def _chunk_kernel(
    logits_ptr,  # [B, V], row stride stride_l
    max_ptr,  # [B, CHUNKS] fp32: each chunk's largest logit
    index_ptr,  # [B, CHUNKS] int32: its first index in the row
    sum_ptr,  # [B, CHUNKS] fp32: sum(exp(logits - the chunk's max)) over the chunk
    V,
    CHUNKS,
    stride_l,
    BLOCK: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    x = tl.load(logits_ptr + row * stride_l + offs, mask=inside, other=float("-inf")).to(tl.float32)  # [BLOCK]
    top, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    # a chunk of -inf alone (a grammar's mask) adds nothing: exp(-inf - -inf) would be NaN
    total = tl.where(top == float("-inf"), 0.0, tl.sum(tl.where(inside, tl.exp(x - top), 0.0), axis=0))
    out = row * CHUNKS + chunk
    tl.store(max_ptr + out, top)
    tl.store(index_ptr + out, chunk * BLOCK + at)
    tl.store(sum_ptr + out, total)


@triton.jit
def _combine_kernel(
    max_ptr,  # [B, CHUNKS] as _chunk_kernel wrote them
    index_ptr,
    sum_ptr,
    token_ptr,  # [B] int64
    logprob_ptr,  # [B] fp32
    V,
    CHUNKS,
    CHUNKS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS_PAD)
    inside = offs < CHUNKS
    tops = tl.load(max_ptr + row * CHUNKS + offs, mask=inside, other=float("-inf"))  # [CHUNKS_PAD]
    sums = tl.load(sum_ptr + row * CHUNKS + offs, mask=inside, other=0.0)
    top, first = tl.max(tops, axis=0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.load(index_ptr + row * CHUNKS + first)
    # a chunk whose max is -inf has a sum of 0; a NaN sum (NaN or +inf logits) makes the total NaN, and so does a
    # row of -inf alone, as log_softmax makes them
    total = tl.sum(tl.where(sums == 0.0, 0.0, sums * tl.exp(tops - top)), axis=0)
    tl.store(logprob_ptr + row, tl.where(top == float("-inf"), float("nan"), -tl.log(total)))
    # the token is fed to the next step: whatever the logits held, an index inside the vocabulary
    tl.store(token_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's greedy token and its logprob: logits [B, V] (any float dtype, unit column stride) ->
    (tokens [B] int64, logprobs [B] fp32), as log_softmax(logits.float()) then argmax and gather give them."""
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, BLOCK_V)
    tops = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(tops)
    index = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _chunk_kernel[(rows, chunks)](logits, tops, index, sums, vocab, chunks, logits.stride(0), BLOCK=BLOCK_V)
    _combine_kernel[(rows,)](tops, index, sums, tokens, logprobs, vocab, chunks,
                             CHUNKS_PAD=triton.next_power_of_2(chunks))  # fmt: skip
    return tokens, logprobs
