"""The engine's limits completed for a model: context length, and a batch size sized to the device."""

import torch
from tiny import tiny_model

from loraplex.settings import Settings
from server.engine.attention import kv_row_bytes
from server.engine.config import CPU_BATCH_SIZE, EngineConfig


def test_settings_are_completed_for_the_model() -> None:
    model = tiny_model("llama")
    context = model.config.max_position_embeddings
    config = EngineConfig.for_model(Settings(max_seq_len=context * 4), model)
    assert config.max_seq_len == context  # never beyond what the model was trained for
    assert config.max_batch_size == CPU_BATCH_SIZE  # not set: a CPU gets the fixed default
    assert EngineConfig.for_model(Settings(max_batch_size=3), model).max_batch_size == 3


def test_a_kv_row_counts_every_layer_k_and_v() -> None:
    text = tiny_model("llama").config
    head_dim = text.hidden_size // text.num_attention_heads
    expected = 2 * text.num_hidden_layers * text.num_key_value_heads * 100 * head_dim * 2
    assert kv_row_bytes(text, 100, torch.bfloat16) == expected
