"""The engine's prompt policy (server/engine/batching.py plan_step) on simulated arrivals, in engine steps, against
admission order alone (every request one client's): how many steps each prompt waits until it is filled.

    python3 bench/prompt_turns.py

Two workloads, each step's prompt budget 512 tokens, no decoding modelled: many clients of one prompt each (128-2048
tokens, Poisson arrivals at a share of the budget), and a burst (one client keeps 16 prompts of 4,000 tokens
waiting, and another sends a 300-token prompt every 20 steps). A simulation of the policy alone: what a step costs
on a device is BENCHMARKS.md's.
"""

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine.batching import plan_step

Arrival = tuple[int, str, int]  # (step, client, prompt tokens)


def steps_to_fill(arrivals: list[Arrival], budget: int, by_client: bool) -> list[int]:
    """Per arrival, the steps from its arrival until its prompt is filled; the engine's turn numbering as its own."""
    waiting: dict[int, int] = {}  # arrival -> tokens left, in admission order
    turns: dict[int, int] = {}
    filled: dict[int, int] = {}
    step = i = 0
    while i < len(arrivals) or waiting:
        while i < len(arrivals) and arrivals[i][0] <= step:
            waiting[i] = arrivals[i][2]
            i += 1
        client: Callable[[int], str | None] = (lambda k: arrivals[k][1]) if by_client else (lambda k: None)
        for k, n in plan_step(
            [], list(waiting.items()), budget, client=client, turn=lambda k: turns.setdefault(k, len(turns))
        ):
            waiting[k] -= n
            if not waiting[k]:
                del waiting[k]
                filled[k] = step + 1 - arrivals[k][0]
        step += 1
    return [filled[k] for k in range(len(arrivals))]


def percentiles(steps: list[int]) -> str:
    ordered = sorted(steps)
    at = [ordered[max(0, int(p * len(ordered)) - 1)] for p in (0.5, 0.9, 0.99)]
    return f"p50 {at[0]} p90 {at[1]} p99 {at[2]} mean {statistics.mean(steps):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for load in (0.5, 0.8, 0.95):
        arrivals, t = [], 0.0
        while len(arrivals) < args.requests:
            tokens = rng.randint(128, 2048)
            t += rng.expovariate(load * args.budget / 1088)  # 1088: the prompts' mean length
            arrivals.append((int(t), f"client{rng.randrange(1000)}", tokens))
        for by_client in (False, True):
            policy = "turns between clients" if by_client else "admission order     "
            steps = steps_to_fill(arrivals, args.budget, by_client)
            print(f"many clients, load {load:.2f}, {policy}: {percentiles(steps)}")
    burst = [(0, "burst", 4000)] * 16
    for k in range(1, 60):
        burst += [(k * 20, "other", 300), (k * 20, "burst", 4000), (k * 20, "burst", 4000)]
    for by_client in (False, True):
        steps = steps_to_fill(burst, args.budget, by_client)
        other = [s for s, (_, who, _) in zip(steps, burst, strict=True) if who == "other"]
        policy = "turns between clients" if by_client else "admission order     "
        print(f"burst, the other client's prompts, {policy}: {percentiles(other)} max {max(other)}")


if __name__ == "__main__":
    main()
