"""The NF4 GEMV against bitsandbytes' on Llama-3-8B projection shapes, one decode row (CUDA).

python bench/nf4_kernel.py --out nf4.json            # the launcher's configurations
python bench/nf4_kernel.py --sweep 60 --out nf4.json  # also search configurations for up to 60 s per shape

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

from server.engine.kernels.nf4 import nf4_gemv, pick_config

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


def candidates(k: int) -> list[tuple[int, int, int]]:
    blocks = k // 64
    found = [
        (block_n, per_iteration, warps)
        for block_n, per_iteration, warps in itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8, 16), (1, 2, 4, 8))
        if blocks % per_iteration == 0 and block_n * per_iteration * 8 >= 32 * warps  # a word per thread at least
    ]
    random.Random(0).shuffle(found)  # a time-boxed search then samples the whole space
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", type=float, default=0.0, help="seconds to search configurations, per shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(0), "shapes": {}}
    for name, ((n, k), count) in SHAPES.items():
        layer = Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")  # double quant
        layer = layer.to(torch.bfloat16).cuda()  # quantizes
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        weight, state = layer.weight, layer.weight.quant_state
        expected = layer(x)[0].float()
        got = nf4_gemv(x[0], weight, state).float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        bnb_us = graph_us(lambda: layer(x))  # noqa: B023
        fused_us = graph_us(lambda: nf4_gemv(x[0], weight, state))  # noqa: B023
        best, best_us = pick_config(n, k), fused_us
        deadline = time.monotonic() + args.sweep
        for config in candidates(k):
            if time.monotonic() > deadline:
                break
            us = graph_us(lambda: nf4_gemv(x[0], weight, state, None, None, config), calls=10, replays=5)  # noqa: B023
            if us < best_us:
                best, best_us = config, us
        gbs = (n * k / 2 + n * k / 64) / (best_us * 1e-6) / 1e9
        results["shapes"][name] = {"bnb_us": bnb_us, "fused_us": fused_us, "best_us": best_us, "best_config": best,
                                   "best_gb_s": gbs, "rel_error": error, "per_layer": count}  # fmt: skip
        print(f"{name:18s} bnb {bnb_us:7.1f} us  fused {fused_us:7.1f} us  best {best_us:7.1f} us "
              f"{best} {gbs:6.0f} GB/s  err {error:.1e}", flush=True)  # fmt: skip
    shapes = results["shapes"]
    for key in ("bnb_us", "fused_us", "best_us"):
        results[f"step_ms_{key[:-3]}"] = LAYERS * sum(s[key] * s["per_layer"] for s in shapes.values()) / 1000
    print(f"linear layers per decode step: bnb {results['step_ms_bnb']:.2f} ms, fused "
          f"{results['step_ms_fused']:.2f} ms, best found {results['step_ms_best']:.2f} ms", flush=True)  # fmt: skip
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
