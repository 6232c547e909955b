"""CUDA only: nf4_mma, the NF4 tensor-core kernel in CUDA, against the dequantized weight (with a bias and each
row's LoRA delta), and the NF4 layer taking it for up to mma_rows bf16 rows."""

import pytest
import torch
from enginekit import nf4_layer

from server.engine.kernels import FusedDecode
from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.lora import lora_shrink
from server.engine.kernels.nf4 import FusedNf4Linear, nf4_matmul
from server.engine.kernels.nf4_mma import MMA_ROWS, Nf4Segments, nf4_mma, nf4_mma_segments
from server.engine.kernels.nf4_wide import mma_rows, wgmma_runs
from server.engine.multilora import ShrinkGroup

pytestmark = pytest.mark.gpu
N, K = 72, 64 * 12  # N not a multiple of the 16-row tiles; K / 64 splits over 4 warps of 3 blocks (no group of 4)
# (16-row weight tiles a CTA, most warps, most blocks a group, groups staged, CTAs an SM must fit by registers, table
# entry bytes): the launcher's for 1 and 16 rows, then K's groups split unevenly over the warps (6 of 2 blocks over 4,
# 12 of 1 over 8, 3 of 4 over 2), five stages
CONFIGS = [(1, 8, 4, 2, 2, 256), (2, 4, 4, 2, 2, 128), (2, 8, 2, 3, 1, 256), (1, 8, 1, 2, 2, 128), (1, 4, 4, 5, 1, 256)]


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within bf16 rounding of the output (x is bf16; products and sums are fp32 in both)."""
    return torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])
@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
@pytest.mark.parametrize("config", CONFIGS)
def test_nf4_mma_matches_the_dequantized_weight(rows, nested, bias, config) -> None:
    """Also with one CTA taking every tile in turn: the same bits as a CTA a tile (each output's sums are made in
    the same order whichever CTA makes them)."""
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K, nested, bias, "cuda")
    x = torch.randn(rows, K, device="cuda").bfloat16()
    expected = x.float() @ dense.T + (layer.bias if bias else 0)
    b = layer.bias.bfloat16() if bias else None
    got = nf4_mma(x, layer.weight, layer.weight.quant_state, b, None, config)
    assert close(got, expected)
    assert torch.equal(got, nf4_mma(x, layer.weight, layer.weight.quant_state, b, None, config, ctas=1))


@pytest.mark.parametrize("rows", [1, 5, 16, 32])
# column 0: B rows 16-byte aligned, copied into shared memory a tile ahead; column 1: read in the epilogue
@pytest.mark.parametrize("column", [0, 1])
# a CTA a tile; two CTAs taking three tiles each in turn (B rows in both buffers)
@pytest.mark.parametrize("ctas", [None, 2])
def test_nf4_mma_adds_each_rows_lora_delta(rows, column, ctas) -> None:
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K, True, False, "cuda")
    slots, rank = 3, 5  # rank not a power of 2; the last slot is the no-adapter one
    store_a = (torch.randn(slots + 1, rank, K, device="cuda") / 8).bfloat16()
    store = (torch.randn(slots + 1, rank, N + 8, device="cuda") / 8).bfloat16()
    store_b = store[:, :, column : column + N]  # a wider store's view, as the engine's layers are
    store_a[slots], store_b[slots] = 0, 0
    ranks = torch.tensor([5, 3, 5, 0], dtype=torch.int32, device="cuda")
    store_a[1, 3:], store_b[1, 3:] = 1e3, float("nan")  # past slot 1's rank: never read
    slot = torch.arange(rows, device="cuda") % (slots + 1)
    x = torch.randn(rows, K, device="cuda").bfloat16()
    partial, chunks = lora_shrink(x, store_a, slot, ranks[slot])
    epilogue = LoraEpilogue(partial[0], chunks, store_b, slot, ranks[slot])
    got = nf4_mma(x, layer.weight, layer.weight.quant_state, None, epilogue, ctas=ctas)
    store_a[1, 3:], store_b[1, 3:] = 0, 0  # what slot 1 holds
    shrunk = torch.einsum("bk,brk->br", x.float(), store_a[slot].float())
    expected = x.float() @ dense.T + torch.einsum("br,brn->bn", shrunk, store_b[slot].float())
    assert close(got, expected)
    base = nf4_mma(x, layer.weight, layer.weight.quant_state)
    assert torch.equal(got[slot == slots], base[slot == slots])  # the no-adapter slot adds exactly nothing


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("config", CONFIGS[:3])
def test_nf4_mma_epilogues_agree_bit_for_bit(rows, config) -> None:
    """The same B values as a 16-byte aligned view (copied into shared memory, eight outputs a thread) and as an
    unaligned one (read from global memory, an output a thread), with a bias: the same bits."""
    torch.manual_seed(0)
    layer, _ = nf4_layer(N, K, True, True, "cuda")
    slots, rank = 3, 5
    store_a = (torch.randn(slots + 1, rank, K, device="cuda") / 8).bfloat16()
    values = (torch.randn(slots + 1, rank, N, device="cuda") / 8).bfloat16()
    wide = torch.zeros(2, slots + 1, rank, N + 8, dtype=torch.bfloat16, device="cuda")
    wide[0, :, :, :N], wide[1, :, :, 1 : N + 1] = values, values
    slot = torch.arange(rows, device="cuda") % (slots + 1)
    ranks = torch.tensor([5, 3, 5, 0], dtype=torch.int32, device="cuda")[slot]
    x = torch.randn(rows, K, device="cuda").bfloat16()
    partial, chunks = lora_shrink(x, store_a, slot, ranks)
    bias = layer.bias.bfloat16()
    aligned, unaligned = (
        LoraEpilogue(partial[0], chunks, b, slot, ranks) for b in (wide[0, :, :, :N], wide[1, :, :, 1 : N + 1])
    )
    got = nf4_mma(x, layer.weight, layer.weight.quant_state, bias, aligned, config)
    assert torch.equal(got, nf4_mma(x, layer.weight, layer.weight.quant_state, bias, unaligned, config))
    assert torch.equal(got, nf4_mma(x, layer.weight, layer.weight.quant_state, bias, aligned, config, ctas=2))


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
@pytest.mark.parametrize("config", CONFIGS)
def test_nf4_mma_segments_match_each_weight_alone(rows, nested, bias, config) -> None:
    """Three weights sharing x in one launch (as q/k/v do), each row's LoRA delta from its own A and B: each
    weight's columns of the output are what nf4_mma gives for that weight alone, bit for bit; also where one CTA
    takes every tile of all three in turn."""
    torch.manual_seed(0)
    sizes = (72, 40, 24)  # not multiples of a CTA's rows: every segment ends in a partial tile
    layers = [nf4_layer(n, K, nested, bias, "cuda")[0] for n in sizes]
    parts = [(layer.weight, layer.weight.quant_state, layer.bias.bfloat16() if bias else None) for layer in layers]
    segments = Nf4Segments(parts)
    assert segments.supported()
    slots, rank, width = 3, 5, sum(sizes)
    store_a = (torch.randn(slots + 1, rank, len(sizes) * K, device="cuda") / 8).bfloat16()
    store_b = (torch.randn(slots + 1, rank, width + 8, device="cuda") / 8).bfloat16()[:, :, :width]
    store_a[slots], store_b[slots] = 0, 0
    slot = torch.arange(rows, device="cuda") % (slots + 1)
    ranks = torch.tensor([5, 3, 5, 0], dtype=torch.int32, device="cuda")[slot]
    x = torch.randn(rows, K, device="cuda").bfloat16()
    partial, chunks = lora_shrink(x, store_a, slot, ranks, len(sizes))
    epilogue = LoraEpilogue(partial, chunks, store_b, slot, ranks)
    got = nf4_mma_segments(x, segments, epilogue, config)
    assert got.shape == (rows, width)
    assert torch.equal(got, nf4_mma_segments(x, segments, epilogue, config, ctas=1))
    column = 0
    for i, ((weight, state, b), n) in enumerate(zip(parts, sizes, strict=True)):
        lora = LoraEpilogue(partial[i], chunks, store_b[:, :, column : column + n], slot, ranks)
        assert torch.equal(got[:, column : column + n], nf4_mma(x, weight, state, b, lora, config)), f"weight {i}"
        column += n


@pytest.mark.parametrize("rows", [1, 16])
def test_a_launch_looking_ahead_gives_the_same_bits(rows) -> None:
    """Given the next launch's weight (one larger than the bytes asked of L2, one smaller), nf4_mma and its
    segments give the same bits as without: the look-ahead only asks L2 for bytes."""
    torch.manual_seed(0)
    layers = [nf4_layer(n, K, True, False, "cuda")[0] for n in (72, 40)]
    parts = [(layer.weight, layer.weight.quant_state, None) for layer in layers]
    large = nf4_layer(4096, 4096, True, False, "cuda")[0]  # 8 MB of codes: past AHEAD_BYTES
    x = torch.randn(rows, K, device="cuda").bfloat16()
    alone, together = nf4_mma(x, *parts[0][:2]), nf4_mma_segments(x, Nf4Segments(parts))
    for ahead in ((large.weight, large.weight.quant_state, None), parts[1]):
        assert torch.equal(nf4_mma(x, *parts[0][:2], ahead=ahead), alone)
        assert torch.equal(nf4_mma_segments(x, Nf4Segments(parts), ahead=ahead), together)


@pytest.mark.parametrize("rows", [1, 16, MMA_ROWS + 8, 200])
def test_a_shrink_group_projects_all_its_layers_in_one_launch(rows) -> None:
    """q/k/v-like bf16 NF4 layers in a step of up to MAX_ROWS tokens: the group's one launch (nf4_mma's; past
    mma_rows nf4_wide's or the Triton matmul's, then one launch finishing it) gives each member exactly the output
    that member's own kernels give (LoRA delta included; at 40 rows K is split in 2, whose sums add in either order
    alike)."""
    torch.manual_seed(0)
    sizes, slots, rank = (64, 32, 32), 3, 4
    layers = []
    for n in sizes:
        layer = nf4_layer(n, K, True, False, "cuda")[0]
        layer.compute_dtype = torch.bfloat16  # the engine's
        layers.append(FusedNf4Linear(layer))
    store_a = (torch.randn(slots + 1, rank, len(sizes) * K, device="cuda") / 8).bfloat16()
    store_b = (torch.randn(slots + 1, rank, sum(sizes), device="cuda") / 8).bfloat16()
    store_a[slots], store_b[slots] = 0, 0
    group, kernels = ShrinkGroup(store_a, store_b, layers), FusedDecode()
    slot = torch.arange(rows, device="cuda") % (slots + 1)
    ranks = torch.tensor([rank, rank, rank, 0], dtype=torch.int32, device="cuda")[slot]
    x = torch.randn(rows, 1, K, device="cuda").bfloat16()
    partial, chunks = lora_shrink(x[:, 0], store_a, slot, ranks, len(sizes))
    column = 0
    for member, (layer, n) in enumerate(zip(layers, sizes, strict=True)):
        b = store_b[:, :, column : column + n]
        alone = FusedDecode.linear(layer, x[:, 0], partial[member], chunks, b, slot, ranks)
        got = group.project(member, x, slot, ranks, kernels, b)
        if rows <= 64:
            assert torch.equal(got, alone), f"member {member}"
        else:  # 4 programs of split K add into each sum in any order: a last bit may differ from call to call
            assert close(got, alone.float()), f"member {member}"
        column += n
    assert kernels.linears(layers, x[:, 0], partial, chunks, store_b, slot, ranks) is not None  # one launch


def test_the_layer_takes_nf4_mma_for_few_bf16_rows() -> None:
    """Up to mma_rows rows (16 where nf4_wide has wgmma, MMA_ROWS elsewhere), then nf4_wide's sums."""
    torch.manual_seed(0)
    layer, _ = nf4_layer(N, K, True, False, "cuda")
    layer.compute_dtype = torch.bfloat16  # the engine's: the kernel computes in bf16 only
    fused = FusedNf4Linear(layer)
    state = layer.weight.quant_state
    most = mma_rows(torch.cuda.current_device())
    assert most == (16 if wgmma_runs(torch.cuda.current_device()) else MMA_ROWS)
    for rows in (1, most, most + 1, MMA_ROWS + 1):
        x = torch.randn(rows, K, device="cuda").bfloat16()
        kernel = nf4_mma if rows <= most else nf4_matmul
        assert torch.equal(fused(x), kernel(x, layer.weight, state))


def test_the_layer_leaves_ranks_whose_activations_do_not_fit_to_the_triton_kernels() -> None:
    """Rank 256: for 16 rows the shrunk activations (16 KB) do not fit beside the table, so the Triton matmul and
    the expand add the delta instead (for 1 row, 8 KB, nf4_mma still does); the layer's answers are right."""
    torch.manual_seed(0)
    layer, dense = nf4_layer(N, K, True, False, "cuda")
    layer.compute_dtype = torch.bfloat16
    fused = FusedNf4Linear(layer)
    rank = 256
    store_a = (torch.randn(2, rank, K, device="cuda") / 32).bfloat16()
    store_b = (torch.randn(2, rank, N, device="cuda") / 32).bfloat16()
    for rows in (1, MMA_ROWS):
        x = torch.randn(rows, K, device="cuda").bfloat16()
        slot = torch.zeros(rows, dtype=torch.long, device="cuda")
        ranks = torch.full((rows,), rank, dtype=torch.int32, device="cuda")
        partial, chunks = lora_shrink(x, store_a, slot, ranks)
        got = fused.project(x, LoraEpilogue(partial[0], chunks, store_b, slot, ranks))
        shrunk = torch.einsum("bk,brk->br", x.float(), store_a[slot].float())
        expected = x.float() @ dense.T + torch.einsum("br,brn->bn", shrunk, store_b[slot].float())
        assert close(got, expected)


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize(("lora", "column"), [(False, 0), (True, 0), (True, 1)])  # column 1: B read in the epilogue
def test_nf4_mma_adds_a_residual_as_the_layer_after_it_would(rows, lora, column) -> None:
    """A decoder layer's residual add made in the epilogue (o_proj, down_proj): the bits of residual + the
    kernel's own rounded output, with or without each row's LoRA delta, by either epilogue."""
    torch.manual_seed(0)
    layer, _ = nf4_layer(N, K, True, True, "cuda")
    weight, state, bias = layer.weight, layer.weight.quant_state, layer.bias.bfloat16()
    x = torch.randn(rows, K, device="cuda").bfloat16()
    residual = (torch.randn(rows, N + 8, device="cuda") * 4).bfloat16()[:, 8:]  # a view with its own row stride
    epilogue = None
    if lora:
        slots, rank = 3, 5
        store_a = (torch.randn(slots + 1, rank, K, device="cuda") / 8).bfloat16()
        store_b = (torch.randn(slots + 1, rank, N + 8, device="cuda") / 8).bfloat16()[:, :, column : column + N]
        slot = torch.arange(rows, device="cuda") % (slots + 1)
        ranks = torch.tensor([5, 3, 5, 0], dtype=torch.int32, device="cuda")[slot]
        partial, chunks = lora_shrink(x, store_a, slot, ranks)
        epilogue = LoraEpilogue(partial[0], chunks, store_b, slot, ranks)
    alone = nf4_mma(x, weight, state, bias, epilogue)
    got = nf4_mma(x, weight, state, bias, epilogue, residual=residual)
    assert torch.equal(got, residual + alone)
