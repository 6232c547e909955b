"""CUDA only: nf4_wide, the NF4 tensor-core kernel for steps of up to 64 rows, against the dequantized weight (with
a bias, K split over CTAs, weights sharing x in one launch), with mma.sync and (compute capability 9.0) wgmma, and
the NF4 matmul taking it for bf16 rows."""

import pytest
import torch
from enginekit import nf4_layer

from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.lora import finish_projection
from server.engine.kernels.nf4 import nf4_matmul, nf4_matmul_sums
from server.engine.kernels.nf4_wide import WIDE_ROWS, available, nf4_wide_finished, nf4_wide_sums, wgmma_runs

pytestmark = pytest.mark.gpu
N, K = 72, 64 * 24  # N not a multiple of a CTA's rows; K's 24 blocks split in 1-4 parts of steps of 1-4 blocks
K_TWO_PARTS = 64 * 12  # split in two parts by the launcher: the sums add in either order alike


@pytest.fixture(params=[False, True], ids=["mma_sync", "wgmma"])
def wgmma(request) -> bool:
    """The products' instruction: mma.sync everywhere, wgmma where the device has it."""
    if request.param and not wgmma_runs(torch.cuda.current_device()):
        pytest.skip("wgmma needs compute capability 9.0")
    return request.param


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within the rounding of the scaled weights (nf4_wide's, the Triton matmul's) or of the output to bf16."""
    return torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 7, 33, WIDE_ROWS])
@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
# (warps, 16-row weight tiles a warp, blocks a step, steps in flight, CTAs an SM), parts of K
@pytest.mark.parametrize(
    ("config", "split"), [((8, 2, 2, 4, 1), 1), ((4, 1, 1, 3, 1), 4), ((8, 1, 4, 3, 1), 2), ((16, 1, 2, 3, 1), 2)]
)
def test_nf4_wide_matches_the_dequantized_weight(rows, nested, bias, config, split, wgmma) -> None:
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K, nested, bias, "cuda")
    x = torch.randn(rows, K, device="cuda").bfloat16()
    b = layer.bias.bfloat16() if bias else None
    expected = x.float() @ dense.T + (b.float() if bias else 0)
    got = nf4_wide_sums(x, [(layer.weight, layer.weight.quant_state, b)], config, split, wgmma)
    assert got.dtype == torch.float32 and close(got, expected)


def test_wgmma_and_mma_sync_give_the_same_sums() -> None:
    """The two builds multiply the same bf16 weights (scaled alike) and x; only the order of their fp32 adds
    differs."""
    if not wgmma_runs(torch.cuda.current_device()):
        pytest.skip("wgmma needs compute capability 9.0")
    torch.manual_seed(0)
    layer, _ = nf4_layer(N, K, True, False, "cuda")
    x = torch.randn(WIDE_ROWS, K, device="cuda").bfloat16()
    part = [(layer.weight, layer.weight.quant_state, None)]
    sync, async_ = (nf4_wide_sums(x, part, (8, 2, 2, 3, 1), 1, wgmma) for wgmma in (False, True))
    assert torch.allclose(sync, async_, rtol=1e-4, atol=1e-4 * sync.abs().max().item())


def test_wgmma_takes_only_configurations_that_fit_it() -> None:
    layer, _ = nf4_layer(N, K, True, False, "cuda")
    x = torch.randn(8, K, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="wgmma takes whole warpgroups"):
        nf4_wide_sums(x, [(layer.weight, layer.weight.quant_state, None)], (8, 1, 4, 2, 1), 2, wgmma=True)


@pytest.mark.parametrize("rows", [5, WIDE_ROWS])
@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
def test_nf4_wide_segments_match_each_weight_alone(rows, nested, bias, wgmma) -> None:
    """Three weights sharing x in one launch (as q/k/v do), K in two parts (their sums add in either order
    alike): each weight's columns are what nf4_wide gives for that weight alone, bit for bit."""
    torch.manual_seed(0)
    sizes = (72, 40, 24)  # not multiples of a CTA's rows: every segment ends in a partial tile
    layers = [nf4_layer(n, K, nested, bias, "cuda")[0] for n in sizes]
    parts = [(layer.weight, layer.weight.quant_state, layer.bias.bfloat16() if bias else None) for layer in layers]
    x = torch.randn(rows, K, device="cuda").bfloat16()
    config = (4, 1, 2, 3, 1)
    got = nf4_wide_sums(x, parts, config, 2, wgmma)
    assert got.shape == (rows, sum(sizes))
    column = 0
    for i, (part, n) in enumerate(zip(parts, sizes, strict=True)):
        assert torch.equal(got[:, column : column + n], nf4_wide_sums(x, [part], config, 2, wgmma)), f"weight {i}"
        column += n


@pytest.mark.parametrize(
    ("rows", "sizes", "k", "split"),
    [
        (17, (72, 40), K, 1),  # gate/up: two weights
        (WIDE_ROWS, (72, 40, 24), K, 1),  # q/k/v: three
        (33, (72,), K, 1),  # o/down: one, with the residual
        (32, (14336, 14336), 4096, None),  # gate/up of Llama-3-8B: the launcher takes K in one part
    ],
)
@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
def test_nf4_wide_finishes_a_projection_as_finish_projection_does(rows, sizes, k, split, nested, bias, wgmma) -> None:
    """Weights sharing x, each row's LoRA delta (and, for one weight, the residual) added in the epilogue: the bf16
    outputs finish_projection makes of nf4_wide's sums, within a rounding (the delta's products add in another
    order). Rows of ranks 0 to R; no B row past a slot's rank (NaN there) and no chunk past the shrink's (NaN) is
    read. With K in parts there is nothing to finish from (the sums' own launch and finish_projection run)."""
    torch.manual_seed(0)
    layers = [nf4_layer(n, k, nested, bias, "cuda")[0] for n in sizes]
    parts = [(layer.weight, layer.weight.quant_state, layer.bias.bfloat16() if bias else None) for layer in layers]
    rank, chunks = 16, 3
    slot_ranks = torch.tensor([16, 5, 9, 0], dtype=torch.int32, device="cuda")  # the last: no adapter
    slots = torch.randint(0, 4, (rows,), device="cuda")
    ranks = slot_ranks[slots]
    b = 0.05 * torch.randn(4, rank, sum(sizes) + 8, device="cuda").bfloat16()[:, :, 4 : 4 + sum(sizes)]  # a view
    b[torch.arange(rank, device="cuda")[None, :] >= slot_ranks[:, None]] = float("nan")
    partial = torch.randn(len(sizes), rows, 4, rank, device="cuda")
    partial.masked_fill_(torch.arange(rank, device="cuda") >= ranks[None, :, None, None], 0.0)  # as the shrink does
    partial[:, :, chunks:] = float("nan")
    lora = LoraEpilogue(partial if len(sizes) > 1 else partial[0], chunks, b, slots, ranks)
    residual = torch.randn(rows, sizes[0], device="cuda").bfloat16() if len(sizes) == 1 else None
    x = torch.randn(rows, k, device="cuda").bfloat16()
    got = nf4_wide_finished(x, parts, lora, residual, split=split, wgmma=wgmma)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, sum(sizes))
    expected = torch.empty_like(got)
    finish_projection(expected, nf4_wide_sums(x, parts, split=1, wgmma=wgmma), lora, residual, list(sizes))
    assert not got.isnan().any()
    scale = expected.float().abs().max().item()
    assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=2**-8 * scale)
    assert nf4_wide_finished(x, parts, lora, residual, split=2, wgmma=wgmma) is None


def test_x_rows_need_not_be_contiguous_and_rows_past_m_add_nothing() -> None:
    """x as a view of wider rows (the engine's normed activations can be); the sums tensor's rows are exactly m."""
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K, True, False, "cuda")
    wide = torch.randn(40, K + 64, device="cuda").bfloat16()
    x = wide[:, 64:]  # rows 16-byte aligned, stride K + 64
    assert available(x, [(layer.weight, layer.weight.quant_state, None)])
    got = nf4_wide_sums(x, [(layer.weight, layer.weight.quant_state, None)])
    assert got.shape == (40, N) and close(got, x.float() @ dense.T)


def test_the_matmul_takes_nf4_wide_where_it_runs_and_the_triton_kernel_elsewhere() -> None:
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K_TWO_PARTS, True, False, "cuda")
    odd, odd_dense = nf4_layer(N - 2, K_TWO_PARTS, True, False, "cuda")  # N not a multiple of 4: nf4_wide does not run
    for rows in (33, WIDE_ROWS, WIDE_ROWS + 1):
        x = torch.randn(rows, K_TWO_PARTS, device="cuda").bfloat16()
        part = (layer.weight, layer.weight.quant_state, None)
        assert available(x, [part]) == (rows <= WIDE_ROWS)
        if rows <= WIDE_ROWS:
            assert torch.equal(nf4_matmul_sums(x, [part]), nf4_wide_sums(x, [part]))
        assert close(nf4_matmul(x, layer.weight, layer.weight.quant_state), x.float() @ dense.T)
        assert not available(x, [(odd.weight, odd.weight.quant_state, None)])
        assert close(nf4_matmul(x, odd.weight, odd.weight.quant_state), x.float() @ odd_dense.T)
