"""Tiny random decoder models and a byte-level tokenizer, built on the fly so most tests run in milliseconds."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# every byte is one token (ids 3..258), plus pad/bos/eos (0, 1, 2) and a chat template
from loraplex.synthetic import PRESETS, byte_tokenizer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def tiny_config(family: str = "llama", **overrides):
    """The `random:tiny` shapes (hidden 64, 2 layers, byte vocabulary) in any supported family."""
    kwargs = {key: value for key, value in PRESETS["tiny"].items() if key != "model_type"}
    kwargs.update(max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():  # random init is tiny; scale up so different inputs give different argmaxes
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_tiny(path: Path, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny model and its tokenizer as a local model directory (what users pass as --base-model)."""
    tiny_model(family, seed, dtype).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
