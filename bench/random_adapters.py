"""Write N random PEFT LoRA adapters for a model config, to upload to a server under load.

python bench/random_adapters.py --config llama3-8b --count 128 --rank 16 --out /tmp/adapters
python bench/random_adapters.py --config path/to/config.json --count 4 --targets q_proj,v_proj --out adapters/

The model is built on the meta device: module names and shapes come from the config and no weight is ever
allocated, so adapters for an 8B model are written in seconds on any machine.
"""

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from adapters.lora import PEFT_PREFIX
from loraplex.synthetic import PREFIX, synthetic_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def linear_shapes(config_spec: str, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Full module name -> (in_features, out_features) of the targeted Linears, from the config alone."""
    config = synthetic_config(config_spec if config_spec.startswith(PREFIX) else PREFIX + config_spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def write_adapter(
    out: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """One adapter directory as PEFT's save_pretrained() writes it: adapter_config.json + safetensors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        # small values: the adapted model stays close to the base, as trained adapters do
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * 0.01).to(dtype)
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(out)
    save_file(state, out / "adapter_model.safetensors")
    return out


def write_adapters(
    config_spec: str, out: Path, count: int, rank: int, targets: tuple[str, ...] = ATTENTION, prefix: str = "bench"
) -> list[Path]:
    """`count` distinct adapters named `<prefix>-<i>` under `out` (distinct seeds: no two hash alike)."""
    shapes = linear_shapes(config_spec, targets)
    if not shapes:
        raise SystemExit(f"no Linear module of {config_spec!r} is named like {targets}")
    return [write_adapter(out / f"{prefix}-{i}", shapes, rank, seed=i) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="preset (llama3-8b, tiny) or a config.json path")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ATTENTION), help="comma-separated module suffixes")
    parser.add_argument("--prefix", default="bench", help="adapter names are <prefix>-<i>")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    paths = write_adapters(args.config, args.out, args.count, args.rank, tuple(args.targets.split(",")), args.prefix)
    print(f"wrote {len(paths)} adapters of rank {args.rank} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
