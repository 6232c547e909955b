"""nf4_mma (nf4_wide with --wide) on each Llama-3-8B projection shape, two calls each and nothing else on the GPU: a
target for a kernel profiler. Nsight Compute, its stall reasons among the sections (BENCHMARKS.md records what it
found; regex:nf4_wide with --wide):

ncu -k regex:nf4_mma --launch-skip 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
    --metrics smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,... \
    python3 bench/nf4_profile.py --rows 1

(one `smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio` a reason: long_scoreboard, barrier,
short_scoreboard, wait, math_pipe_throttle, mio_throttle, lg_throttle, not_selected, selected, membar,
dispatch_stall, no_instruction, branch_resolving, drain, imc_miss, tex_throttle, sleeping). ncu flushes the caches
before each profiled launch and locks the SM clock at its base (~1.35 GHz on the H200): its durations are longer
than a decode step's, its ratios are what to read.
"""

import argparse
import sys
from pathlib import Path

import torch
from bitsandbytes.nn import Linear4bit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from bench.nf4_kernel import SHAPES, wide
from server.engine.kernels import nf4_wide
from server.engine.kernels.nf4_mma import nf4_mma, pick_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rows", type=int, default=1, help="rows of x (tokens of a decode step)")
    parser.add_argument("--wide", action="store_true", help="nf4_wide's sums, not nf4_mma")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, ((n, k), _) in SHAPES.items():
        layer = Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(torch.bfloat16).cuda()
        x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
        config = (nf4_wide.pick_config if args.wide else pick_config)(n, k, args.rows)
        print(f"{name} [{n}, {k}] x {args.rows} rows: config {config}", flush=True)
        for _ in range(2):
            if args.wide:
                wide(x, layer)
            else:
                nf4_mma(x, layer.weight, layer.weight.quant_state)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
