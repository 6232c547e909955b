"""The NF4 GEMV's machine code for sm_90, compiled here without a GPU: its inner loop's instruction mix and
instructions per weight, the figure that bounds the kernel once memory is not the limit (H200: ~3.5
instructions per weight at full bandwidth, see BENCHMARKS.md).

python bench/nf4_sass.py                          # the launcher's configuration for a 4096 x 4096 weight
python bench/nf4_sass.py --config 16,8,8 --k 4096 --sass gemv.sass
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine.kernels import nf4

POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
            "offset_ptr": "*fp32", "nf4_ptr": "*fp32", "bias_ptr": "*bf16", "partial_ptr": "*fp32",
            "lora_b_ptr": "*bf16", "slot_ptr": "*i64", "out_ptr": "*bf16"}  # fmt: skip


def sass(block_n: int, blocks: int, warps: int, k: int) -> str:
    """SASS of the GEMV (double quantization, no bias, no LoRA) for bf16 activations on sm_90."""
    fn = nf4._nf4_gemv_kernel
    constants = dict(BLOCKS_PER_ROW=k // nf4.QBLOCK, NESTED=True, HAS_BIAS=False, HAS_LORA=False, CHUNKS_PAD=16,
                     R_PAD=16, DECODE_ASM=True, BLOCK_N=block_n, BLOCKS=blocks)  # fmt: skip
    signature = {name: POINTERS.get(name, "constexpr" if name in constants else "i32") for name in fn.arg_names}
    # what a launch specializes on: 16-byte aligned pointers and N a multiple of 16 (loads vectorize on it)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in POINTERS or n == "N"}
    constexprs = {(fn.arg_names.index(n),): v for n, v in constants.items()}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "gemv.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def loop_mix(code: str) -> collections.Counter[str]:
    """Opcodes of the kernel's main loop: the instructions between a backward branch's target and the branch."""
    instruction = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+ )?([^;]+);")  # address, predicate, text
    lines = [(int(m.group(1), 16), m.group(3)) for m in instruction.finditer(code)]
    start, end = next((int(m.group(1), 16), address) for address, text in lines
                      if (m := re.match(r"BRA 0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address)  # fmt: skip
    return collections.Counter(text.split()[0].split(".")[0] for address, text in lines if start <= address <= end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="BLOCK_N,BLOCKS,num_warps (default: the launcher's choice)")
    parser.add_argument("--n", type=int, default=4096, help="output rows of the weight (picks the default config)")
    parser.add_argument("--k", type=int, default=4096, help="input columns of the weight")
    parser.add_argument("--sass", type=Path, help="also write the whole SASS here")
    args = parser.parse_args()
    block_n, blocks, warps = map(int, args.config.split(",")) if args.config else nf4.pick_config(args.n, args.k)
    code = sass(block_n, blocks, warps, args.k)
    if args.sass:
        args.sass.write_text(code)
    mix = loop_mix(code)
    weights = block_n * blocks * 64 / (32 * warps)  # one loop iteration of one thread
    total = sum(mix.values())
    print(f"config ({block_n}, {blocks}, {warps}): loop of {total} instructions a thread for {weights:.0f} weights, "
          f"{total / weights:.2f} per weight")  # fmt: skip
    print(", ".join(f"{op} {count}" for op, count in mix.most_common()))


if __name__ == "__main__":
    main()
