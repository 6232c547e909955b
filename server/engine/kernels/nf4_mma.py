"""The NF4 tensor-core kernel for 1-64 rows (nf4_mma.cu), compiled with NVRTC through torch at first use, one
build per launch shape and epilogue.

It reads bitsandbytes' storage as the Triton kernels do and decodes codes through a table in shared memory
instead of register permutes, which Triton cannot express (the .cu file says why it is faster). Used on CUDA
devices of compute capability 8.0+ for bf16 compute; the Triton kernels serve everything else.
"""

import ctypes
import functools
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from bitsandbytes.functional import QuantState, get_4bit_type

from server.engine.kernels import pdl
from server.engine.kernels.epilogue import LoraEpilogue

log = logging.getLogger("loraplex.engine")
# The most rows nf4_mma takes: up to here it beats nf4_wide on mma.sync and the Triton kernels on the H200; where
# nf4_wide has wgmma, nf4_mma takes fewer (nf4_wide.mma_rows; BENCHMARKS.md)
MMA_ROWS = 32
_SHRUNK_BYTES = 8192  # the LoRA epilogue's shrunk activations at most, in static shared memory
_STATIC_BYTES = 12 * 1024  # the kernel's static shared memory at most: those, three second-level tables, slots
# The epilogue's B rows for two tiles in shared memory, at most; past it (many rows of a high-rank store), or for B
# rows not 16-byte aligned, the epilogue reads them from global memory
_BTILE_BYTES = 64 * 1024
# Tiles a CTA from which its tile ends go without a barrier (PHASED): faster at 7 a CTA (gate/up at 8 rows on the
# H200), slower at 1-2, where the last epilogue's warp waits on a phase for the others (BENCHMARKS.md)
_PHASED_TILES = 4
AHEAD_BYTES = 4 << 20  # of the next launch's weight, asked of L2 by a launch given it (BENCHMARKS.md)
_SUMS_BYTES = 40 * 1024  # the warps' partial sums at most (padded rows): fewer warps split K past it (64 rows)
_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1  # cuda.h: a kernel's static shared memory


def nf4_bf16_bits() -> list[int]:
    """bitsandbytes' 16 NF4 values rounded to bf16, as bit patterns: the code book both NF4 decoders build in."""
    return [b & 0xFFFF for b in get_4bit_type("nf4", device="cpu").to(torch.bfloat16).view(torch.int16).tolist()]


def cuda_source(name: str) -> str:
    """The CUDA source of kernel file `name` after the code book and the parts the NF4 kernels share."""
    codes = ", ".join(map(hex, nf4_bf16_bits()))
    here = Path(__file__).parent
    return f"#define NF4_CODES {codes}\n" + (here / "nf4_common.cuh").read_text() + (here / name).read_text()


@functools.cache
def _source() -> str:
    """nf4_mma's source after its code book."""
    return cuda_source("nf4_mma.cu")


def available(x: torch.Tensor, lora: LoraEpilogue | None = None, residual: torch.Tensor | None = None) -> bool:
    """Whether nf4_mma runs for `x` (and `lora`, `residual`): bf16 rows 16-byte aligned on a CUDA device with bf16
    tensor cores where torch's NVRTC compiles the kernel, the rows' shrunk activations fit its shared memory (up
    to rank 64 for 32 rows, 128 for 16, 256 for 8), and a residual of bf16 rows with unit column stride."""
    return (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and x.data_ptr() % 16 == 0
        and x.stride(0) % 8 == 0
        and (lora is None or -(-x.shape[0] // 8) * 8 * lora.partial.shape[-1] * 4 <= _SHRUNK_BYTES)
        and (residual is None or (residual.dtype == torch.bfloat16 and residual.stride(-1) == 1))
        and _compiles(x.device.index or 0)
    )


def compiles(device: int, name: str, build: Callable[[], object], instead: str) -> bool:
    """Whether kernel `name` runs on `device`: compute capability 8.0+ (bf16 tensor cores) and `build` (one NVRTC
    build) succeeding; torch without NVRTC, or its library missing, leaves `instead` to serve its steps."""
    if torch.cuda.get_device_capability(device) < (8, 0) or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        build()
    except (OSError, RuntimeError) as error:
        log.warning("%s does not compile here (%s): %s serve its steps", name, error, instead)
        return False
    return True


@functools.cache
def _compiles(device: int) -> bool:
    """One build on `device`, once."""
    build = functools.partial(_kernel, warps=8, group=4, row_tiles=1, x_tiles=1, stages=3, min_blocks=2,
                              lut_entry=128, nested=False, bias=False, r_pad=0, btile=False, segments=1,
                              residual=False, phased=False, device=device)  # fmt: skip
    return compiles(device, "nf4_mma", build, "the Triton NF4 kernels")


def sums_bytes(warps: int, row_tiles: int, x_tiles: int) -> int:
    """The warps' partial sums of a tile: an x row's outputs padded by 4 floats (RED_ROW)."""
    return warps * x_tiles * 8 * (16 * row_tiles + 4) * 4


def staged_bytes(warps: int, group: int, row_tiles: int, x_tiles: int, stages: int, lut_entry: int) -> int:
    """The dynamic shared memory of a launch without B rows: the decode table, the warps' staged weights, then
    their partial sums (the .cu file's layout)."""
    row = 32 if group == 1 else 128 if group == 4 else 32 * group + 32  # WROW
    return 256 * lut_entry + warps * stages * 16 * row_tiles * row + sums_bytes(warps, row_tiles, x_tiles)


def btile_bytes(rows: int, rank: int, row_tiles: int) -> int:
    """The epilogue's B rows in shared memory: two tiles' [rows, rank, the CTA's outputs] bf16."""
    return 2 * rows * rank * 16 * row_tiles * 2


def fit_shared(
    warps: int, group: int, row_tiles: int, x_tiles: int, stages: int, lut_entry: int, btile: int, optin: int
) -> tuple[int, int, int, int]:
    """(warps, stages, table entry bytes, B rows' bytes) of a launch whose dynamic shared memory fits beside the
    static in `optin` bytes (the most a CTA may have): as asked where it does (on the H100/H200 it does but for a
    high rank at 9-16 rows), else without the B rows in shared memory, then with the smaller table and two stages,
    then fewer warps."""
    limit = optin - _STATIC_BYTES
    options = [(warps, stages, lut_entry, btile), (warps, stages, lut_entry, 0)]
    options += [(max(1, warps >> shift), 2, 128, 0) for shift in range(4)]
    for w, st, lut, bt in options:
        if staged_bytes(w, group, row_tiles, x_tiles, st, lut) + bt <= limit:
            return w, st, lut, bt
    raise ValueError(f"nf4_mma does not fit in {optin} bytes of shared memory")


def pick_launch(k: int, rows: int, row_tiles: int, warps: int, group: int) -> tuple[int, int, int]:
    """(warps, group, n8 tiles of x rows) for x [rows, k] and a CTA of `row_tiles` 16-row weight tiles: up to `warps`
    warps splitting K's groups (at least one each) of up to `group` blocks, the group dividing K's blocks, the
    warps' partial sums within _SUMS_BYTES."""
    x_tiles = -(-rows // 8)
    blocks = k // 64
    for w in (w for w in (16, 8, 4, 2, 1) if w <= warps and sums_bytes(w, row_tiles, x_tiles) <= _SUMS_BYTES):
        for g in (4, 2, 1):
            if g <= group and blocks % g == 0 and blocks // g >= w:
                return w, g, x_tiles
    raise ValueError(f"K {k} has no 64-column block")


def pick_config(n: int, k: int, rows: int) -> tuple[int, int, int, int, int, int]:
    """(16-row weight tiles a CTA, most warps, most blocks a group, groups staged, CTAs an SM must fit by registers,
    bytes from one decode table entry to the next) for an [n, k] weight and `rows` rows of x: the best of a sweep
    on the H200 (`bench/nf4_kernel.py --mma-sweep`, BENCHMARKS.md) for the Llama-3-8B shapes at 1-2, 8 and 16
    rows (q/k/v the 128-byte table at every row count there)."""
    if rows <= 8:
        if 4096 < n <= 8192:  # q/k/v
            return 1, 4, 4, 2, 2, 128
        return (1, 8, 4, 2, 2, 256) if rows <= 4 else (2, 8, 4, 2, 1, 256)
    if rows <= 16:
        return (2, 8, 4, 2, 1, 256) if k > 8192 else (2, 4, 4, 2, 2, 128)
    return 2, 8, 2, 3, 1, 128


def kernel_source(
    warps: int,
    group: int,
    row_tiles: int,
    x_tiles: int,
    stages: int,
    min_blocks: int,
    lut_entry: int,
    nested: bool,
    bias: bool,
    r_pad: int,
    btile: bool,
    segments: int,
    residual: bool,
    phased: bool = False,
) -> str:
    """The CUDA source of one build of the kernel: its defines (the .cu file's header lists them), then _source()."""
    defines = {"WARPS": warps, "GROUP": group, "NT": row_tiles, "MT": x_tiles, "STAGES": stages,
               "MIN_BLOCKS": min_blocks, "LUT_ENTRY": lut_entry,
               "NESTED": int(nested), "HAS_BIAS": int(bias), "HAS_LORA": int(r_pad > 0),
               "R_PAD": max(r_pad, 1), "BTILE": int(btile), "SEGMENTS": segments,
               "HAS_RESIDUAL": int(residual), "PHASED": int(phased)}  # fmt: skip
    return "".join(f"#define {name} {value}\n" for name, value in defines.items()) + _source()


@functools.cache
def _kernel(
    warps: int,
    group: int,
    row_tiles: int,
    x_tiles: int,
    stages: int,
    min_blocks: int,
    lut_entry: int,
    nested: bool,
    bias: bool,
    r_pad: int,
    btile: bool,
    segments: int,
    residual: bool,
    phased: bool,
    device: int,
) -> Callable[..., None]:
    source = kernel_source(warps, group, row_tiles, x_tiles, stages, min_blocks, lut_entry, nested, bias, r_pad, btile,
                           segments, residual, phased)  # fmt: skip
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(source, "nf4_mma")
        # static and dynamic shared memory together pass 48 KB: a launch must be allowed all the device allows
        static = ctypes.c_int()
        libcuda = torch.cuda._utils._get_gpu_runtime_library()
        libcuda.cuFuncGetAttribute(ctypes.byref(static), _CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, kernel.func)
        kernel.set_shared_memory_config(torch.cuda.get_device_properties(device).shared_memory_per_block_optin
                                        - static.value)  # fmt: skip
        return kernel


@functools.cache
def resident(kernel: Callable[..., None], threads: int, shared_mem: int) -> int:
    """CTAs of `kernel` an SM holds at once with `threads` threads and `shared_mem` bytes of dynamic shared memory
    each (the driver's occupancy calculation; at least one)."""
    count = ctypes.c_int()
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(count), kernel.func, threads,
                                                       ctypes.c_size_t(shared_mem))  # fmt: skip
    return max(1, count.value)


Part = tuple[torch.Tensor, QuantState, torch.Tensor | None]  # an NF4 weight, its QuantState, its bias (bf16)


class Nf4Segments:
    """NF4 weights that share their input (q/k/v, gate/up; up to three), projected by one launch into one output
    [M, sum of N]: each weight's CTAs follow the previous weight's; a CTA picks its weight's pointers among the
    kernel's parameters (nf4_mma's; nf4_wide's and the Triton matmul's, nf4.nf4_matmul_sums, likewise)."""

    def __init__(self, parts: list[Part], dtype: torch.dtype = torch.bfloat16) -> None:
        self.parts = parts
        self.dtype = dtype  # the layers' compute dtype: the biases' and the inputs'
        self.n = [state.shape[0] for _, state, _ in parts]

    def supported(self) -> bool:
        """Whether one launch can serve the weights: two or three of one K, one quantization kind, a bias on all
        or none (in the compute dtype, read as it is)."""
        states = [state for _, state, _ in self.parts]
        biases = [bias for _, _, bias in self.parts]
        return (
            2 <= len(self.parts) <= 3
            and len({state.shape[1] for state in states}) == 1
            and len({bool(state.nested) for state in states}) == 1
            and (all(b is None for b in biases) or all(b is not None and b.dtype == self.dtype for b in biases))
        )


def second_level(state: QuantState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(absmax2, code2, offset) of a double-quantized state; placeholders the kernel does not read otherwise."""
    return (state.state2.absmax, state.state2.code, state.offset) if state.nested else (state.absmax,) * 3


def nf4_mma(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    lora: LoraEpilogue | None = None,
    config: tuple[int, int, int, int, int, int] | None = None,
    residual: torch.Tensor | None = None,
    ctas: int | None = None,
    ahead: Part | None = None,
) -> torch.Tensor:
    """x [M, K] bf16 (M <= 64, unit column stride, rows 16-byte aligned) @ dequant(weight).T (+ bias,
    + each row's LoRA delta, then + residual [M, N] bf16 with unit column stride, added to the rounded output as
    `residual + layer(x)` adds it) -> [M, N] bf16; `state` is the weight's bitsandbytes QuantState (nf4, block
    size 64); config: pick_config's by default; ctas: at most this many CTAs (default: as many as the SMs hold at
    once; each takes tiles in turn)."""
    return _launch(x, [(weight, state, bias)], lora, config, residual, ctas, ahead)


def nf4_mma_segments(
    x: torch.Tensor,
    segments: Nf4Segments,
    lora: LoraEpilogue | None = None,
    config: tuple[int, int, int, int, int, int] | None = None,
    ctas: int | None = None,
    ahead: Part | None = None,
) -> torch.Tensor:
    """nf4_mma for each weight of `segments` (supported()) in one launch -> [M, sum of N], the weights' outputs
    side by side; lora.partial is the shrink's [G, M, CHUNKS_PAD, R_PAD] for the G weights, lora.b their B
    columns side by side, [S+1, R, sum of N]."""
    return _launch(x, segments.parts, lora, config, None, ctas, ahead)


def _ahead_args(ahead: Part | None, placeholder: torch.Tensor) -> list:
    """The kernel's last four parameters: the first AHEAD_BYTES of the next launch's weight `ahead` and its scales
    of those rows, which the CTAs ask L2 for as their copies end (none: zero bytes of a placeholder)."""
    if ahead is None:
        return [placeholder, 0, placeholder, 0]
    weight, state, _ = ahead
    rows = min(state.shape[0], max(1, AHEAD_BYTES // (state.shape[1] // 2)))
    scales = state.absmax
    return [weight, rows * state.shape[1] // 2, scales, rows * state.shape[1] // 64 * scales.element_size()]


def _launch(
    x: torch.Tensor,
    parts: list[Part],
    lora: LoraEpilogue | None,
    config: tuple[int, int, int, int, int, int] | None,
    residual: torch.Tensor | None,
    ctas: int | None,
    ahead: Part | None,
) -> torch.Tensor:
    m, k = x.shape
    ns = [state.shape[0] for _, state, _ in parts]
    total = sum(ns)
    row_tiles, warps, group, stages, min_blocks, lut_entry = config or pick_config(total, k, m)
    warps, group, x_tiles = pick_launch(k, m, row_tiles, warps, group)
    weight, state, bias = parts[0]
    absmax2, code2, offset = second_level(state)
    out = torch.empty(m, total, dtype=torch.bfloat16, device=x.device)
    btile = 0  # bytes of the epilogue's B rows in shared memory
    if lora is None:
        partial, b, slots, ranks, chunks, chunks_pad, r_pad, rank, stride_bs, stride_br = (out,) * 4 + (0,) * 6
    else:
        partial, b, slots, ranks, chunks = lora.partial, lora.b, lora.slots, lora.ranks, lora.chunks
        chunks_pad, r_pad = partial.shape[-2:]
        rank, stride_bs, stride_br = b.shape[1], b.stride(0), b.stride(1)
        starts = itertools.accumulate(ns[:-1])  # the segments' first columns of B past the first
        tiles = btile_bytes(m, rank, row_tiles)
        if b.data_ptr() % 16 == 0 and all(v % 8 == 0 for v in (stride_bs, stride_br, *starts)):  # 16-byte copies
            btile = tiles if tiles <= _BTILE_BYTES else 0
    device = x.device.index or 0
    props = torch.cuda.get_device_properties(device)
    optin = props.shared_memory_per_block_optin
    warps, stages, lut_entry, btile = fit_shared(warps, group, row_tiles, x_tiles, stages, lut_entry, btile, optin)
    partial_stride = partial.stride(0) if len(parts) > 1 and lora is not None else 0  # partial: [G, M, ...]
    ends = list(itertools.accumulate(-(-n // (16 * row_tiles)) for n in ns))
    more = []  # segments 1 and 2's parameters (segment 0's where there are fewer: never read)
    for i in (min(1, len(parts) - 1), min(2, len(parts) - 1)):
        w_i, state_i, bias_i = parts[i]
        more += [w_i, state_i.absmax, *second_level(state_i), out if bias_i is None else bias_i, ns[i]]
    build = functools.partial(
        _kernel,
        warps,
        group,
        row_tiles,
        x_tiles,
        stages,
        min_blocks,
        lut_entry,
        bool(state.nested),
        bias is not None,
        r_pad,
        btile > 0,
        len(parts),
        residual is not None,
    )
    kernel = build(False, device)
    shared_mem = staged_bytes(warps, group, row_tiles, x_tiles, stages, lut_entry) + btile
    if ctas is None:
        ctas = resident(kernel, 32 * warps, shared_mem) * props.multi_processor_count
    grid = min(ends[-1], ctas)
    if ends[-1] >= _PHASED_TILES * grid:
        kernel = build(True, device)
    pdl.launch(
        kernel,
        grid=(grid, 1, 1),
        block=(32 * warps, 1, 1),
        args=[x, x.stride(0), m, weight, state.absmax, absmax2, code2, offset, out if bias is None else bias,
              partial, chunks, chunks_pad, rank, b, stride_bs, stride_br, slots, ranks, out, total, ns[0], k,
              partial_stride, *more, ends[0], ends[min(1, len(ends) - 1)],
              out if residual is None else residual, 0 if residual is None else residual.stride(0), ends[-1],
              *_ahead_args(ahead, out)],
        shared_mem=shared_mem,
    )  # fmt: skip
    return out
