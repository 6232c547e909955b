"""NF4 layers on a CPU, made cheaper to run once at load. bitsandbytes' CPU matmul (without AVX512-BF16) first
dequantizes a layer's 8-bit scales, then its weight, then runs a dense `linear`, at every call; both
dequantizations can be done once instead, giving the same outputs."""

import logging

import torch
from bitsandbytes.functional import dequantize_blockwise
from bitsandbytes.nn import Linear4bit
from torch import nn

from loraplex.memory import available_memory

DENSE_MEMORY_SHARE = 0.25  # of a CPU's available RAM that its NF4 layers' dequantized copies may take
log = logging.getLogger("loraplex.model")


def expand_nested_scales(model: nn.Module) -> None:
    """Each double-quantized NF4 layer's scales (absmax) dequantized once, to the fp32 values bitsandbytes' CPU
    matmul computes from them at every call, as bitsandbytes does itself where it repacks weights for AVX512-BF16
    CPUs: the same outputs, and the embedded model decodes ~13% faster a token, for 3 bytes more a 64 weights."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and state.nested:
            state.absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset  # [blocks] fp32
            state.nested, state.state2, state.offset = False, None, None


class DequantizedLinear4bit(Linear4bit):
    """An NF4 layer on a CPU that multiplies by its weight dequantized once (`dense`, [out, in] in the compute
    dtype), where bitsandbytes' CPU matmul dequantizes it at every call and then runs the same `linear`: the same
    outputs, the same gradients for the layers' inputs, without writing and reading the weight in fp32 each time.
    Its NF4 codes and scales stay as they were."""

    dense: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.dense.dtype)
        return nn.functional.linear(x.to(self.dense.dtype), self.dense, bias).to(x.dtype)


def dequantize_once(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every NF4 layer of `model` (on a CPU, its scales expanded) a DequantizedLinear4bit computing in `dtype`
    where their dense copies fit in DENSE_MEMORY_SHARE of the available RAM. The embedded model's take 428 MB in
    fp32 (BENCHMARKS.md says what they save)."""
    layers = [module for module in model.modules() if type(module) is Linear4bit]
    if not layers:
        return
    need = sum(layer.out_features * layer.in_features for layer in layers) * dtype.itemsize
    if need > DENSE_MEMORY_SHARE * available_memory(torch.device("cpu")):
        log.info("NF4 layers dequantized at every matmul: their %d MB in %s would not fit", need >> 20, dtype)
        return
    for layer in layers:
        state = layer.weight.quant_state  # [out, in] codes; absmax fp32 (expand_nested_scales)
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            layer.weight.view(-1, 1), state.absmax, state.blocksize, state.quant_type, state.shape, dtype
        )  # the call bitsandbytes' CPU matmul makes at every forward
        layer.__class__ = DequantizedLinear4bit
        layer.register_buffer("dense", dense, persistent=False)
    log.info("NF4 layers dequantized once for the CPU: %d MB in %s", need >> 20, dtype)
