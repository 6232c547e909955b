"""The in-memory form of a LoRA adapter: per module, A, B and the scaling PEFT would apply.

This is what the server keeps in its CPU tier and copies into device slots, and what training's output
is checked against. Parsing follows PEFT's key layout and its `rank_pattern` / `alpha_pattern` rules.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PEFT_PREFIX = "base_model.model."
# matched whole (fullmatch): a `$` also matches before a final newline, and "...lora_B.weight\n", a key PEFT drops
# (leaving that lora_B at zero), was served as the module's lora_B
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight")


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    modules: dict[str, LoraModule]  # full module name in the base model, e.g. "model.layers.0.mlp.up_proj"

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    r"""PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the module's name or a dotted
    suffix of it, as PEFT reads keys: as regexes, `re.match(rf"(.*\.)?({key})$", module)`. Uploads may only hold
    keys of name characters and dots (see adapters.validate), in which the one character a regex reads otherwise
    is '.', any character: 'q.proj' names q_proj (read literally it named nothing, and the module was served at
    lora_alpha / r where PEFT applies the key's value). So keys are compared a character at a time, with no
    pattern from a client evaluated."""
    for key, value in patterns.items():
        if _key_names(key, module):
            return value
    return default


def _key_names(key: str, module: str) -> bool:
    start = len(module) - len(key)  # the key spans the name's end: it has no repetition
    if start < 0 or (start > 0 and module[start - 1] != "."):
        return False
    return all(k in (".", m) for k, m in zip(key, module[start:], strict=True))


def module_scaling(config: Mapping, module: str, rank: int) -> float:
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def split_peft_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0...q_proj', 'A')."""
    name = key.removeprefix(PEFT_PREFIX)
    match = _KEY.fullmatch(name)
    return (match["module"], match["which"]) if match else None


def lora_weights_from_state(state: Mapping[str, torch.Tensor], config: Mapping) -> LoraWeights:
    """Pair PEFT's lora_A / lora_B tensors per module. Raises ValueError on unpaired or unknown keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parsed = split_peft_key(key)
        if parsed is None:
            raise ValueError(f"unexpected tensor {key!r}: only lora_A / lora_B weights are supported")
        module, which = parsed
        # two keys naming one weight (with and without PEFT's prefix, or a ".default" adapter name) would leave it to
        # the file's order which is served, where PEFT loads one of them by its own rules
        if which in (pair := pairs.setdefault(module, {})):
            raise ValueError(f"tensor {key!r} is lora_{which} of module {module!r} again: keep one key for it")
        pair[which] = tensor
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a LoRA pair"
            )
        if a.shape[0] == 0:  # its scaling would divide by zero
            raise ValueError(f"module {module!r} has rank 0 (lora_A {tuple(a.shape)}): drop it, or give it a rank")
        modules[module] = LoraModule(a, b, module_scaling(config, module, a.shape[0]))
    if not modules:
        raise ValueError("the adapter holds no LoRA weights")
    return LoraWeights(modules)
