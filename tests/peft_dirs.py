"""Real PEFT adapter directories on the tiny models, and the store limits the tests serve them under."""

import functools
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from adapters.fingerprint import BaseFingerprint, base_fingerprint
from adapters.localstore import LocalBackend
from adapters.store import AdapterStore
from adapters.validate import AdapterLimits

LIMITS = AdapterLimits(max_rank=16, max_bytes=1 << 20)


@functools.cache
def fingerprint(family: str = "llama") -> BaseFingerprint:
    return base_fingerprint(tiny_model(family))


def make_peft_dir(path: Path, seed: int = 0, family: str = "llama", **lora: object) -> Path:
    """save_pretrained() of a LoRA on a tiny model; lora_B is randomised so that seeds give distinct content."""
    lora.setdefault("r", 4)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(tiny_model(family), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return path


def new_store(root: Path, limits: AdapterLimits = LIMITS) -> AdapterStore:
    return AdapterStore(LocalBackend(root), fingerprint(), limits)
