"""Decode speed of nf4_mma source variants against this tree's, in one process (CUDA; bench/engine.py's 8B shapes).

python3 bench/engine_ab.py --out ab.json variant.cu [other.cu ...]

Separate processes of bench/engine.py differ by 2-3% from run to run, as much as most kernel changes move a step.
Here one model and one engine serve every variant: the step's CUDA graphs are captured once per variant of
server/engine/kernels/nf4_mma.cu (this tree's first, as "tree"), and the variants' runs alternate, so drifts in
clocks and heat reach all of them alike. A variant is a whole .cu file, e.g. another branch's
(`git show BRANCH:server/engine/kernels/nf4_mma.cu > other.cu`) or this one edited to remove some work, which
prices that work (its answers are then wrong, its speed is what is measured).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from bench.engine import SHAPE_8B, engine_config, engine_run, random_loras
from loraplex.synthetic import load_synthetic
from server.engine import Engine
from server.engine.batching import SCORED_TOKENS
from server.engine.graphs import StepGraphs
from server.engine.kernels import nf4_mma


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("variants", type=Path, nargs="+", help="nf4_mma.cu variants to compare with this tree's")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every variant, alternating")
    parser.add_argument("--store-rank", type=int, help="slots padded to this rank instead of the adapters' own (16)")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = SHAPE_8B
    model, tokenizer = load_synthetic("random:llama3-8b", torch.device("cuda"), torch.bfloat16, quantize=True)
    loras = random_loras(model, shape.wide_requests, 4, shape.rank, torch.bfloat16)
    config = engine_config(shape, args.store_rank)
    engine = Engine(model, tokenizer, config)  # captures this tree's kernel
    graphs = {"tree": engine._graphs}
    tree_source = nf4_mma._source()
    tree_kernel = Path(nf4_mma.__file__).with_name("nf4_mma.cu").read_text()
    for path in args.variants:
        source = tree_source.replace(tree_kernel, path.read_text())
        nf4_mma._source = lambda source=source: source  # the builds read it, once per launch shape
        nf4_mma._kernel.cache_clear()
        graphs[path.stem] = StepGraphs(engine._graph_forward, config.graph_buckets(), engine._step.host, engine.device,
                                       SCORED_TOKENS)  # fmt: skip

    engine_run(engine, [loras[0]], shape, "warm")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in graphs}
    names = list(graphs)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            engine._graphs = graphs[name]
            run = {}
            for batch in ([loras[1]], loras[: shape.requests], loras):  # new adapter keys each run, as engine.py's
                tag = f"{round_}-{name}-{len(batch)}"
                run[f"{len(batch)}_lora_decode_tok_s"] = engine_run(engine, batch, shape, tag)["decode_tok_s"]
            results[name].append(run)
            print(name, {key: round(value, 1) for key, value in run.items()}, flush=True)
    device, variants = torch.cuda.get_device_name(0), [str(path) for path in args.variants]
    args.out.write_text(json.dumps({"device": device, "variants": variants, **results}, indent=1))


if __name__ == "__main__":
    main()
