"""Programmatic dependent launch (PDL) of a decoder layer's kernels on sm_90+.

A kernel launched this way may start while the kernel before it in the stream is still running, once that one's
CTAs have all signalled `griddepcontrol.launch_dependents` or exited; each of these kernels signals right after
its own `griddepcontrol.wait`, which returns once the kernel before it has ended with its writes visible. Before
the wait a kernel touches only what no kernel of a step writes: the NF4 kernels (nf4_mma, nf4_wide) stream their
weights and write their decode table while the small kernel before them (a norm with its shrink, the attention,
the activation) runs; the Triton kernels only wait, having been launched already. Every thread of every such
kernel passes the wait before it exits, so each ends after the one before it, and so after all earlier work.
In a CUDA graph the launches become programmatic edges.

torch's kernel wrapper launches with cuLaunchKernel, which takes no launch attributes: this calls cuLaunchKernelEx.
"""

import ctypes
import functools
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# cuda.h: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _Attribute(ctypes.Structure):
    """CUlaunchAttribute: an id, then a 64-byte union of which this uses the first int."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _Config(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attribute)),
        ("num_attrs", ctypes.c_uint),
    ]


@functools.cache
def supported(device: int) -> bool:
    """Whether `device` runs griddepcontrol (compute capability 9.0+) and its driver has cuLaunchKernelEx."""
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return hasattr(torch.cuda._utils._get_gpu_runtime_library(), "cuLaunchKernelEx")


def options(device: torch.device) -> dict[str, bool]:
    """The launch options of a Triton kernel that calls `depend`: its PDL flag and Triton's launch as a
    programmatic dependent, both on where PDL runs (CUDA devices of compute capability 9.0+)."""
    enabled = device.type == "cuda" and supported(device.index or 0)
    return {"PDL": enabled, "launch_pdl": enabled}


@triton.jit
def depend(PDL: tl.constexpr):
    """First thing in a Triton kernel launched with `options`: it may have started while the kernel before it ran,
    so it waits for that one's writes, then lets the kernel after it start (an NF4 kernel streams its weights
    beside this one; a Triton kernel waits here in turn)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def launch(
    kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared_mem: int = 0
) -> None:
    """`kernel` (from torch.cuda._compile_kernel) on the current stream as its own call would launch it (tensors as
    their data pointers, ints as C ints), with programmatic stream serialization where `supported`."""
    device = torch.cuda.current_device()
    if not supported(device):
        kernel(grid=grid, block=block, args=args, shared_mem=shared_mem)
        return
    values = [
        ctypes.c_void_p(arg.data_ptr()) if isinstance(arg, torch.Tensor) else ctypes.c_int(arg) for arg in args
    ]  # kept alive until the launch has copied them
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    attribute = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _Config(
        grid=(ctypes.c_uint * 3)(*grid),
        block=(ctypes.c_uint * 3)(*block),
        shared_mem=shared_mem,
        stream=torch.cuda.current_stream().cuda_stream,
        attrs=ctypes.pointer(attribute),
        num_attrs=1,
    )
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {result}")
