"""Static KV cache and the attention function the HF modules call through `AttentionInterface`.

The model runs with use_cache=False over one flat batch of tokens (see step.py): each attention layer writes
the new tokens' K/V into the engine's preallocated cache at (row, position), then every token attends to its
own row's positions up to its own, whatever its sequence's length (ragged attention: no padding, no mask).
Nothing outside a token's own prefix is ever read, so values left in the cache by earlier requests (or
written by a faulty one) cannot reach another request's answer.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PretrainedConfig

from loraplex.memory import available_memory
from server.engine.errors import KVCacheTooLarge
from server.engine.ragged_attention import ragged_attention
from server.engine.step import StepTensors

ATTENTION_NAME = "loraplex_static"
# The attribute of an attention module where fusions.AttentionShrink asks for o_proj's shrink from the attention
OUTPUT_SHRINK = "loraplex_output_shrink"

# (q [N, Hq, D], k_cache, v_cache, query_start, seq_rows, seq_lens, scale, sliding_window) -> [N, Hq, D]
RaggedAttention = Callable[..., torch.Tensor]


def kv_head_dim(text_config: PretrainedConfig) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def kv_row_bytes(text_config: PretrainedConfig, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of one KV cache row (one request) of max_seq_len tokens, over every layer, K and V."""
    layers, kv_heads = text_config.num_hidden_layers, text_config.num_key_value_heads
    return 2 * layers * kv_heads * max_seq_len * kv_head_dim(text_config) * dtype.itemsize


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

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Row `target`'s first `length` positions from row `source`'s, in every layer (a prompt prefix that a
        running request holds, for a new request that starts with it)."""
        for cache in (*self.k, *self.v):
            cache[target, :, :length].copy_(cache[source, :, :length])

    def save(self, row: int, length: int) -> list[torch.Tensor]:
        """Row `row`'s first `length` positions of every layer's k, then v ([kv_heads, length, head_dim] each),
        copied into host memory: a paused request's, while its row serves another."""
        return [cache[row, :, :length].to("cpu", copy=True) for cache in (*self.k, *self.v)]

    def restore(self, row: int, saved: list[torch.Tensor]) -> None:
        """Row `row`'s first positions from `save`'s copies: the same keys and values, bit for bit."""
        for cache, part in zip((*self.k, *self.v), saved, strict=True):
            cache[row, :, : part.shape[1]].copy_(part)


@dataclass(frozen=True)
class StepContext:
    """What one forward attends over; passed to the model as the `engine_step` keyword."""

    cache: KVCache
    tensors: StepTensors


def _attend_fn(device: torch.device) -> RaggedAttention:
    if device.type == "cuda":  # the Triton kernel: no host syncs, so steps can be captured in CUDA graphs
        from server.engine.kernels.attention import ragged_attention as kernel

        return kernel
    return ragged_attention


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
    # query: [1, Hq, N, D]; key, value: [1, Hkv, N, D] (the step's flat token batch)
    if engine_step is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention only runs inside the engine")
    t, layer = engine_step.tensors, module.layer_idx
    k_cache, v_cache = engine_step.cache.k[layer], engine_step.cache.v[layer]  # [R, Hkv, S, D]
    positions = t.positions[0]  # [N]
    key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, Hkv, D]
    if key.is_cuda and key.stride(-1) == 1 and value.stride(-1) == 1:  # one launch for K and V, not two
        from server.engine.kernels.kv_cache import write_kv

        write_kv(k_cache, v_cache, key, value, t.write_rows, positions)
    else:
        k_cache[t.write_rows, :, positions] = key.to(k_cache.dtype)
        v_cache[t.write_rows, :, positions] = value.to(v_cache.dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    args = (query[0].transpose(0, 1).contiguous(), k_cache, v_cache, t.query_start, t.seq_rows, t.seq_lens, scale,
            sliding_window)  # fmt: skip
    source = getattr(module, OUTPUT_SHRINK, None)  # fusions.AttentionShrink: o_proj's shrink can be made here
    inputs = source.inputs() if source is not None else None
    if inputs is not None:  # the fused kernels run: CUDA (the tests run them under Triton's interpreter too)
        from server.engine.kernels.attention import OutputShrink, merges
        from server.engine.kernels.attention import ragged_attention as triton_attention

        q = args[0]  # [N, Hq, D]
        if merges(q, k_cache, t.seq_rows):  # the merge kernel runs: it makes the shrink as it writes the output
            shrink = OutputShrink.of(*inputs, q.shape[1])
            out = triton_attention(*args, None, shrink)
            source.prime(out.view(out.shape[0], -1), (shrink.partial, q.shape[1]))
            return out[None], None
    out = _attend_fn(query.device)(*args)  # [N, Hq, D]
    if source is not None:  # o_proj makes its own shrink (and takes none primed before)
        source.prime(out, None)
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, static_cache_attention)
