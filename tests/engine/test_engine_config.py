"""The engine's limits completed for a model: context length, and a batch size and adapter slots sized to the
device."""

import pytest
import torch
from tiny import tiny_model

from loraplex.settings import Settings
from server.engine.attention import kv_row_bytes
from server.engine.config import (
    CPU_ADAPTER_SLOTS,
    CPU_BATCH_SIZE,
    DEFAULT_TARGETS,
    KV_MEMORY_SHARE,
    SLOT_MEMORY_SHARE,
    EngineConfig,
    rows_that_fit,
    slots_that_fit,
)
from server.engine.errors import LoraRankTooLarge
from server.engine.multilora import LoraLayout, LoraStore, lora_targets


def test_settings_are_completed_for_the_model() -> None:
    model = tiny_model("llama")
    context = model.config.max_position_embeddings
    config = EngineConfig.for_model(Settings(max_seq_len=context * 4), model)
    assert config.max_seq_len == context  # never beyond what the model was trained for
    assert config.max_batch_size == CPU_BATCH_SIZE  # not set: a tiny model's rows fit, up to a CPU's most
    assert EngineConfig.for_model(Settings(max_batch_size=3), model).max_batch_size == 3


def test_a_kv_row_counts_every_layer_k_and_v() -> None:
    text = tiny_model("llama").config
    head_dim = text.hidden_size // text.num_attention_heads
    expected = 2 * text.num_hidden_layers * text.num_key_value_heads * 100 * head_dim * 2
    assert kv_row_bytes(text, 100, torch.bfloat16) == expected


def test_adapter_slots_not_set_are_fitted_and_held_by_the_cpu_tier() -> None:
    model = tiny_model("llama")
    assert EngineConfig.for_model(Settings(), model).max_active_adapters == CPU_ADAPTER_SLOTS  # a CPU: fixed
    assert EngineConfig.for_model(Settings(max_cpu_adapters=3), model).max_active_adapters == 3  # each keeps a copy
    assert EngineConfig.for_model(Settings(max_active_adapters=20), model).max_active_adapters == 20


def test_a_slot_counts_every_targets_a_and_b_at_the_largest_rank() -> None:
    model = tiny_model("llama", num_key_value_heads=2)
    text = model.config
    h, inter = text.hidden_size, text.intermediate_size
    kv = 2 * h // text.num_attention_heads  # k's and v's outputs: two heads
    a_width = 6 * h + inter  # q, k, v, o, gate, up read the hidden state; down the intermediate one
    b_width = 3 * h + 2 * kv + 2 * inter  # q, o and down write the hidden size; k and v kv's; gate and up inter
    layout = LoraLayout.of(lora_targets(model, DEFAULT_TARGETS))
    expected = 16 * text.num_hidden_layers * (a_width + b_width) * 2
    assert layout.slot_bytes(16, torch.bfloat16) == expected
    store = LoraStore(layout, 3, 16, torch.bfloat16, torch.device("cpu"))
    assert store.a.nbytes + store.b.nbytes == 4 * expected  # three slots and the all-zero one


def test_fitted_rows_take_half_of_the_free_memory() -> None:
    mb = 1 << 20
    assert rows_that_fit(3000 * mb, 94 * mb, CPU_BATCH_SIZE) == int(KV_MEMORY_SHARE * 3000 / 94)  # a small machine
    assert rows_that_fit(24_000 * mb, 94 * mb, CPU_BATCH_SIZE) == CPU_BATCH_SIZE
    assert rows_that_fit(10 * mb, 94 * mb, CPU_BATCH_SIZE) == 1  # never none: the cache's own check says why


def test_fitted_slots_take_a_quarter_of_the_free_memory() -> None:
    mb = 1 << 20
    assert slots_that_fit(1000 * mb, 84 * mb, 64) == 1  # 250 MB: two slots of 84, one of them the zero slot
    assert slots_that_fit(10_000 * mb, 84 * mb, 64) == int(SLOT_MEMORY_SHARE * 10_000 / 84) - 1
    assert slots_that_fit(134_000 * mb, 84 * mb, 64) == 64  # the CPU tier's places
    assert slots_that_fit(134_000 * mb, 336 * mb, 1000) == int(SLOT_MEMORY_SHARE * 134_000 / 336) - 1
    assert slots_that_fit(10 * mb, 84 * mb, 64) == 1  # never none


@pytest.mark.gpu
def test_adapter_slots_are_fitted_to_the_gpu_where_not_set() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()  # a tiny model: the CPU tier's places bind
    most = Settings().max_cpu_adapters
    assert EngineConfig.for_model(Settings(), model).max_active_adapters == most
    assert EngineConfig.for_model(Settings(max_cpu_adapters=16), model).max_active_adapters == 16


def test_a_rank_whose_slot_rows_pass_32_bit_offsets_is_refused_before_anything_is_allocated() -> None:
    """Llama-3-70B's seven projections over 80 layers: 6.7M B columns, so a slot of rank 320 would span 2**31
    elements, which the kernels' 32-bit row offsets and slot strides cannot address (an illegal memory access)."""
    layers, hidden, kv, intermediate = 80, 8192, 1024, 28672
    layout = LoraLayout({}, {}, layers * (6 * hidden + intermediate), layers * (3 * hidden + 2 * kv + 2 * intermediate))
    assert layout.max_rank() == 319
    meta = torch.device("meta")  # nothing allocated, whatever the size
    assert LoraStore(layout, 4, 319, torch.bfloat16, meta).a.shape == (5, 319, layout.a_width)
    with pytest.raises(LoraRankTooLarge, match="set --max-lora-rank to at most 319"):
        LoraStore(layout, 4, 320, torch.bfloat16, meta)
