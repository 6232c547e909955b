"""Attention over a ragged token batch in plain torch: the CPU path, and the reference of the Triton kernel
(server.engine.kernels.attention), with the same signature and semantics. It loops over the sequences on the
host, so it syncs and cannot be captured in a CUDA graph.
"""

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """Causal attention of each sequence's tokens over its own cache row.

    q: [N, Hq, D], each sequence's tokens contiguous in position order; k_cache, v_cache: [R, Hkv, S, D];
    query_start: [num_seqs + 1] int32 (sequence s owns tokens query_start[s]:query_start[s + 1], possibly
    none); seq_rows, seq_lens: [num_seqs] int32 (cache row; KV length after this step, its new tokens being
    the last ones). Returns out [N, Hq, D] in q's dtype; tokens past query_start[-1] are left as they were
    (zero in a new output)."""
    q_heads, kv_heads = q.shape[1], k_cache.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    if out is None:
        out = torch.zeros_like(q)
    starts, rows, lens = query_start.tolist(), seq_rows.tolist(), seq_lens.tolist()
    for s, (row, seq_len) in enumerate(zip(rows, lens, strict=True)):
        begin, end = starts[s], starts[s + 1]
        q_len = end - begin
        if q_len == 0:  # a padding sequence
            continue
        if not q_len <= seq_len <= k_cache.shape[2]:
            raise ValueError(f"sequence {s}: {q_len} new tokens, KV length {seq_len}")
        # Only the row's first seq_len positions are sliced: the rest may hold another request's stale values.
        k = k_cache[row, :, :seq_len][None]  # [1, Hkv, L, D]
        v = v_cache[row, :, :seq_len][None]
        query = q[begin:end].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len] positions of the new tokens
        distance = q_pos[:, None] - torch.arange(seq_len, device=q.device)[None, :]  # [q_len, L]
        visible = distance >= 0
        if sliding_window is not None:
            visible &= distance < sliding_window
        attended = F.scaled_dot_product_attention(
            query, k, v, attn_mask=visible, scale=scale, enable_gqa=q_heads != kv_heads
        )  # [1, Hq, q_len, D]
        out[begin:end] = attended[0].transpose(0, 1)
    return out
