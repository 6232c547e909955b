"""The decode step's LoRA kernels at Llama-3-8B shapes, each row its own adapter (rank 16 on the 7 projections): a
step's 32 layers of each kind of launch, captured in a CUDA graph, timed alone, and the bytes of adapter weights
they read against the time (the A and B rows of each row's slot: every row a different adapter, so none is read
twice).

    python3 bench/lora_kernels.py --rows 1,16,32,64 --out lora.json

norm_shrink: the two RMSNorms with the shrinks of q/k/v and gate/up; o_shrink: o_proj's shrink; act_shrink: the
gated activation with down_proj's shrink; expand: the four finishing launches (the fp32 sums cast, the expand,
o_proj's and down_proj's residual). --tiny runs tiny shapes on the CPU (Triton's interpreter: a smoke test).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from bench.nf4_kernel import graph_us
from server.engine.kernels.activation import silu_mul_shrink
from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.lora import finish_projection, lora_shrink
from server.engine.kernels.rmsnorm import FusedRMSNorm

RANK = 16
SHAPE_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "kv": 1024}
SHAPE_TINY = {"layers": 2, "hidden": 64, "intermediate": 128, "kv": 16}


def setting(tiny: bool) -> tuple[torch.device, torch.dtype, dict]:
    """(device, dtype, shapes) of a run: tiny shapes in fp32 on the CPU (a smoke test), or 8B's in bf16 on CUDA."""
    if tiny:
        return torch.device("cpu"), torch.float32, SHAPE_TINY
    return torch.device("cuda"), torch.bfloat16, SHAPE_8B


class Layer:
    """One decoder layer's LoRA slot stores ([slots, rank, columns], as the engine's: A columns of the layers
    sharing an input side by side, B columns likewise) and its norm."""

    def __init__(self, shape: dict[str, int], slots: int, device: torch.device, dtype: torch.dtype) -> None:
        h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]

        def store(columns: int) -> torch.Tensor:
            return torch.randn(slots, RANK, columns, device=device, dtype=dtype) * 0.01

        self.norm = FusedRMSNorm(LlamaRMSNorm(h).to(device, dtype))
        self.a = {"qkv": store(3 * h), "gu": store(2 * h), "o": store(h), "d": store(i)}
        self.b = {"qkv": store(h + 2 * kv), "gu": store(2 * i), "o": store(h), "d": store(h)}


def measure(layers: list[Layer], shape: dict[str, int], rows: int, device: torch.device) -> dict[str, float]:
    """ms a step of each kind of launch, and the adapter bytes each reads, at `rows` rows of distinct adapters."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    dtype = layers[0].a["o"].dtype
    slots = torch.randperm(layers[0].a["o"].shape[0] - 1, device=device)[:rows] + 1  # slot 0: no adapter
    ranks = torch.full((rows,), RANK, dtype=torch.int32, device=device)
    x = torch.randn(rows, h, device=device, dtype=dtype)
    gate_up = torch.randn(rows, 2 * i, device=device, dtype=dtype)
    widths = {"qkv": [h, kv, kv], "gu": [i, i], "o": None, "d": None}
    sums = {name: torch.randn(rows, sum(w or [h]), device=device) for name, w in widths.items()}  # fp32
    outs = {name: torch.empty_like(s, dtype=dtype) for name, s in sums.items()}
    partials: dict[tuple[int, str], tuple[torch.Tensor, int]] = {}

    def norm_shrinks() -> None:
        for n, layer in enumerate(layers):
            partials[n, "qkv"] = layer.norm.forward_and_shrink(x, layer.a["qkv"], slots, ranks, 3)[1]
            partials[n, "gu"] = layer.norm.forward_and_shrink(x, layer.a["gu"], slots, ranks, 2)[1]

    def o_shrinks() -> None:
        for n, layer in enumerate(layers):
            partials[n, "o"] = lora_shrink(x, layer.a["o"], slots, ranks)

    def act_shrinks() -> None:
        for n, layer in enumerate(layers):
            partials[n, "d"] = silu_mul_shrink(gate_up[:, :i], gate_up[:, i:], layer.a["d"], slots, ranks)[1]

    def expands() -> None:
        for n, layer in enumerate(layers):
            for name, w in widths.items():
                partial, chunks = partials[n, name]
                lora = LoraEpilogue(partial if w else partial[0], chunks, layer.b[name], slots, ranks)
                finish_projection(outs[name], sums[name], lora, x if name in ("o", "d") else None, widths=w)

    def adapter_bytes(stores: list[str], side: str) -> int:
        per_row = sum(getattr(layers[0], side)[name][0].numel() for name in stores) * dtype.itemsize
        return rows * per_row * len(layers)

    results = {}
    for kind, fn, read in [
        ("norm_shrink", norm_shrinks, adapter_bytes(["qkv", "gu"], "a")),
        ("o_shrink", o_shrinks, adapter_bytes(["o"], "a")),
        ("act_shrink", act_shrinks, adapter_bytes(["d"], "a")),
        ("expand", expands, adapter_bytes(list(widths), "b")),
    ]:
        if device.type == "cuda":
            ms = graph_us(fn, calls=1) / 1000
        else:  # the interpreter: once, untimed
            fn()
            ms = 0.0
        results[f"{kind}_ms"] = ms
        results[f"{kind}_adapter_gb_s"] = read / ms / 1e6 if ms else 0.0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rows", default="1,16,32,64", help="rows of the steps measured, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    device, dtype, shape = setting(args.tiny)
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    layers = [Layer(shape, max(rows_list) + 1, device, dtype) for _ in range(shape["layers"])]
    results = {}
    for rows in rows_list:
        results[rows] = measure(layers, shape, rows, device)
        print(f"{rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in results[rows].items()), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps({"device": name, **{str(r): v for r, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
