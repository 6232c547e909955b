"""The NF4 GEMV's machine code for sm_90, compiled here without a GPU: its inner loop's instruction mix and
instructions per weight, the figure that bounds the kernel once memory is not the limit (H200: ~3.5
instructions per weight at full bandwidth, see BENCHMARKS.md). With --mma, nf4_mma's (CUDA, compiled with
NVRTC: `pip install nvidia-cuda-nvrtc-cu12`), built as a decode step's projection uses it: double quantization,
a rank-16 LoRA epilogue with its B rows in shared memory. With --wide, nf4_wide's (NVRTC too, double
quantization), in the launcher's configuration for the weight and rows.

python bench/nf4_sass.py                          # the launcher's configuration for a 4096 x 4096 weight
python bench/nf4_sass.py --config 16,8,8 --k 4096 --sass gemv.sass
python bench/nf4_sass.py --mma --rows 1 --n 14336 # nf4_mma's configuration for 1 row of gate_proj's shape
python bench/nf4_sass.py --wide --rows 64 --n 14336 --k 4096  # its wgmma build (sm_90a); --mma-sync: the other
"""

import argparse
import collections
import ctypes
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine.kernels import nf4, nf4_mma, nf4_wide

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
    return cubin_sass(compiled.asm["cubin"])


def cubin_sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def mma_sass(n: int, k: int, rows: int) -> tuple[str, int]:
    """SASS of nf4_mma for sm_90 in the launcher's configuration for an [n, k] weight and `rows` rows, and the
    weights one iteration of its main loop takes a warp."""
    row_tiles, warps, group, stages, min_blocks, lut_entry = nf4_mma.pick_config(n, k, rows)
    warps, group, x_tiles = nf4_mma.pick_launch(k, rows, row_tiles, warps, group)
    source = nf4_mma.kernel_source(warps, group, row_tiles, x_tiles, stages, min_blocks, lut_entry, True, False, 16,
                                   True, 1, False)  # fmt: skip
    return cubin_sass(nvrtc_cubin(source, "nf4_mma.cu")), group * row_tiles * 16 * 64


def wide_sass(n: int, k: int, rows: int, wgmma: bool) -> tuple[str, int]:
    """SASS of nf4_wide for sm_90 (sm_90a with wgmma) in the launcher's configuration, and the weights one step of
    its main loop takes a warp."""
    warps, row_tiles, group, stages, min_blocks = nf4_wide.pick_config(n, k, rows)
    source = nf4_wide.kernel_source(warps, row_tiles, group, stages, min_blocks, -(-rows // 8), True, False, 1, wgmma)
    return cubin_sass(nvrtc_cubin(source, "nf4_wide.cu", "sm_90a" if wgmma else "sm_90")), group * row_tiles * 16 * 64


def nvrtc_cubin(source: str, name: str, arch: str = "sm_90") -> bytes:
    """`source` compiled for `arch` by NVRTC (the pip package's library: no GPU or CUDA toolkit needed); its
    messages (ptxas' advice among them) printed."""
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--mma and --wide need NVRTC: pip install nvidia-cuda-nvrtc-cu12")
    nvrtc = ctypes.CDLL(str(next(Path(spec.submodule_search_locations[0], "lib").glob("libnvrtc.so*"))))
    program = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    failed = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    if failed:
        raise SystemExit(log.value.decode())
    if log.value.strip():
        print(log.value.decode().strip())
    nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(program, cubin)
    return cubin.raw


def loop_mix(code: str) -> collections.Counter[str]:
    """Opcodes of the kernel's main loop: the instructions between a backward branch's target and the branch;
    of several loops, the one with the most tensor-core instructions (the first where none has any)."""
    instruction = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+ )?([^;]+);")  # address, predicate, text
    lines = [(int(m.group(1), 16), m.group(3)) for m in instruction.finditer(code)]
    loops = [(int(m.group(1), 16), address) for address, text in lines
             if (m := re.match(r"BRA 0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address]  # fmt: skip
    mixes = [
        collections.Counter(text.split()[0].split(".")[0] for address, text in lines if start <= address <= end)
        for start, end in loops
    ]
    return max(mixes, key=lambda mix: mix["HMMA"] + mix["HGMMA"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="BLOCK_N,BLOCKS,num_warps (default: the launcher's choice)")
    parser.add_argument("--n", type=int, default=4096, help="output rows of the weight (picks the default config)")
    parser.add_argument("--k", type=int, default=4096, help="input columns of the weight")
    parser.add_argument("--sass", type=Path, help="also write the whole SASS here")
    parser.add_argument("--mma", action="store_true", help="nf4_mma instead of the GEMV (needs NVRTC)")
    parser.add_argument("--wide", action="store_true", help="nf4_wide instead of the GEMV (needs NVRTC)")
    parser.add_argument("--mma-sync", action="store_true", help="with --wide: its mma.sync build, not wgmma")
    parser.add_argument("--rows", type=int, default=1, help="with --mma, --wide: rows of x (picks the configuration)")
    args = parser.parse_args()
    if args.mma:
        code, warp_weights = mma_sass(args.n, args.k, args.rows)
        weights, label = warp_weights / 32, f"nf4_mma {nf4_mma.pick_config(args.n, args.k, args.rows)}"
    elif args.wide:
        code, warp_weights = wide_sass(args.n, args.k, args.rows, not args.mma_sync)
        weights, label = warp_weights / 32, f"nf4_wide {nf4_wide.pick_config(args.n, args.k, args.rows)}"
    else:
        block_n, blocks, warps = map(int, args.config.split(",")) if args.config else nf4.pick_config(args.n, args.k)
        code = sass(block_n, blocks, warps, args.k)
        weights, label = block_n * blocks * 64 / (32 * warps), f"config ({block_n}, {blocks}, {warps})"
    if args.sass:
        args.sass.write_text(code)
    mix = loop_mix(code)
    total = sum(mix.values())  # one loop iteration of one thread, for `weights` weights
    print(f"{label}: loop of {total} instructions a thread for {weights:.0f} weights, {total / weights:.2f} per weight")
    print(", ".join(f"{op} {count}" for op, count in mix.most_common()))


if __name__ == "__main__":
    main()
