"""The NF4 tensor-core kernel for the steps of 17-64 rows (33-64 without wgmma), nf4_wide.cu, compiled with NVRTC
through torch at first use, one build per launch shape: fp32 sums of x @ dequant(W).T for one to three weights
sharing x (q/k/v, gate/up), which finish_projection then rounds and adds each row's LoRA delta and the residual to,
as it does for the Triton matmul that serves these steps where this kernel does not run; or, where K is not split,
the finished bf16 projection, its epilogue doing what finish_projection does (nf4_wide_finished).

Where nf4_mma's warps each read their own part of x, here the warps of a CTA share x's columns through shared
memory and split the output rows (the .cu file says why that matters at 64 rows); K is split over CTAs. On
compute capability 9.0 the products are Hopper's wgmma (built for sm_90a), x read by the tensor cores from shared
memory; elsewhere mma.sync.
"""

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch

from server.engine.kernels import pdl
from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.nf4_mma import MMA_ROWS, Part, compiles, cuda_source, second_level
from server.engine.kernels.nf4_mma import available as mma_available
from server.engine.kernels.zeroed import ZeroedSums

WIDE_ROWS = 64  # the most rows of x: 8 n8 tiles of accumulators a lane
# The finishing epilogue's shrunk activations (static shared memory beside the stages): rank 64 at 64 rows
FINISHED_SHRUNK_BYTES = 16384
MMA_ROWS_BESIDE_WGMMA = 16  # past this many rows nf4_wide on wgmma beats nf4_mma (H200, BENCHMARKS.md)
_LUT_BYTES = 256 * 256 + 256 * 4  # the decode table (an entry each 256 bytes) and code2, before the stages

# (warps, 16-row weight tiles a warp, blocks of 64 columns a step, steps in flight, CTAs an SM must fit)
Config = tuple[int, int, int, int, int]


def smem_bytes(warps: int, row_tiles: int, group: int, stages: int, x_tiles: int, wgmma: bool) -> int:
    """Dynamic shared memory of one build: the table, code2 and the stages (x's columns and the weights' bytes of
    a step), or the CTA's sums after them."""
    cta_rows = 16 * row_tiles * warps
    x_bytes = 8 * group * (128 * x_tiles + 16) if wgmma else 8 * x_tiles * (64 * group + 8) * 2
    stage = x_bytes + group * cta_rows * 32
    return max(_LUT_BYTES + stages * stage, 8 * x_tiles * (cta_rows + 4) * 4)


def wgmma_fits(warps: int, stages: int) -> bool:
    """Whether a configuration can take wgmma: whole warpgroups, and a stage between the one copied and the one
    read (the last step's products may still read theirs)."""
    return warps % 4 == 0 and stages >= 3


def wgmma_source(x_tiles: int) -> str:
    """The build's wgmma, m64 n(8 x_tiles) k16: sums d [x_tiles][4] (each n8 tile's as mma.sync's C fragment) +=
    the A registers (as mma.sync's A fragment) @ the staged x its descriptor `b` names."""
    count = 4 * x_tiles
    sums = ", ".join(f"%{i}" for i in range(count))
    operands = ", ".join(f'"+f"(d[{j}][{r}])' for j in range(x_tiles) for r in range(4))
    return (
        "__device__ __forceinline__ void wgmma(float (&d)[MT][4], const unsigned (&a)[4], unsigned long long b) {\n"
        f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{count + 5}, 0;\\n"\n'
        f'                 "wgmma.mma_async.sync.aligned.m64n{8 * x_tiles}k16.f32.bf16.bf16 {{{sums}}}, "\n'
        f'                 "{{%{count}, %{count + 1}, %{count + 2}, %{count + 3}}}, %{count + 4}, p, 1, 1, 0;\\n}}"\n'
        f"                 : {operands}\n"
        '                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1) : "memory");\n}\n'
    )


def available(x: torch.Tensor, parts: list[Part]) -> bool:
    """Whether nf4_wide runs for x [M, K] and `parts`: bf16 rows 16-byte aligned, M <= WIDE_ROWS, on a CUDA device
    with bf16 tensor cores where torch's NVRTC compiles the kernel, every weight's N a multiple of 4 (each thread
    adds four consecutive sums) and its bias bf16."""
    return (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and x.shape[0] <= WIDE_ROWS
        and x.data_ptr() % 16 == 0
        and x.stride(0) % 8 == 0
        and x.stride(1) == 1
        and all(state.shape[0] % 4 == 0 and (bias is None or bias.dtype == torch.bfloat16) for _, state, bias in parts)
        and _compiles(x.device.index or 0)
    )


@functools.cache
def _compiles(device: int) -> bool:
    """One build on `device`, once."""
    build = functools.partial(_kernel, 8, 2, 2, 3, 1, x_tiles=8, nested=False, bias=False, segments=1, wgmma=False,
                              device=device)  # fmt: skip
    return compiles(device, "nf4_wide", build, "the Triton NF4 matmul")


@functools.cache
def wgmma_runs(device: int) -> bool:
    """Whether nf4_wide takes wgmma on `device`: compute capability 9.0 (sm_90a: Hopper's wgmma is not in later
    architectures' PTX) and one such build compiling, once."""
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    build = functools.partial(_kernel, 8, 2, 2, 3, 1, x_tiles=8, nested=False, bias=False, segments=1, wgmma=True,
                              device=device)  # fmt: skip
    return compiles(device, "nf4_wide (wgmma)", build, "nf4_wide with mma.sync")


def mma_rows(device: int) -> int:
    """The most rows of a bf16 step that nf4_mma serves on CUDA device `device` (nf4_wide the steps above it)."""
    return MMA_ROWS_BESIDE_WGMMA if wgmma_runs(device) else MMA_ROWS


def mma_serves(x: torch.Tensor, lora: LoraEpilogue | None = None, residual: torch.Tensor | None = None) -> bool:
    """Whether nf4_mma serves the step x [M, K]: it runs for x (nf4_mma.available; checked first, it keeps the
    device query off other devices) and M is within mma_rows."""
    rows = x.shape[0]
    return rows <= MMA_ROWS and mma_available(x, lora, residual) and rows <= mma_rows(x.device.index or 0)


def kernel_source(
    warps: int, row_tiles: int, group: int, stages: int, min_blocks: int, x_tiles: int, nested: bool, bias: bool,
    segments: int, wgmma: bool, finish: bool = False, r_pad: int = 0, residual: bool = False,
) -> str:  # fmt: skip
    """The CUDA source of one build: its defines (the .cu file's header lists them), its wgmma where it takes it,
    then the shared parts and the kernel. finish: the epilogue writes the finished bf16 projection, with each
    row's LoRA delta where r_pad (the shrink's padded rank) is not 0, and a residual where `residual`."""
    defines = {"WARPS": warps, "NT": row_tiles, "MT": x_tiles, "GROUP": group, "STAGES": stages,
               "MIN_BLOCKS": min_blocks, "NESTED": int(nested), "HAS_BIAS": int(bias),
               "SEGMENTS": segments, "WGMMA": int(wgmma), "LUT_ENTRY": 256, "FINISH": int(finish),
               "HAS_LORA": int(r_pad > 0), "R_PAD": max(r_pad, 1), "HAS_RESIDUAL": int(residual)}  # fmt: skip
    head = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return head + (wgmma_source(x_tiles) if wgmma else "") + cuda_source("nf4_wide.cu")


@functools.cache
def _kernel(
    warps: int,
    row_tiles: int,
    group: int,
    stages: int,
    min_blocks: int,
    x_tiles: int,
    nested: bool,
    bias: bool,
    segments: int,
    wgmma: bool,
    device: int,
    finish: bool = False,
    r_pad: int = 0,
    residual: bool = False,
) -> Callable[..., None]:
    source = kernel_source(warps, row_tiles, group, stages, min_blocks, x_tiles, nested, bias, segments, wgmma, finish,
                           r_pad, residual)  # fmt: skip
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(source, "nf4_wide", compute_capability="90a" if wgmma else None)
        kernel.set_shared_memory_config(smem_bytes(warps, row_tiles, group, stages, x_tiles, wgmma))
        return kernel


def pick_config(n: int, k: int, rows: int) -> Config:
    """The launch configuration for `rows` rows of x and weights of `n` outputs together: the best of a sweep on
    the H200 at 64 rows per Llama-3-8B shape (`bench/nf4_kernel.py --rows 64 --sweep`), by the nearest shape; for
    the step's larger launches 16 warps of one 16-row tile each, not 8 of two (the same 256 rows a CTA, twice the
    warps in flight: 2-6% faster a shape at 32 and 64 rows). Up to 32 rows, three stages of four blocks each, not
    four of two: a sweep of the engine's launches at 32 rows found it the fastest on every one (gate/up 45.7 us
    against 48.5; BENCHMARKS.md)."""
    if n <= 2048:
        return (8, 1, 2, 4, 1)
    return (16, 1, 4, 3, 1) if rows <= 32 else (16, 1, 2, 3, 1)


def pick_split(tiles: int, k: int, group: int, sms: int) -> int:
    """Parts of K, each a CTA's for each tile: the fewest that give two SMs in three a CTA (more parts add more
    sums to global memory and more CTAs setting up, for little more streaming), where they divide K's blocks."""
    blocks = k // 64
    splits = [s for s in (1, 2, 4, 8, 16, 32) if blocks % (s * group) == 0]
    return next((s for s in splits if 3 * tiles * s >= 2 * sms), splits[-1])


class _Launch(NamedTuple):
    """One launch's shape: the kernel's configuration (its group made to divide K's blocks), wgmma or not, the CTAs
    of each weight so far, the parts of K."""

    config: Config
    wgmma: bool
    ends: list[int]
    split: int


def _plan(x: torch.Tensor, ns: list[int], config: Config | None, split: int | None, wgmma: bool | None) -> _Launch:
    m, k = x.shape
    device = x.device.index or 0
    warps, row_tiles, group, stages, min_blocks = config or pick_config(sum(ns), k, m)
    if wgmma is None:
        wgmma = wgmma_fits(warps, stages) and wgmma_runs(device)
    elif wgmma and not wgmma_fits(warps, stages):
        raise ValueError(f"wgmma takes whole warpgroups and 3+ stages, not {warps} warps and {stages} stages")
    while (k // 64) % group:
        group //= 2
    cta_rows = 16 * row_tiles * warps
    ends = list(itertools.accumulate(-(-n // cta_rows) for n in ns))
    split = split or pick_split(ends[-1], k, group, torch.cuda.get_device_properties(device).multi_processor_count)
    if (k // 64) % (split * group):
        raise ValueError(f"K's {k // 64} blocks do not split into {split} parts of {group}-block steps")
    return _Launch((warps, row_tiles, group, stages, min_blocks), wgmma, ends, split)


def nf4_wide_sums(
    x: torch.Tensor,
    parts: list[Part],
    config: Config | None = None,
    split: int | None = None,
    wgmma: bool | None = None,
    zeroed: ZeroedSums | None = None,
) -> torch.Tensor:
    """x [M, K] bf16 (available()) @ dequant(W).T (+ bias) for each weight W of `parts` (one to three of one K,
    kind and bias presence) in one launch -> [M, sum of N] fp32, the weights' sums side by side. The parts of K add
    atomically, so a sum's last bits can change from call to call. `wgmma`: the products' instruction (None: wgmma
    where it runs and the configuration fits it); `zeroed`: where the parts of K take their zeros from (a new
    tensor by default)."""
    ns = [state.shape[0] for _, state, _ in parts]
    launch = _plan(x, ns, config, split, wgmma)
    m, n = x.shape[0], sum(ns)
    if launch.split == 1:
        out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    else:
        out = zeroed.take(m, n, x.device) if zeroed else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    _launch(x, parts, launch, out, None)
    return out


def nf4_wide_finished(
    x: torch.Tensor,
    parts: list[Part],
    lora: LoraEpilogue | None,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
    split: int | None = None,
    wgmma: bool | None = None,
) -> torch.Tensor | None:
    """finish_projection(y, nf4_wide_sums(x, parts), lora, residual, widths) in one launch -> y [M, sum of N] bf16,
    where the launch takes K in one part (the CTAs then fill the GPU: the wide weights, gate/up) and the LoRA fits
    its epilogue (the rows' shrunk activations in FINISHED_SHRUNK_BYTES, B's rows 8-byte aligned); else None.
    lora: as finish_projection's for `parts`' widths (partial [G, M, CHUNKS_PAD, R_PAD], b [S+1, R, sum of N]);
    residual: [M, N] of one weight; config, split, wgmma: as nf4_wide_sums'."""
    m = x.shape[0]
    ns = [state.shape[0] for _, state, _ in parts]
    launch = _plan(x, ns, config, split, wgmma)
    if launch.split > 1:
        return None
    if lora is not None:
        starts = itertools.accumulate(ns[:-1])  # the weights' first columns of B past the first
        aligned = lora.b.data_ptr() % 8 == 0 and all(v % 4 == 0 for v in (lora.b.stride(0), lora.b.stride(1), *starts))
        if not aligned or -(-m // 8) * 8 * lora.partial.shape[-1] * 4 > FINISHED_SHRUNK_BYTES:
            return None
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    y = torch.empty(m, sum(ns), dtype=torch.bfloat16, device=x.device)
    _launch(x, parts, launch, y, lora, finish=True, residual=residual)
    return y


def _launch(
    x: torch.Tensor, parts: list[Part], launch: _Launch, out: torch.Tensor, lora: LoraEpilogue | None,
    finish: bool = False, residual: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """One launch into `out`: the fp32 sums, or with `finish` the finished bf16 projection (+ `lora`'s deltas,
    + `residual`), which the kernel takes as its `finished` too."""
    m, k = x.shape
    ns = [state.shape[0] for _, state, _ in parts]
    warps, row_tiles, group, stages, min_blocks = launch.config
    ends, split = launch.ends, launch.split
    x_tiles = -(-m // 8)
    segments = []  # each segment's weight, scales, bias and N (segment 0's again where there are fewer: never read)
    for i in range(3):
        weight, state, bias = parts[min(i, len(parts) - 1)]
        segments += [weight, state.absmax, *second_level(state), out if bias is None else bias, ns[min(i, len(ns) - 1)]]
    if lora is None:  # HAS_LORA off: its pointers are never read
        epilogue = [out, 0, 0, 0, out, 0, 0, out, out]
        r_pad = 0
    else:
        chunks_pad, r_pad = lora.partial.shape[-2:]
        partial_stride = lora.partial.stride(0) if lora.partial.dim() == 4 else 0
        epilogue = [lora.partial, lora.chunks, chunks_pad, partial_stride, lora.b, lora.b.stride(0), lora.b.stride(1),
                    lora.slots, lora.ranks]  # fmt: skip
    state, bias = parts[0][1], parts[0][2]
    device = x.device.index or 0
    kernel = _kernel(warps, row_tiles, group, stages, min_blocks, x_tiles, bool(state.nested), bias is not None,
                     len(parts), launch.wgmma, device, finish, r_pad, residual is not None)  # fmt: skip
    pdl.launch(
        kernel,
        grid=(ends[-1], split, 1),
        block=(32 * warps, 1, 1),
        args=[x, x.stride(0), m, out, out.stride(0), k, k // 64 // split, *segments, ends[0],
              ends[min(1, len(ends) - 1)], out, out.stride(0), *epilogue, out if residual is None else residual,
              0 if residual is None else residual.stride(0)],
        shared_mem=smem_bytes(warps, row_tiles, group, stages, x_tiles, launch.wgmma),
    )  # fmt: skip
