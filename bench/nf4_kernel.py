"""The fused NF4 matmul against bitsandbytes on Llama-3-8B projection shapes, per decode batch size (CUDA).

python bench/nf4_kernel.py --out nf4.json            # the launcher's configurations
python bench/nf4_kernel.py --sweep 120 --out nf4.json  # also search block sizes / split-K for up to 120 s

Each time is one call inside a CUDA graph (as in the engine's decode step), averaged over 20 replays.
"""

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
from bitsandbytes.nn import Linear4bit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine.kernels.nf4 import nf4_matmul, pick_config

# (out, in) of each projection of a Llama-3-8B layer, and how many of that shape one layer has
SHAPES = {"q_proj/o_proj": ((4096, 4096), 2), "k_proj/v_proj": ((1024, 4096), 2),
          "gate_proj/up_proj": ((14336, 4096), 2), "down_proj": ((4096, 14336), 1)}  # fmt: skip
LAYERS = 32


def graph_us(fn, calls: int = 20, replays: int = 20) -> float:
    """Microseconds per call of `fn`, captured `calls` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (calls * replays)


def candidates(m: int, n: int, k: int, sms: int) -> list[tuple[int, int, int, int, int]]:
    block_m = pick_config(m, n, k, sms)[0]
    found = []
    for block_n, split, warps, stages in itertools.product((32, 64, 128, 256), (1, 2, 4, 8, 16), (4, 8), (2, 3, 4)):
        if (k // 64) % split == 0 and (block_m == 1 or block_n <= 128):
            found.append((block_m, block_n, split, warps, stages))
    random.Random(0).shuffle(found)  # a time-boxed search then samples the whole space
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="1,8,16,32,64", help="decode batch sizes")
    parser.add_argument("--sweep", type=float, default=0.0, help="seconds to search configurations, per batch size")
    args = parser.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    layers = {}
    for name, ((n, k), _) in SHAPES.items():
        layer = Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")  # double quant
        layers[name] = layer.to(torch.bfloat16).cuda()  # quantizes
    results = {"device": torch.cuda.get_device_name(0), "rows": {}}
    for m in (int(r) for r in args.rows.split(",")):
        row = {}
        for name, ((n, k), count) in SHAPES.items():
            layer = layers[name]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            weight, state = layer.weight, layer.weight.quant_state
            expected = layer(x).float()
            got = nf4_matmul(x, weight, state).float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            bnb_us = graph_us(lambda: layer(x))  # noqa: B023
            fused_us = graph_us(lambda: nf4_matmul(x, weight, state))  # noqa: B023
            best, best_us = pick_config(m, n, k, sms), fused_us
            deadline = time.monotonic() + args.sweep / len(SHAPES)
            for config in candidates(m, n, k, sms):
                if time.monotonic() > deadline:
                    break
                us = graph_us(lambda: nf4_matmul(x, weight, state, None, config), calls=10, replays=5)  # noqa: B023
                if us < best_us:
                    best, best_us = config, us
            gbs = (n * k / 2 + n * k / 64) / (best_us * 1e-6) / 1e9
            row[name] = {"bnb_us": bnb_us, "fused_us": fused_us, "best_us": best_us, "best_config": best,
                         "best_gb_s": gbs, "rel_error": error, "per_layer": count}  # fmt: skip
            print(f"M={m:3d} {name:18s} bnb {bnb_us:7.1f} us  fused {fused_us:7.1f} us  best {best_us:7.1f} us "
                  f"{best} {gbs:6.0f} GB/s  err {error:.1e}", flush=True)  # fmt: skip
        for key in ("bnb_us", "fused_us", "best_us"):
            row[f"step_ms_{key[:-3]}"] = LAYERS * sum(row[s][key] * row[s]["per_layer"] for s in SHAPES) / 1000
        print(f"M={m:3d} linear layers per decode step: bnb {row['step_ms_bnb']:.2f} ms, fused "
              f"{row['step_ms_fused']:.2f} ms, best found {row['step_ms_best']:.2f} ms", flush=True)  # fmt: skip
        results["rows"][m] = row
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
