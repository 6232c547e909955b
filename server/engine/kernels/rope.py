"""Rotary embeddings of q and k in one kernel, in place of the ten elementwise kernels (slices, neg, cat,
four products, two sums) that the HF `apply_rotary_pos_emb` launches per layer.

HF calls that function from its attention modules through their modeling module's globals, so the engine
replaces it there, for CUDA tensors only (CPU tensors keep the original). The kernel rounds after every
product and sum as the original does in the input dtype; in bf16 results may still differ from the original's
by one rounding (measured on an H200).
"""

import functools
import sys
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from server.engine.kernels.pdl import depend, options

# Modeling modules whose apply_rotary_pos_emb is the standard rotate-half formula.
MODULES = tuple(
    f"transformers.models.{family}.modeling_{family}" for family in ("llama", "mistral", "qwen2", "qwen3", "gemma")
)

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@triton.jit
def _rotate_head(
    x_ptr, cos_ptr, sin_ptr, out_ptr, pid, H, T, stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one (b, h, t) of x [B, H, T, D]; out is [B, T, H, D] in memory
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    dtype = out_ptr.dtype.element_ty
    x = x_ptr + b * stride_xb + h * stride_xh + t * stride_xt + offs
    trig = b * stride_cb + t * stride_ct + offs
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), rounded where the original rounds
    first = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    out = out_ptr + ((b * T + t) * H + h) * 2 * HALF + offs
    tl.store(out, first.to(dtype), mask=mask)
    tl.store(out + HALF, second.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # [B, Hq, T, D] any strides but unit ones along D
    k_ptr,  # [B, Hkv, T, D] the same
    cos_ptr,  # [B, T, D], row strides (stride_cb, stride_ct)
    sin_ptr,
    q_out_ptr,  # [B, T, Hq, D] contiguous
    k_out_ptr,  # [B, T, Hkv, D] contiguous
    HQ, HKV, T, Q_PROGRAMS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_cb, stride_ct,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):  # fmt: skip
    depend(PDL)
    pid = tl.program_id(0)  # one (b, h, t) of q (the first B * HQ * T programs), then of k, per program
    if pid < Q_PROGRAMS:
        _rotate_head(q_ptr, cos_ptr, sin_ptr, q_out_ptr, pid, HQ, T, stride_qb, stride_qh, stride_qt, stride_cb,
                     stride_ct, HALF, BLOCK)  # fmt: skip
    else:
        _rotate_head(k_ptr, cos_ptr, sin_ptr, k_out_ptr, pid - Q_PROGRAMS, HKV, T, stride_kb, stride_kh, stride_kt,
                     stride_cb, stride_ct, HALF, BLOCK)  # fmt: skip


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb(q, k, cos, sin) with unsqueeze_dim=1, in one launch: q [B, Hq, T, D], k [B, Hkv, T, D],
    cos, sin [B, T, D] (unit stride along D). The results are [B, H, T, D] views of [B, T, H, D] memory, the
    layout the engine's attention reads its queries in (no copy) and its cache write its keys from."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    dtype = torch.promote_types(q.dtype, cos.dtype)
    q_out = torch.empty(b, t, hq, d, dtype=dtype, device=q.device)
    k_out = torch.empty(b, t, hkv, d, dtype=dtype, device=q.device)
    _rope_kernel[(b * (hq + hkv) * t,)](
        q, k, cos, sin, q_out, k_out, hq, hkv, t, b * hq * t, *q.stride()[:3], *k.stride()[:3], *cos.stride()[:2],
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), **options(q.device),
    )  # fmt: skip
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _dispatch(original: RotaryFn) -> RotaryFn:
    @functools.wraps(original)
    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda and unsqueeze_dim == 1 and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1:
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.fused = True  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def fuse_rotary(model: nn.Module) -> None:
    """Point the supported modeling modules that `model`'s layers come from at the fused rotary."""
    for name in {type(m).__module__ for m in model.modules()} & set(MODULES):
        module = sys.modules[name]
        if not getattr(module.apply_rotary_pos_emb, "fused", False):
            module.apply_rotary_pos_emb = _dispatch(module.apply_rotary_pos_emb)
