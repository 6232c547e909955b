"""Decode attention (server/engine/kernels/attention.py) on Llama-3-8B's heads (32 query heads, 8 KV heads of 128)
over bf16 cache rows, with and without o_proj's shrink in the merge (CUDA): the configuration choose_config picks
against others, each in a CUDA graph as in the engine's decode step.

python bench/attention.py --out attention.json                      # the picked configuration at each shape
python bench/attention.py --seqs 32,64 --context 192 --sweep --out attention.json  # and every other one

A shape is (sequences, KV positions each after the step): a decode step of one token a sequence, the sequences'
cache rows spread over a cache of --max-len positions a row, as the engine's static cache is.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from bench.nf4_kernel import graph_us
from server.engine.kernels.attention import AttentionConfig, OutputShrink, choose_config, launch

Q_HEADS, KV_HEADS, HEAD_D, RANK = 32, 8, 128, 16
CALLS = 32  # launches a graph: a step's layers


def sweep_configs(picked: AttentionConfig) -> list[AttentionConfig]:
    """Decode configurations near the picked one: its block_m, the others varied."""
    return [
        AttentionConfig(picked.block_m, block_n, splits, warps, stages)
        for block_n, splits, warps, stages in itertools.product((16, 32, 64), (1, 2, 4, 8, 16), (2, 4), (1, 2))
    ]


def timed(operands: tuple, config: AttentionConfig, shrink: OutputShrink | None) -> float:
    """Microseconds a launch (its merge included), with `shrink` made by the merge where it runs."""
    shrink = shrink if config.splits > 1 else None
    return graph_us(lambda: [launch(*operands, config, shrink) for _ in range(CALLS)], CALLS, replays=20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqs", default="1,8,32,64", help="comma-separated sequence counts")
    parser.add_argument("--context", default="192,1024,4096", help="comma-separated KV lengths after the step")
    parser.add_argument("--max-len", type=int, default=8192, help="positions of a cache row")
    parser.add_argument("--sweep", action="store_true", help="also time the configurations near the picked one")
    parser.add_argument("--splits", default="", help="comma-separated split counts to time at the picked tiles")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(0), "shapes": []}
    for seqs, context in itertools.product(map(int, args.seqs.split(",")), map(int, args.context.split(","))):
        cache_shape = (seqs + 1, KV_HEADS, args.max_len, HEAD_D)
        k_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device=device)
        v_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device=device)
        q = torch.randn(seqs, Q_HEADS, HEAD_D, dtype=torch.bfloat16, device=device)
        query_start = torch.arange(seqs + 1, dtype=torch.int32, device=device)
        seq_rows = torch.randperm(seqs, device=device).to(torch.int32)
        seq_lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
        a = torch.randn(seqs + 1, RANK, Q_HEADS * HEAD_D, dtype=torch.bfloat16, device=device) / 64
        slots = torch.arange(seqs, device=device)
        ranks = torch.full((seqs,), RANK, dtype=torch.int32, device=device)
        shrink = OutputShrink.of(a, slots, ranks, Q_HEADS)
        out = torch.empty_like(q)
        operands = (q, k_cache, v_cache, query_start, seq_rows, seq_lens, HEAD_D**-0.5, None, out)

        picked = choose_config(seqs, seqs, Q_HEADS, KV_HEADS, device, args.max_len)
        reference = launch(*operands, AttentionConfig(picked.block_m, 64, 1)).float()
        row = {"seqs": seqs, "context": context, "picked": picked.__dict__, "picked_us": timed(operands, picked, None),
               "picked_shrink_us": timed(operands, picked, shrink)}  # fmt: skip
        line = f"{seqs:3d} seqs x {context:5d}: picked {picked} {row['picked_us']:6.2f} us " \
               f"(with o's shrink {row['picked_shrink_us']:6.2f})"  # fmt: skip
        if args.splits:
            row["splits_us"] = {}
            for splits in map(int, args.splits.split(",")):
                config = AttentionConfig(picked.block_m, picked.block_n, splits, picked.num_warps, picked.num_stages)
                row["splits_us"][splits] = timed(operands, config, shrink)
            line += "; by splits " + " ".join(f"{k}: {v:.2f}" for k, v in row["splits_us"].items())
        if args.sweep:
            timings = []
            for config in sweep_configs(picked):
                try:
                    got = launch(*operands, config).float()
                    error = (got - reference).abs().max().item()
                    timings.append((timed(operands, config, shrink), config, error))
                except Exception as failure:  # out of shared memory: not a candidate
                    print(f"  {config}: {type(failure).__name__}", flush=True)
            timings.sort(key=lambda t: t[0])
            row["best"] = [{"us": us, "config": c.__dict__, "max_error": e} for us, c, e in timings[:8]]
            best_us, best, error = timings[0]
            line += f"; best {best} {best_us:6.2f} us (max error {error:.1e})"
        print(line, flush=True)
        results["shapes"].append(row)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
