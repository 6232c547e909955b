"""Rotary embeddings of q and k in one kernel each, in place of the ten elementwise kernels (slices, neg, cat,
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

# Modeling modules whose apply_rotary_pos_emb is the standard rotate-half formula.
MODULES = tuple(
    f"transformers.models.{family}.modeling_{family}" for family in ("llama", "mistral", "qwen2", "qwen3", "gemma")
)

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@triton.jit
def _rope_kernel(
    x_ptr,  # [B, H, T, D] any strides but unit ones along D
    cos_ptr,  # [B, T, D], row strides (stride_cb, stride_ct)
    sin_ptr,
    out_ptr,  # [B, H, T, D] contiguous
    H,
    T,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_cb,
    stride_ct,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # one (b, h, t) per program, in out's order
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
    out = out_ptr + pid * 2 * HALF + offs
    tl.store(out, first.to(dtype), mask=mask)
    tl.store(out + HALF, second.to(dtype), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, T, D]
    b, h, t, d = x.shape
    out = torch.empty(b, h, t, d, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    _rope_kernel[(b * h * t,)](
        x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
    )  # fmt: skip
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb(q, k, cos, sin) with unsqueeze_dim=1: q [B, Hq, T, D], k [B, Hkv, T, D], cos, sin
    [B, T, D] (unit stride along D)."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


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
