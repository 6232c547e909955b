"""Real PEFT adapter directories on the tiny models, and the store limits the tests serve them under."""

import functools
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
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


def variants(src: Path, dest: Path, count: int, first: int = 0) -> list[Path]:
    """`count` PEFT directories of distinct content (one lora_B value of `src` nudged apart; calls with a `first`
    past the previous call's variants make others): many versions of one adapter, milliseconds each to make and
    to store."""
    state = load_file(src / "adapter_model.safetensors")
    key = min(k for k in state if "lora_B" in k)
    made = []
    for i in range(first, first + count):
        path = dest / f"variant-{i}"
        path.mkdir(parents=True)
        shutil.copyfile(src / "adapter_config.json", path / "adapter_config.json")
        nudged = state[key].clone()
        nudged.view(-1)[0] += (i + 1) * 1e-3
        save_file({**state, key: nudged}, path / "adapter_model.safetensors")
        made.append(path)
    return made
