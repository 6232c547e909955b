"""The LoRA delta of a wide step (one carrying prompt chunks, past the per-row kernels' 256 tokens) at Llama-3-8B
shapes: the seven projections of 32 layers, captured in a CUDA graph as the engine captures such steps, through the
engine's own multi-LoRA layers (their base output left out), for the two forms a captured step can take:

- dense: every token times every slot's A and B, its own slot's columns kept (the form without the kernels);
- segmented: each tile of tokens sharing a slot times that slot's A and B (segmented_lora, what the kernels run).

A step's tokens: prompt runs of --run tokens, each its own adapter, then --decode decode tokens of distinct
adapters, in slot order as the engine lays them out; --slots adapter slots of rank --rank.

    python3 bench/segmented_lora.py --tokens 512,1024 --decode 0,64,256 --slots 16,64 --out segmented.json

--tiny runs tiny shapes on the CPU (Triton's interpreter: a smoke test, untimed).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from bench.lora_kernels import setting
from bench.nf4_kernel import graph_us
from server.engine import multilora
from server.engine.kernels import FusedDecode
from server.engine.multilora import LoraContext, LoraLayout, LoraStore, MultiLoraLinear, ShrinkGroup


class Preset(nn.Module):
    """A base layer whose output is a tensor made once: the step's time is its LoRA delta's alone."""

    def __init__(self, tokens: int, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out = torch.zeros(1, tokens, out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def projections(shape: dict[str, int]) -> list[tuple[str, int, int]]:
    """(name, in, out) of a decoder layer's seven projections."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h), ("gate_proj", h, i),
            ("up_proj", h, i), ("down_proj", i, h)]  # fmt: skip


def step_slots(tokens: int, decode: int, run: int, slots: int) -> torch.Tensor:
    """[tokens] each token's slot: prompt runs of `run` tokens, then `decode` one-token rows, cycling over the
    slots, in slot order (as the engine lays a step out)."""
    prompt = tokens - decode
    owners = itertools.cycle(range(slots))
    runs = [next(owners) for _ in range(-(-prompt // run))]
    per_token = [slot for slot in runs for _ in range(run)][:prompt] + [next(owners) for _ in range(decode)]
    return torch.tensor(sorted(per_token))


def measure(shape: dict[str, int], tokens: int, decode: int, run: int, slots: int, rank: int,
            device: torch.device, dtype: torch.dtype) -> dict[str, float]:  # fmt: skip
    """ms a step's LoRA deltas take, dense and segmented."""
    context = LoraContext(slots, rank)
    names = projections(shape)
    bases = {name: Preset(tokens, d_in, d_out, device, dtype) for name, d_in, d_out in names}
    layout = LoraLayout.of(list(bases.items()))
    layers: list[tuple[MultiLoraLinear, int]] = []  # (a layer, its input's width)
    for _ in range(shape["layers"]):
        store = LoraStore(layout, slots, rank, dtype, device)
        store.a[:slots].normal_(std=0.01)
        store.b[:slots].normal_(std=0.01)
        store.ranks[:slots] = rank
        context.slot_ranks = store.ranks  # every layer's store has the same ranks
        for name, d_in, d_out in names:
            a, b = store.views(name, d_in, d_out)
            group = ShrinkGroup(a, b, [bases[name]])
            layers.append((MultiLoraLinear(bases[name], d_in, d_out, a, b, context, group, 0), d_in))
    token_slots = step_slots(tokens, decode, run, slots).to(device)
    inputs = {d_in: torch.randn(1, tokens, d_in, device=device, dtype=dtype) for _, d_in, _ in names}

    def step() -> None:
        context.set(token_slots, None)  # as a captured step: no runs from the host
        for layer, d_in in layers:
            layer(inputs[d_in])

    results = {}
    for form, kernels in (("dense", None), ("segmented", FusedDecode())):
        context.decode_kernels = kernels
        if device.type == "cuda":
            results[f"{form}_ms"] = graph_us(step, calls=1) / 1000
        else:  # the interpreter: once, untimed
            step()
            results[f"{form}_ms"] = 0.0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--tokens", default="512,1024", help="tokens of the steps measured, comma-separated")
    parser.add_argument("--decode", default="0,64,256", help="decode tokens among them, comma-separated")
    parser.add_argument("--slots", default="16,64", help="adapter slots, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--run", type=int, default=256, help="tokens of a prompt chunk")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    device, dtype, shape = setting(args.tiny)
    multilora.KERNEL_TOKENS = 0  # every step here is past the per-row kernels, whatever its width
    torch.manual_seed(0)
    results = []
    grid = [[int(v) for v in values.split(",")] for values in (args.tokens, args.decode, args.slots)]
    for tokens, decode, slots in itertools.product(*grid):
        if decode > tokens:
            continue
        found = measure(shape, tokens, decode, args.run, slots, args.rank, device, dtype)
        results.append({"tokens": tokens, "decode": decode, "slots": slots, "rank": args.rank, **found})
        print(f"{tokens} tokens ({decode} decode), {slots} slots: "
              + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps({"device": name, "results": results}, indent=2))


if __name__ == "__main__":
    main()
