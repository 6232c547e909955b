"""CUDA only: the fused NF4 matmul gives what bitsandbytes' Linear4bit gives, for the row counts it serves."""

import pytest
import torch

from server.engine.nf4 import MAX_ROWS, fused_nf4, nf4_matmul

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 256), (4096, 448), (200, 14336)])
def test_fused_nf4_matches_bitsandbytes(dtype, shape) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    n, k = shape
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    layer = layer.cuda()
    weight = fused_nf4(layer)
    assert weight is not None
    for m in (2, 7, 32, MAX_ROWS):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        expected = layer(x).float()
        got = nf4_matmul(x, weight).float()
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()), m
