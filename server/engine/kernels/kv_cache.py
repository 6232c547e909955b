"""The step's new keys and values written into the static KV cache in one kernel a layer, in place of the two
index_put launches (one for K, one for V) of advanced-index assignment."""

import torch
import triton
import triton.language as tl

from server.engine.kernels.pdl import depend, options


@triton.jit
def _write_kernel(
    key_ptr,  # [N, H, D] any strides but unit ones along D
    value_ptr,  # the same
    k_cache_ptr,  # [R, H, S, D] strides (stride_cr, stride_ch, stride_cs, 1); v_cache the same
    v_cache_ptr,
    rows_ptr,  # [N] long: each token's cache row
    positions_ptr,  # [N] long: its position
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cr, stride_ch, stride_cs,
    R, S,  # the caches' rows and positions
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (pdl.depend)
):  # fmt: skip
    depend(PDL)
    token, head = tl.program_id(0), tl.program_id(1)
    # int64 offsets: a cache can hold more than 2^31 values
    row, position = tl.load(rows_ptr + token), tl.load(positions_ptr + token)
    # the engine admits no position past the cache; were one to come, it is dropped, not written over other memory
    inside = (row >= 0) & (row < R) & (position >= 0) & (position < S)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(inside, D, 0)
    slot = row * stride_cr + head * stride_ch + position * stride_cs + offs
    key = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs, mask=mask)
    tl.store(k_cache_ptr + slot, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """k_cache[rows[i], :, positions[i]] = key[i] and the same for v, cast to the caches' dtype: key, value
    [N, H, D], caches [R, H, S, D] of equal strides, all with unit stride along D; rows, positions [N] long.
    A token whose row or position is outside the caches writes nothing."""
    n, heads, d = key.shape
    if n == 0:
        return
    _write_kernel[(n, heads)](
        key, value, k_cache, v_cache, rows, positions, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), *k_cache.stride()[:3], k_cache.shape[0], k_cache.shape[2], D=d,
        BLOCK=triton.next_power_of_2(d), **options(key.device),
    )  # fmt: skip
