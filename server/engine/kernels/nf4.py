"""A fused NF4 matmul for decode-sized batches on CUDA: y = x @ dequant(W).T, W never materialized.

bitsandbytes' 4-bit GEMV reads the weights at well under the H100's bandwidth, and above a few rows it
dequantizes whole weights to bf16 every step (BENCHMARKS.md). This Triton kernel reads bitsandbytes' own
storage in place (two NF4 codes per byte, the even column in the high nibble; one absmax per 64 weights,
itself 8-bit quantized per 256 blocks when double quantization is on), dequantizes a tile in registers and
multiplies it on the tensor cores; K is split over programs when N alone gives too few to fill the device.
Prefill-sized inputs (more than MAX_ROWS tokens) keep bitsandbytes' dequantize + bf16 matmul, which wins there.
"""

import functools

import torch
import triton
import triton.language as tl
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Linear4bit
from torch import nn

MAX_ROWS = 64  # above this many tokens, dequantize + a dense matmul is the faster way
QBLOCK = 64  # weights per absmax: bitsandbytes' 4-bit default, the only block size this kernel reads
QBLOCK2 = 256  # absmax values per second-level scale under double quantization


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] compute dtype, row stride stride_xm
    w_ptr,  # [N * K / 2] uint8
    absmax_ptr,  # [N * K / 64] fp32, or uint8 indices into code2_ptr when NESTED
    absmax2_ptr,  # [N * K / 64 / 256] fp32 (NESTED only)
    code2_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 added to every absmax (NESTED only)
    nf4_ptr,  # [16] fp32: the NF4 code book
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N] out dtype, or [SPLIT_K, M, N] fp32 partial sums when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BLOCKS: tl.constexpr,  # K / SPLIT_K / 64: the quantization blocks one program reduces over
):
    # One iteration is one quantization block (64 columns, one scale per row), so the scale multiplies the
    # block's partial sums, not every weight.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.arange(0, 32)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if BLOCK_M == 1:  # one row: per-column products summed once at the end, no tensor cores to fill
        acc = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, K_BLOCKS):
        k0 = (pid_k * K_BLOCKS + i) * 64
        block = offs_n * (K // 64) + k0 // 64  # [BN] quantization block of each row
        packed = tl.load(w_ptr + block[:, None] * 32 + offs_byte[None, :], mask=n_mask[:, None], other=0)  # [BN, 32]
        scale = tl.load(absmax_ptr + block, mask=n_mask, other=0)  # [BN]
        if NESTED:
            scale = tl.load(code2_ptr + scale.to(tl.int32)) * tl.load(absmax2_ptr + block // 256) + tl.load(offset_ptr)
        hi = tl.load(nf4_ptr + (packed >> 4).to(tl.int32))  # [BN, 32] fp32 codes of the even columns
        lo = tl.load(nf4_ptr + (packed & 15).to(tl.int32))  # odd columns
        x_cols = x_ptr + offs_m[:, None] * stride_xm + k0 + 2 * offs_byte[None, :]  # [BM, 32]
        x_even = tl.load(x_cols, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_cols + 1, mask=m_mask[:, None], other=0.0)
        if BLOCK_M == 1:
            acc += (hi * x_even.to(tl.float32) + lo * x_odd.to(tl.float32)) * scale[:, None]
        elif IEEE:
            part = tl.dot(x_even, tl.trans(hi), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(lo), part, input_precision="ieee") * scale[None, :]
        else:
            part = tl.dot(x_even, tl.trans(hi.to(x_ptr.dtype.element_ty)))
            acc += tl.dot(x_odd, tl.trans(lo.to(x_ptr.dtype.element_ty)), part) * scale[None, :]
    if BLOCK_M == 1:
        result = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    else:
        result = acc
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            result += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], result, mask=out_mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,  # [SPLIT_K, M * N] fp32
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M * N] out dtype
    MN,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same inputs always give the same sums
        acc += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def pick_config(m: int, n: int, k: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages) for an [m, k] x [k, n] product, m <= MAX_ROWS.

    Split K until there are about four programs per SM, as long as each still reduces several blocks.
    """
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    block_n = 128 if m == 1 else 64
    blocks, tiles_n, split = k // QBLOCK, triton.cdiv(n, block_n), 1
    while tiles_n * split < 4 * sms and blocks % (2 * split) == 0 and blocks // (2 * split) >= 8:
        split *= 2
    return block_m, block_n, split, 4, 3


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # One on the CPU, where Triton's interpreter runs the programs one by one.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def nf4_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit column stride) @ dequant(weight).T -> [M, N] in x's dtype; `state` is the
    weight's bitsandbytes QuantState (nf4, block size 64, K a multiple of 64)."""
    m, k = x.shape
    n = state.shape[0]
    if config is None:
        config = pick_config(m, n, k, _multiprocessors(x.device))
    block_m, block_n, split, warps, stages = config
    nested = bool(state.nested)
    # state.offset stays a tensor: reading it on the host would synchronize, which CUDA graph capture forbids
    absmax2, code2, offset = (state.state2.absmax, state.state2.code, state.offset) if nested else (state.absmax,) * 3
    has_bias = bias is not None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _nf4_matmul_kernel[(triton.cdiv(n, block_n), split)](
        x, weight, state.absmax, absmax2, code2, offset, state.code, bias if has_bias else out, target,
        m, n, k, x.stride(0),
        NESTED=nested, HAS_BIAS=has_bias, SPLIT_K=split, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, K_BLOCKS=k // QBLOCK // split,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            target, bias if has_bias else out, out, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block
        )
    return out


def supported(module: nn.Module) -> bool:
    """Whether `module` is an NF4 linear layer this kernel reads: bitsandbytes' layout, block size 64."""
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
    """An NF4 Linear4bit whose decode-sized forwards run the fused kernel; larger ones run bitsandbytes."""

    def __init__(self, base: Linear4bit) -> None:
        super().__init__()
        # bitsandbytes would repack the weight on a CPU with AVX512-BF16 the first time it runs there (prefill
        # under Triton's CPU interpreter): the kernel reads bitsandbytes' standard layout only.
        base.support_avx512bf16_for_cpu = False
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS:
            return self.base(x)
        compute = self.base.compute_dtype or x.dtype
        flat = x.reshape(rows, self.in_features).to(compute)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        bias = None if self.base.bias is None else self.base.bias.to(compute)
        y = nf4_matmul(flat, self.base.weight, self.base.weight.quant_state, bias)  # [rows, out]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def fuse_nf4_linears(model: nn.Module) -> int:
    """Swap every supported NF4 linear layer of `model` for a FusedNf4Linear; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if supported(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedNf4Linear(module))
            swapped += 1
    return swapped
