"""`random:` base models: configs from presets or files, NF4 exactly where load_base_model puts it."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.fingerprint import base_fingerprint
from loraplex.basemodel import load_base_model
from loraplex.errors import BaseModelError
from loraplex.synthetic import BYTE_VOCAB, byte_tokenizer, check_synthetic, synthetic_config


def test_llama3_8b_preset_has_the_published_shapes() -> None:
    config = synthetic_config("random:llama3-8b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)


def test_config_from_a_file_or_its_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1})
    )
    assert synthetic_config(f"random:{tmp_path}").model_type == "qwen2"
    assert check_synthetic(f"random:{tmp_path / 'config.json'}") == (
        f"random:{tmp_path}/config.json",
        f"random-{tmp_path.name}",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random:nope", "neither a preset"),
        ("random:{tmp}/vit.json", "not a causal language model"),
        ("random:{tmp}/small.json", "below the"),
    ],
)
def test_bad_specs_fail_with_a_reason(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "vit.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "small.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    with pytest.raises(BaseModelError, match=message):
        synthetic_config(spec.format(tmp=tmp_path))


def test_nf4_layout_matches_a_loaded_checkpoint(tmp_path: Path) -> None:
    """Same modules quantized, same fingerprint: adapters made for the real model fit the random one."""
    synthetic = load_base_model("random:tiny", cache_dir=tmp_path, device="cpu")
    model, tokenizer = synthetic.model, synthetic.tokenizer
    AutoModelForCausalLM.from_config(synthetic_config("random:tiny")).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path), cache_dir=tmp_path, device="cpu")
    assert base_fingerprint(model) == base_fingerprint(loaded.model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds == {n: type(m).__name__ for n, m in loaded.model.named_modules()}
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    ids = tokenizer("hi", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_byte_tokenizer_one_token_per_byte_and_visible_fillers() -> None:
    tokenizer = byte_tokenizer(BYTE_VOCAB + 10)
    assert len(tokenizer("héllo", add_special_tokens=False).input_ids) == len("héllo".encode())
    assert tokenizer.decode([BYTE_VOCAB + 3]) == f" w{BYTE_VOCAB + 3}"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
