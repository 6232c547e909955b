"""Static KV cache and the attention function the HF modules call through `AttentionInterface`.

The model runs with use_cache=False and explicit position_ids; each attention layer writes its new K/V into
the engine's preallocated cache at (row, position) and attends over the cached prefix with a mask built from
the positions. Rows of a decode batch are cache rows 0..B-1, read in place (no gather); rows that are not
decoding, and the left padding of a batched prefill, write into a spare dummy row so they never disturb a
request. A prefill batch reads its (scattered) cache rows by index.
"""

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from server.engine.errors import KVCacheTooLarge

ATTENTION_NAME = "loraplex_static"


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (free GPU memory, or available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts the page cache the kernel would give back; "free" pages alone do not
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KVCache:
    """Per layer k/v [rows + 1, kv_heads, max_seq_len, head_dim]; the last row is the dummy row."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (rows + 1, kv_heads, max_seq_len, head_dim)
        need = 2 * layers * math.prod(shape) * dtype.itemsize
        free = available_memory(device)
        if need > 0.9 * free:  # refuse at start-up rather than run out of memory later
            raise KVCacheTooLarge(
                f"the KV cache for {rows} rows x {max_seq_len} tokens needs {need / 2**30:.1f} GiB but only "
                f"{free / 2**30:.1f} GiB of {device.type} memory is free: lower --max-batch-size or --max-seq-len"
            )
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.dummy_row = rows
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


@dataclass
class StepContext:
    """What one forward attends over; passed to the model as the `engine_step` keyword."""

    cache: KVCache
    write_rows: torch.Tensor  # [B, T] long: cache row each new token writes to (dummy row for padding)
    positions: torch.Tensor  # [B, T] long: position of each new token (= its index in the row)
    read_rows: torch.Tensor | None  # [B] long: cache row each batch row reads; None: rows 0..B-1 in place
    kv_len: int  # how many cached positions to attend over (static under CUDA graphs)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, T, L] bool: which cached positions each new token sees; built once per forward, not per layer."""
        if sliding_window not in self._masks:
            kv_pos = torch.arange(self.kv_len, device=self.positions.device)  # [L]
            q_pos = self.positions[:, None, :, None]  # [B, 1, T, 1]
            mask = kv_pos <= q_pos
            if sliding_window is not None:
                mask = mask & (q_pos - kv_pos < sliding_window)
            self._masks[sliding_window] = mask
        return self._masks[sliding_window]


def static_cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    engine_step: StepContext | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    # query: [B, Hq, T, D]; key, value: [B, Hkv, T, D]
    if engine_step is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention only runs inside the engine")
    step, layer = engine_step, module.layer_idx
    k_cache, v_cache = step.cache.k[layer], step.cache.v[layer]  # [R, Hkv, S, D]
    k_cache[step.write_rows, :, step.positions] = key.transpose(1, 2).to(k_cache.dtype)  # [B, T, Hkv, D]
    v_cache[step.write_rows, :, step.positions] = value.transpose(1, 2).to(v_cache.dtype)
    if step.read_rows is None:
        b = query.shape[0]
        keys = k_cache[:b, :, : step.kv_len]  # [B, Hkv, L, D]
        values = v_cache[:b, :, : step.kv_len]
    else:
        keys = k_cache[step.read_rows, :, : step.kv_len]
        values = v_cache[step.read_rows, :, : step.kv_len]
    out = F.scaled_dot_product_attention(
        query,
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=step.mask(sliding_window),
        scale=scaling,
        enable_gqa=query.shape[1] != keys.shape[1],
    )  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, static_cache_attention)
