"""Adapter mixing per request, as LoRAX's `merged_adapters` with merge_strategy "linear": the mix is the
weighted sum of the adapters' deltas, sum_j w_j s_j B_j A_j, which is exactly ONE LoRA of rank sum_j r_j:
A stacked [sum r, in], B stacked [out, sum r] with each adapter's weight and scaling folded into its columns
(PEFT's add_weighted_adapter "cat"; PEFT's "linear" combines A and B separately, which is not the sum of the
deltas). The base model is never touched: the derived adapter goes into a device slot like any other, so a
mixed request runs in the same batch as the rest.

Derived adapters are keyed by their components' resolved versions and weights, built off the event loop, and
kept in a small LRU (each is as large as its components together); one dropped from it frees its slot."""

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters.lora import LoraModule, LoraWeights
from loraplex.errors import LoraplexError

MAX_MIX_ADAPTERS = 8
MAX_MIX_WEIGHT = 100.0  # |weight|: beyond it a delta swamps the base model's output anyway
MAX_CACHED_MIXES = 8
MIX_PREFIX = "mix:"  # engine keys of derived adapters: never a stored name (which has no ":")


class InvalidMix(LoraplexError):
    http_status = 422
    code = "invalid_adapter_mix"


@dataclass(frozen=True)
class AdapterMix:
    """A request's mix: adapter refs (`name` or `name@N`) and their weights, as the client sent them."""

    refs: tuple[str, ...]
    weights: tuple[float, ...]


def mix_key(keys: list[str], weights: tuple[float, ...]) -> str:
    """Deterministic, from resolved versions: `mix:a@1*0.5+b@2*0.5` (the same mix, the same slot)."""
    return MIX_PREFIX + "+".join(f"{key}*{weight!r}" for key, weight in zip(keys, weights, strict=True))


def mix_lora(components: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """One LoRA equal to sum_j w_j * delta_j, module by module (a module only some adapters target takes only
    theirs). Scaling 1: each adapter's scaling is folded into its B columns."""
    names = list(dict.fromkeys(name for lora, _ in components for name in lora.modules))
    modules = {}
    for name in names:
        parts = [(lora.modules[name], w) for lora, w in components if name in lora.modules]
        a = torch.cat([m.a.float() for m, _ in parts], dim=0)  # [sum r, in]
        b = torch.cat([m.b.float() * (w * m.scaling) for m, w in parts], dim=1)  # [out, sum r]
        modules[name] = LoraModule(a, b, 1.0)
    return LoraWeights(modules)


class MixCache:
    """Derived adapters by key, least recently used first out; `on_drop(key)` frees the device slot of one that
    leaves. `prepare` turns a built mix into what the engine activates (its packed form)."""

    def __init__(
        self,
        max_lora_rank: int,
        prepare: Callable[[LoraWeights], LoraWeights],
        on_drop: Callable[[str], None],
        capacity: int = MAX_CACHED_MIXES,
    ) -> None:
        self.max_lora_rank = max_lora_rank
        self._prepare = prepare
        self._on_drop = on_drop
        self._capacity = capacity
        self._mixes: OrderedDict[str, LoraWeights] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: str, components: list[tuple[str, LoraWeights, float]]) -> LoraWeights:
        """The mix of (resolved key, weights, mix weight) components, built in a worker thread on a miss."""
        with self._lock:
            if key in self._mixes:
                self._mixes.move_to_end(key)
                return self._mixes[key]
        self._check_rank(components)
        mixed = await asyncio.to_thread(lambda: self._prepare(mix_lora([(lora, w) for _, lora, w in components])))
        with self._lock:
            mixed = self._mixes.setdefault(key, mixed)  # a concurrent build of the same key: keep the first
            self._mixes.move_to_end(key)
            dropped = [self._mixes.popitem(last=False)[0] for _ in range(len(self._mixes) - self._capacity)]
        for old in dropped:
            self._on_drop(old)
        return mixed

    def _check_rank(self, components: list[tuple[str, LoraWeights, float]]) -> None:
        ranks: dict[str, int] = {}
        for _, lora, _ in components:
            for name, module in lora.modules.items():
                ranks[name] = ranks.get(name, 0) + module.rank
        rank = max(ranks.values(), default=0)
        if rank > self.max_lora_rank:
            described = ", ".join(f"{key} (rank {lora.rank})" for key, lora, _ in components)
            raise InvalidMix(
                f"the mix of {described} has rank {rank}, over max_lora_rank {self.max_lora_rank}: "
                "mix fewer or lower-rank adapters, or start the server with a larger --max-lora-rank"
            )
