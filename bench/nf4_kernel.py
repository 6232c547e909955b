"""The NF4 kernels against bitsandbytes on Llama-3-8B projection shapes (CUDA): the Triton GEMV for one row, the
Triton tensor-core matmul for more ("fused", its configuration searched with --sweep), nf4_mma ("mma") and, up to
64 rows, nf4_wide ("wide", its configuration searched with --sweep too).

python bench/nf4_kernel.py --out nf4.json                       # 1 and 32 rows, the launchers' configurations
python bench/nf4_kernel.py --rows 8,16,32,64 --sweep 60 --out nf4.json  # also search configurations, 60 s each
python bench/nf4_kernel.py --rows 64 --shapes down_proj --sweep 120 --out nf4.json  # one shape (no step total)
python bench/nf4_kernel.py --rows 1,16,32,64 --shapes all --out nf4.json  # the engine's launches: bandwidth share
python bench/nf4_kernel.py --rows 1,16 --shapes all --mma-sweep 30 --out nf4.json  # also search nf4_mma's configs
python bench/nf4_kernel.py --rows 1,8,16 --shapes none --step --out nf4.json  # a whole step's launches in order

Each time is one call inside a CUDA graph (as in the engine's decode step), averaged over replays of a graph
that runs the projection over enough copies of the weight (200 MB at least) that they come from memory, not
from the 50 MB L2 cache, as in a decode step.

--step times the engine's nf4_mma launches of a whole decode step in the engine's order instead (32 layers of q/k/v,
o, gate/up, down, each layer its own weights), in one graph: once as the engine launches them, each asking L2 for
the next launch's first bytes as its copies end, and once without that.
"""

import argparse
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bitsandbytes.functional import quantize_4bit
from bitsandbytes.nn import Linear4bit
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine.kernels.nf4 import nf4_gemv, nf4_matmul, pick_config, pick_matmul_config
from server.engine.kernels.nf4_mma import Nf4Segments, Part, nf4_mma, nf4_mma_segments
from server.engine.kernels.nf4_wide import WIDE_ROWS, mma_rows, nf4_wide_sums

# (out, in) of each projection of a Llama-3-8B layer, and how many of that shape one layer has
SHAPES = {"q_proj/o_proj": ((4096, 4096), 2), "k_proj/v_proj": ((1024, 4096), 2),
          "gate_proj/up_proj": ((14336, 4096), 2), "down_proj": ((4096, 14336), 1)}  # fmt: skip
# The weights one launch projects together in the engine (q/k/v, gate/up): not part of the single shapes' totals
GROUPS = {"qkv_proj": ((6144, 4096), 1), "gate_up_proj": ((28672, 4096), 1)}
# The engine's four launches a layer: (shape, launches of it)
ENGINE = {"qkv_proj": 1, "q_proj/o_proj": 1, "gate_up_proj": 1, "down_proj": 1}
LAYERS = 32
STREAMED_BYTES = 200e6


def nf4_bytes(n: int, k: int) -> float:
    """What an NF4 weight [n, k] streams: its 4-bit codes and a uint8 absmax a block of 64."""
    return n * k / 2 + n * k / 64


def read_gb_s() -> float:
    """The device's measured read bandwidth (GB a second: torch's sum over 2 GiB): the reference for a share, as the
    NF4 kernels read far more than they write."""
    source = torch.ones(1 << 29, dtype=torch.float32, device="cuda")
    return 4 * source.numel() / (graph_us(lambda: source.sum(), 1) * 1e-6) / 1e9


def graph_us(fn: Callable[[], None], calls: int, replays: int = 10) -> float:
    """Microseconds per call of `fn`, one call per weight copy: `calls` of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
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


def candidates(n: int, k: int, rows: int) -> list[tuple]:
    """Configurations to search: the GEMV's (BLOCK_N, BLOCKS, warps) for one row, else the matmul's."""
    if rows == 1:
        found = [
            (block_n, per_iteration, warps)
            for block_n, per_iteration, warps in itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8, 16), (1, 2, 4, 8))
            if (k // 64) % per_iteration == 0 and block_n * per_iteration * 8 >= 32 * warps  # a word per thread
        ]
    else:
        found = [
            (block_n, block_k, split_k, warps, stages)
            for block_n, block_k, split_k, warps, stages in itertools.product(
                (32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16), (4, 8), (1, 2, 3)
            )
            if k % (block_k * split_k) == 0 and 100 <= n // block_n * split_k <= 4000  # the SMs busy, not swamped
        ]
    random.Random(0).shuffle(found)  # a time-boxed search then samples the whole space
    return found


def mma_candidates() -> list[tuple]:
    """nf4_mma's (row tiles a CTA, warps, blocks a group, groups staged, CTAs an SM, table entry bytes) to search."""
    found = list(itertools.product((1, 2), (4, 8), (4,), (2, 3), (1, 2), (128, 256)))
    random.Random(0).shuffle(found)
    return found


def wide_candidates() -> list[tuple]:
    """nf4_wide's (warps, row tiles a warp, blocks a step, steps in flight, CTAs an SM) and parts of K to search."""
    found = list(itertools.product((4, 8, 16), (1, 2), (1, 2, 4), (2, 3, 4, 6), (1, 2), (None, 1, 2, 4, 8, 16)))
    random.Random(0).shuffle(found)
    return found


def kernel(x: torch.Tensor, layer: Linear4bit, config: tuple | None) -> torch.Tensor:
    """The Triton kernels (the launchers' configuration where `config` is None)."""
    state = layer.weight.quant_state
    if x.shape[0] == 1:
        return nf4_gemv(x[0], layer.weight, state, None, None, config)[None]
    n, k = state.shape
    return nf4_matmul(x, layer.weight, state, None, config or pick_matmul_config(n, k, x.shape[0], on_cuda=True))


def wide(x: torch.Tensor, layer: Linear4bit, config: tuple | None = None) -> torch.Tensor:
    """nf4_wide's sums: config (the kernel's, then the parts of K) or the launcher's where None."""
    kernel_config, split = (config[:5], config[5]) if config else (None, None)
    return nf4_wide_sums(x, [(layer.weight, layer.weight.quant_state, None)], kernel_config, split)


def mma(x: torch.Tensor, layer: Linear4bit, config: tuple | None = None) -> torch.Tensor:
    return nf4_mma(x, layer.weight, layer.weight.quant_state, config=config)


def engine_step(rows: int, measured: dict, read: float) -> dict:
    """The engine's NF4 launches of a step (32 layers of ENGINE) with the kernel it picks at `rows` (nf4_mma up to
    mma_rows, nf4_wide above): its time, and its bytes a second as a share of the read bandwidth."""
    kernel = "mma" if rows <= mma_rows(0) else "wide"
    ms = LAYERS * sum(measured[name][f"{kernel}_us"] * launches for name, launches in ENGINE.items()) / 1000
    streamed = LAYERS * sum(nf4_bytes(*(SHAPES | GROUPS)[name][0]) * launches for name, launches in ENGINE.items())
    gbs = streamed / (ms * 1e-3) / 1e9
    print(f"{rows} rows, the engine's NF4 launches a step ({kernel}): {ms:.3f} ms, {streamed / 1e9:.2f} GB, "
          f"{gbs:.0f} GB/s, {gbs / read:.0%} of the read bandwidth", flush=True)  # fmt: skip
    return {"kernel": kernel, "ms": ms, "gb": streamed / 1e9, "gb_s": gbs, "share_of_read": gbs / read}


def whole_step(rows_list: list[int], read: float) -> dict:
    """The engine's nf4_mma launches of a decode step in its order (LAYERS x ENGINE, each layer its own weights,
    q/k/v and gate/up as one launch each), timed in one graph with and without each launch's look-ahead (`ahead`:
    the next launch's first weight, as the engine gives it), at each row count nf4_mma serves."""

    def part(n: int, k: int) -> Part:  # random weights quantized on the device (double quantization)
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / 64
        weight, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        return weight, state, None

    layers = []
    for _ in range(LAYERS):
        q, k, v, o = part(4096, 4096), part(1024, 4096), part(1024, 4096), part(4096, 4096)
        gate, up, down = part(14336, 4096), part(14336, 4096), part(4096, 14336)
        layers.append((Nf4Segments([q, k, v]), o, Nf4Segments([gate, up]), down))
    streamed = LAYERS * sum(nf4_bytes(*(SHAPES | GROUPS)[name][0]) * launches for name, launches in ENGINE.items())
    results = {}
    for rows in (rows for rows in rows_list if rows <= mma_rows(0)):
        x, x_down = (torch.randn(rows, k, dtype=torch.bfloat16, device="cuda") for k in (4096, 14336))

        def step(ahead: bool, x: torch.Tensor = x, x_down: torch.Tensor = x_down) -> list[torch.Tensor]:
            outs = []
            for i, (qkv, o, gate_up, down) in enumerate(layers):
                after = (o, gate_up.parts[0], down, layers[(i + 1) % LAYERS][0].parts[0]) if ahead else (None,) * 4
                outs.append(nf4_mma_segments(x, qkv, ahead=after[0]))
                outs.append(nf4_mma(x, *o[:2], ahead=after[1]))
                outs.append(nf4_mma_segments(x, gate_up, ahead=after[2]))
                outs.append(nf4_mma(x_down, *down[:2], ahead=after[3]))
            return outs

        same = all(torch.equal(a, b) for a, b in zip(step(False), step(True), strict=True))
        runs: dict[str, list[float]] = {"ahead": [], "none": []}
        for round_ in range(2):  # alternated, so that drifts in clocks reach both alike
            for name in ("ahead", "none") if round_ == 0 else ("none", "ahead"):
                runs[name].append(graph_us(lambda name=name: step(name == "ahead"), 1, 20) / 1000)  # type: ignore[misc]
        results[str(rows)] = {"same_bits": same} | {
            name: {"ms": ms, "share_of_read": streamed / (min(ms) * 1e-3) / 1e9 / read} for name, ms in runs.items()
        }
        for name, ms in runs.items():
            print(f"{rows} rows, a whole step's NF4 launches in order, look-ahead {name}: "
                  f"{', '.join(f'{t:.3f}' for t in ms)} ms, {results[str(rows)][name]['share_of_read']:.0%} of the "
                  f"read bandwidth (same bits: {same})", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="1,32", help="comma-separated row counts (1: the GEMV)")
    parser.add_argument("--sweep", type=float, default=0.0, help="seconds to search configurations, per shape")
    parser.add_argument("--mma-sweep", type=float, default=0.0, help="seconds to search nf4_mma's, per shape")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes to measure (default: a "
                        f"step of single shapes; all: also the engine's), of {', '.join(SHAPES | GROUPS)}")  # fmt: skip
    parser.add_argument("--step", action="store_true", help="also time a whole step's nf4_mma launches in the "
                        "engine's order, with and without their look-ahead (--shapes none: that alone)")  # fmt: skip
    args = parser.parse_args()
    named = {"all": list(SHAPES | GROUPS), "none": []}
    shapes = named[args.shapes] if args.shapes in named else args.shapes.split(",")
    if unknown := set(shapes) - set(SHAPES | GROUPS):
        parser.error(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES | GROUPS)}")
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(0), "read_gb_s": read_gb_s(), "rows": {}}
    print(f"device read bandwidth {results['read_gb_s']:.0f} GB/s", flush=True)
    for name in shapes:
        (n, k), count = (SHAPES | GROUPS)[name]
        copies = math.ceil(STREAMED_BYTES / (n * k / 2))
        layers = [
            Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(torch.bfloat16).cuda()
            for _ in range(copies)
        ]  # quantized (double quantization) on the way to the device
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            expected = layers[0](x).float()
            got = kernel(x, layers[0], None).float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            bnb_us = graph_us(lambda: [layer(x) for layer in layers], copies)  # noqa: B023
            fused_us = graph_us(lambda: [kernel(x, layer, None) for layer in layers], copies)  # noqa: B023
            # nf4_mma runs up to 64 rows
            mma_us = graph_us(lambda: [mma(x, layer) for layer in layers], copies) if rows <= 64 else math.nan  # noqa: B023
            mma_best, mma_best_us = None, mma_us
            deadline = time.monotonic() + (args.mma_sweep if rows <= 64 else 0)
            for config in mma_candidates():
                if time.monotonic() > deadline:
                    break
                try:
                    us = graph_us(lambda: [mma(x, layer, config) for layer in layers], copies, 3)  # noqa: B023
                except (RuntimeError, ValueError):  # more shared memory than a CTA may have
                    continue
                if us < mma_best_us:
                    mma_best, mma_best_us = config, us
            if mma_best is not None:
                print(f"{rows:3d} rows {name:18s} mma {mma_us:7.1f} us, best {mma_best_us:7.1f} us {mma_best}",
                      flush=True)  # fmt: skip
            wide_us, wide_best = math.nan, None
            if 1 < rows <= WIDE_ROWS:
                wide_error = ((wide(x, layers[0]) - expected).abs().max() / expected.abs().max()).item()
                wide_us = wide_best_us = graph_us(lambda: [wide(x, layer) for layer in layers], copies)  # noqa: B023
                deadline = time.monotonic() + args.sweep
                for config in wide_candidates():
                    if time.monotonic() > deadline:
                        break
                    try:
                        us = graph_us(lambda: [wide(x, layer, config) for layer in layers], copies, 3)  # noqa: B023
                    except (RuntimeError, ValueError):  # more shared memory than a CTA may have; K not divisible
                        continue
                    if us < wide_best_us:
                        wide_best, wide_best_us = config, us
                print(f"{rows:3d} rows {name:18s} wide {wide_us:7.1f} us, best {wide_best_us:7.1f} us {wide_best} "
                      f"err {wide_error:.1e}", flush=True)  # fmt: skip
            best = pick_config(n, k) if rows == 1 else pick_matmul_config(n, k, rows, on_cuda=True)
            best_us = fused_us
            deadline = time.monotonic() + args.sweep
            for config in candidates(n, k, rows):
                if time.monotonic() > deadline:
                    break
                try:
                    us = graph_us(lambda: [kernel(x, layer, config) for layer in layers], copies, 3)  # noqa: B023
                except OutOfResources:  # more shared memory or registers than an SM has (large tiles of many rows)
                    continue
                if us < best_us:
                    best, best_us = config, us
            gbs = nf4_bytes(n, k) / (best_us * 1e-6) / 1e9
            shape = {"bnb_us": bnb_us, "fused_us": fused_us, "mma_us": mma_us, "wide_us": wide_us, "best_us": best_us,
                     "best_config": best, "best_gb_s": gbs, "rel_error": error, "per_layer": count}  # fmt: skip
            if wide_best is not None:
                shape |= {"wide_best_us": wide_best_us, "wide_best_config": wide_best}
            if mma_best is not None:
                shape |= {"mma_best_us": mma_best_us, "mma_best_config": mma_best}
            results["rows"].setdefault(str(rows), {})[name] = shape
            print(f"{rows:3d} rows {name:18s} bnb {bnb_us:7.1f} us  fused {fused_us:7.1f} us  mma {mma_us:7.1f} us  "
                  f"best {best_us:7.1f} us "
                  f"{best} {gbs:6.0f} GB/s  err {error:.1e}", flush=True)  # fmt: skip
    for rows, measured in results["rows"].items():
        if set(ENGINE) <= set(measured):
            results[f"engine_step_{rows}_rows"] = engine_step(int(rows), measured, results["read_gb_s"])
        if not set(SHAPES) <= set(measured):  # a step's time only from all its shapes
            continue
        step = {key: LAYERS * sum(measured[name][f"{key}_us"] * SHAPES[name][1] for name in SHAPES) / 1000
                for key in ("bnb", "fused", "mma", "wide", "best")}  # fmt: skip
        results[f"step_ms_{rows}_rows"] = step
        print(f"{rows} rows, linear layers per decode step: bnb {step['bnb']:.2f} ms, fused {step['fused']:.2f} ms, "
              f"mma {step['mma']:.2f} ms, wide {step['wide']:.2f} ms, best found {step['best']:.2f} ms",
              flush=True)  # fmt: skip
    if args.step:
        results["whole_step"] = whole_step(list(map(int, args.rows.split(","))), results["read_gb_s"])
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
