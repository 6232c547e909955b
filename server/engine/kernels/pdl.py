"""Programmatic dependent launch (PDL) of the NVRTC kernels (nf4_mma, nf4_wide) on sm_90+.

A kernel launched this way may start while the kernel before it in the stream is still running, once that one's
CTAs have all signalled `griddepcontrol.launch_dependents` (the Triton kernels of a decoder layer do at their
start) or exited. Before its `griddepcontrol.wait` it touches only what no kernel of the step writes (its NF4
weights and scales, its decode table): the weights stream while the small kernel before it (a norm with its
shrink, the attention, the activation) runs, where a plain launch began them only after that kernel's last CTA had
ended. In a CUDA graph the launch becomes a programmatic edge.

torch's kernel wrapper launches with cuLaunchKernel, which takes no launch attributes: this calls cuLaunchKernelEx.
"""

import ctypes
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

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


def triggers(device: torch.device) -> bool:
    """Whether Triton kernels on `device` signal their dependents (`start_dependents`): where PDL runs."""
    return device.type == "cuda" and supported(device.index or 0)


@triton.jit
def start_dependents(ENABLED: tl.constexpr):
    """Lets a programmatic dependent of this kernel (an NF4 kernel after it) start once every program has come here:
    called first thing, so that its weights stream beside this kernel. It waits for this kernel's writes itself."""
    if ENABLED:
        gdc_launch_dependents()


def launch(
    kernel: object, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared_mem: int = 0
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
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)  # type: ignore[attr-defined]
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {result}")
