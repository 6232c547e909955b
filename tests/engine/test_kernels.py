"""The Triton kernels of the decode step against the computations they replace: the per-row LoRA gather,
the HF RMSNorm modules, and, through the whole engine, PEFT. With CUDA they run on the device; without,
under Triton's CPU interpreter."""

import copy
import itertools

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from bitsandbytes.nn import Linear4bit
from enginekit import (
    Collector,
    greedy,
    make_engine,
    min_new_tokens_reference,
    nf4_layer,
    reference_generate,
    request,
    run_to_end,
)
from tiny import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import (
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from loraplex.basemodel import nf4_config
from server.engine import SamplingParams, multilora
from server.engine.fusions import GatedMlpShrink, NormShrink, ResidualEpilogues
from server.engine.kernels import FusedDecode
from server.engine.kernels.attention import MIN_SPLIT_POSITIONS
from server.engine.kernels.greedy import BLOCK_V, greedy_pick
from server.engine.kernels.kv_cache import write_kv
from server.engine.kernels.lora import finish_projection, lora_shrink
from server.engine.kernels.nf4 import (
    MAX_ROWS,
    FusedNf4Linear,
    LoraEpilogue,
    fuse_nf4_linears,
    nf4_dequantize,
    nf4_gemv,
    nf4_matmul,
    nf4_matmul_sums,
)
from server.engine.kernels.rmsnorm import NORMS, FusedRMSNorm
from server.engine.kernels.rope import rotary
from server.engine.kernels.segmented_lora import BLOCK_M, CHUNK_K, segment_tiles, segmented_lora
from server.engine.kernels.zeroed import ZeroedSums
from server.engine.multilora import KERNEL_TOKENS, LoraContext, MultiLoraLinear, ShrinkGroup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Whole-engine runs under Triton's CPU interpreter cost ~15-20 s each: there, the families whose modules differ
# most (gemma's norm, qwen3's q/k norms) stand for the rest, whose norms and rotary are checked one by one below.
# Llama runs in the NF4 cases; its fp32 run would take no path that qwen3's (llama's modules plus q/k norms) does not.
ENGINE_FAMILIES = FAMILIES if DEVICE == "cuda" else ("gemma", "qwen3")


@pytest.mark.parametrize(("rows", "groups"), [([2, 0, 3, 2, 1], 1), ([1], 1), ([2, 0, 3], 3)])
def test_lora_delta_matches_per_row_gather(rows, groups) -> None:
    """Shrink (for `groups` layers sharing x, as q/k/v do) then expand, against the gathered bmm per layer; each
    slot's rows past its own rank are never read (garbage in A, NaN in B there would show)."""
    torch.manual_seed(0)
    slots, rank, k, n = 3, 6, 320, 300  # K and N not multiples of the kernels' blocks, rank not a power of 2
    ranks = torch.tensor([6, 2, 5, 0], dtype=torch.int32, device=DEVICE)  # slot 3, the no-adapter one: 0
    store_a = torch.randn(slots + 1, rank, groups * k + 40, device=DEVICE)[:, :, 20 : 20 + groups * k]  # views
    store_b = torch.randn(slots + 1, rank, n + 8, device=DEVICE)[:, :, :n]  # of wider stores
    used = torch.arange(rank, device=DEVICE)[None, :] < ranks[:, None]  # [S+1, R]
    a_used, b_used = store_a * used[:, :, None], store_b * used[:, :, None]
    store_a.masked_fill_(~used[:, :, None], 1e3)
    store_b.masked_fill_(~used[:, :, None], float("nan"))
    rows = torch.tensor(rows, device=DEVICE)
    x = torch.randn(len(rows), k, device=DEVICE)
    partial, chunks = lora_shrink(x, store_a, rows, ranks[rows], groups)
    for g in range(groups):
        y = torch.randn(len(rows), n, device=DEVICE)
        a = a_used[:, :, g * k : (g + 1) * k]
        expected = y + torch.bmm(torch.bmm(x[:, None], a[rows].transpose(1, 2)), b_used[rows])[:, 0]
        base_rows = y[rows == slots].clone()
        finish_projection(y, y, LoraEpilogue(partial[g], chunks, store_b, rows, ranks[rows]))  # in place
        assert torch.allclose(y, expected, atol=1e-4, rtol=1e-4), f"layer {g}"
        assert torch.equal(y[rows == slots], base_rows)  # the no-adapter slot adds exactly nothing


@pytest.mark.parametrize(
    ("order", "runs"),
    [
        ([0] * (BLOCK_M + 8) + [1] * 3 + [3] * 5 + [2] * 20, 4),  # runs in slot order, as steps lay them out
        ([2, 0, 3, 1, 0, 2, 3] * 11, 77),  # a run a token, in no order
        ([3] * 5, 1),  # no adapter anywhere
    ],
    ids=["runs", "interleaved", "base"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_segmented_lora_matches_per_token_gather(order, runs, dtype) -> None:
    """The LoRA delta of a step past the per-row kernels, a tile of tokens sharing a slot at a time, against the
    gathered bmm; each slot's rows past its own rank are never read (1e3 in A, NaN in B there would show), and
    tokens without an adapter keep the base output's bits."""
    torch.manual_seed(0)
    slots, rank, k, n = 3, 6, CHUNK_K + 70, 300  # K over two chunks, N not a multiple of the blocks
    slot_ranks = torch.tensor([6, 2, 5, 0], dtype=torch.int32, device=DEVICE)
    store_a = torch.randn(slots + 1, rank, k + 40, device=DEVICE)[:, :, 20 : 20 + k].to(dtype)  # views of wider
    store_b = torch.randn(slots + 1, rank, n + 8, device=DEVICE)[:, :, :n].to(dtype)  # stores
    used = torch.arange(rank, device=DEVICE)[None, :] < slot_ranks[:, None]  # [S+1, R]
    a_used, b_used = store_a.float() * used[:, :, None], store_b.float() * used[:, :, None]
    store_a.masked_fill_(~used[:, :, None], 1e3)
    store_b.masked_fill_(~used[:, :, None], float("nan"))
    token_slots = torch.tensor(order, device=DEVICE)
    x = torch.randn(len(order), k, device=DEVICE).to(dtype)
    y = torch.randn(len(order), n, device=DEVICE).to(dtype)
    shrunk = torch.bmm(x.float()[:, None], a_used[token_slots].transpose(1, 2))  # [T, 1, R]
    delta = torch.bmm(shrunk.to(dtype).float(), b_used[token_slots])[:, 0]  # [T, N]
    expected = (y.float() + delta.to(dtype).float()).to(dtype)
    base_rows = y[token_slots == slots].clone()
    segmented_lora(y, x, store_a, store_b, segment_tiles(token_slots, runs), slot_ranks)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(y[token_slots == slots], base_rows)


@pytest.mark.skipif(DEVICE != "cuda", reason="a store of 2**31 elements")
def test_segmented_lora_reads_a_slot_past_2_31_elements_of_its_store() -> None:
    """64 slots of rank 64 over Llama-3-8B's seven projections hold 5e9 elements of A: a slot's offset must not
    wrap in 32 bits (it did: an illegal memory access that ended the server)."""
    k, n, slots = 2**30 + 64, 16, 3  # slot 2 starts past 2**31 elements of A (slot 3: no adapter)
    a = torch.zeros(slots + 1, 1, k, dtype=torch.bfloat16, device=DEVICE)
    b = torch.ones(slots + 1, 1, n, dtype=torch.bfloat16, device=DEVICE)
    a[2, 0, :CHUNK_K] = 1.0
    x = torch.ones(2, CHUNK_K, dtype=torch.bfloat16, device=DEVICE)
    y = torch.zeros(2, n, dtype=torch.bfloat16, device=DEVICE)
    token_slots = torch.tensor([2, 2], device=DEVICE)
    a_view = a[:, :, :CHUNK_K]  # the layer's columns of the store: its slot stride is the whole store's
    segmented_lora(
        y, x, a_view, b, segment_tiles(token_slots, 1), torch.tensor([1] * 4, dtype=torch.int32, device=DEVICE)
    )
    assert torch.equal(y, torch.full_like(y, CHUNK_K))


@pytest.mark.parametrize("order", [[5] * 70 + [1] * 33 + [2] + [3] + [4] * 32, [0, 1] * 20, [2]])
def test_segment_tiles_cover_each_token_once_in_runs_of_one_slot(order) -> None:
    """Each token in exactly one tile, of at most BLOCK_M consecutive tokens of one slot; tiles past the step's
    are empty (first == end == T), so their programs do nothing."""
    slots = torch.tensor(order)
    runs = sum(1 for i in range(len(order)) if i == 0 or order[i] != order[i - 1])
    first, end, slot = segment_tiles(slots, runs).tolist()
    tiles = [(f, e, s) for f, e, s in zip(first, end, slot, strict=True) if f < e]
    assert [t for f, e, _ in tiles for t in range(f, e)] == list(range(len(order)))
    assert all(e - f <= BLOCK_M and set(order[f:e]) == {s} for f, e, s in tiles)
    assert all(f == e == len(order) for f, e, _ in zip(first, end, slot, strict=True) if f >= e)


@pytest.mark.parametrize("lora", [False, True])
def test_a_projections_cast_delta_and_residual_take_one_launch_rounded_as_three(lora) -> None:
    """finish_projection from fp32 sums (a split-K matmul's) into a 16-bit dtype: the cast, each row's LoRA delta
    and the residual (given with a column stride, as a transposed view) are rounded as the separate steps would
    round them; a row without adapter gets exactly the cast sums plus the residual. (bf16 on CUDA; fp16 under
    Triton's CPU interpreter, whose casts to bf16 truncate.)"""
    torch.manual_seed(0)
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    slots, rank, k, n = 3, 6, 320, 300
    ranks = torch.tensor([6, 2, 5, 0], dtype=torch.int32, device=DEVICE)
    store_a = torch.randn(slots + 1, rank, k, device=DEVICE, dtype=half)
    store_b = torch.randn(slots + 1, rank, n, device=DEVICE, dtype=half)
    rows = torch.tensor([2, 0, 3, 1, 2], device=DEVICE)
    x = torch.randn(len(rows), k, device=DEVICE, dtype=half)
    sums = 30 * torch.randn(len(rows), n, device=DEVICE)  # [B, N] fp32
    residual = torch.randn(n, len(rows), device=DEVICE, dtype=half).T  # [B, N], column stride B
    expected = sums.to(half)
    epilogue = None
    if lora:
        partial, chunks = lora_shrink(x, store_a, rows, ranks[rows])
        epilogue = LoraEpilogue(partial[0], chunks, store_b, rows, ranks[rows])
        shrunk = partial[0].sum(1).to(half).float()  # [B, R_PAD]: rounded as the unfused x @ A.T
        used = torch.arange(rank, device=DEVICE)[None, :] < ranks[rows][:, None]  # [B, R]
        delta = torch.bmm((shrunk[:, :rank] * used)[:, None], store_b[rows].float())[:, 0]  # [B, N]
        expected = (expected.float() + delta).to(half)
    expected = expected + residual
    y = torch.full((len(rows), n), float("nan"), device=DEVICE, dtype=half)
    finish_projection(y, sums, epilogue, residual)
    # the delta's fp32 sum runs in another order than bmm's, so its last bit may round the other way
    assert torch.allclose(y.float(), expected.float(), rtol=2**-7, atol=0)
    exact = rows == slots if lora else torch.ones_like(rows, dtype=torch.bool)  # no delta: the same bits
    assert torch.equal(y[exact], expected[exact])


@pytest.mark.parametrize(("nested", "bias", "lora"), [(True, False, False), (False, True, False), (True, True, True)])
def test_nf4_gemv_matches_the_dequantized_weight(nested, bias, lora) -> None:
    torch.manual_seed(0)
    n, k, slots, rank = 40, 64 * 9, 3, 5  # K / 64 odd, N not a multiple of the row blocks, rank not a power of 2
    layer, dense = nf4_layer(n, k, nested, bias, DEVICE)
    weight, state = layer.weight, layer.weight.quant_state
    x = torch.randn(k, device=DEVICE)
    expected = dense @ x + (layer.bias if bias else 0)
    epilogue = None
    if lora:
        store_a = torch.randn(slots + 1, rank, k, device=DEVICE)
        store_b = torch.randn(slots + 1, rank, n, device=DEVICE)
        store_a[1, 3:], store_b[1, 3:] = 1e3, float("nan")  # past slot 1's rank 3: never read
        slot, rank_1 = torch.tensor([1], device=DEVICE), torch.tensor([3], dtype=torch.int32, device=DEVICE)
        partial, chunks = lora_shrink(x[None], store_a, slot, rank_1)
        epilogue = LoraEpilogue(partial[0], chunks, store_b, slot, rank_1)
        expected = expected + (store_a[1, :3] @ x) @ store_b[1, :3]
    got = nf4_gemv(x, weight, state, layer.bias if bias else None, epilogue)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("rows", "nested", "bias", "config"),
    # 200 rows: a step of decode tokens and prompt chunks up to MAX_ROWS; (32, 64, 3, ...): 3 programs per tile
    [(5, True, False, None), (64, False, True, None), (200, True, False, None), (17, True, True, (32, 64, 3, 1, 1))],
)
def test_nf4_matmul_matches_the_dequantized_weight(rows, nested, bias, config) -> None:
    torch.manual_seed(0)
    n, k = 40, 64 * 9
    layer, dense = nf4_layer(n, k, nested, bias, DEVICE)
    x = torch.randn(rows, k, device=DEVICE)
    expected = x @ dense.T + (layer.bias if bias else 0)
    got = nf4_matmul(x, layer.weight, layer.weight.quant_state, layer.bias if bias else None, config)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    if config is None:  # the layer takes this kernel for any [..., k] input of up to MAX_ROWS rows
        assert torch.allclose(FusedNf4Linear(layer)(x.view(rows, 1, k)), expected[:, None], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantize_gives_bitsandbytes_weight_bit_for_bit(nested, dtype) -> None:
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's CPU interpreter does not round fp32 to bf16 to nearest, as CUDA does")
    torch.manual_seed(0)
    weight = torch.randn(72, 64 * 5, dtype=dtype, device=DEVICE)  # 11,520 bytes: a program's 1,024 do not divide it
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert torch.equal(nf4_dequantize(packed, state, dtype), dequantize_4bit(packed, state))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_a_prefill_step_projects_as_bitsandbytes_does(bias) -> None:
    """Past MAX_ROWS rows the layer dequantizes in one launch, then multiplies densely: bitsandbytes' own output."""
    torch.manual_seed(0)
    layer, _ = nf4_layer(40, 64 * 9, True, bias, "cuda")
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(MAX_ROWS + 1, 64 * 9, device="cuda").bfloat16()
    assert torch.equal(FusedNf4Linear(layer)(x), layer(x))


@pytest.mark.parametrize(("nested", "bias"), [(True, False), (False, True)])
# split K in 2: two programs add into each zeroed sum, in either order alike (on CUDA too)
@pytest.mark.parametrize("config", [(16, 64, 1, 1, 1), (32, 64, 2, 1, 1)])
def test_nf4_matmul_segments_match_each_weight_alone(nested, bias, config) -> None:
    """Three weights sharing x in one launch (as q/k/v do): each weight's columns of the output are what the
    kernel gives for that weight alone, bit for bit, biases included."""
    torch.manual_seed(0)
    sizes, k, rows = (40, 24, 72), 64 * 10, 5  # not multiples of the tiles: every segment ends in a partial one
    layers = [nf4_layer(n, k, nested, bias, DEVICE)[0] for n in sizes]
    parts = [(layer.weight, layer.weight.quant_state, layer.bias) for layer in layers]
    x = torch.randn(rows, k, device=DEVICE)
    got = nf4_matmul_sums(x, parts, config)
    assert got.shape == (rows, sum(sizes))
    column = 0
    for i, (part, n) in enumerate(zip(parts, sizes, strict=True)):
        assert torch.equal(got[:, column : column + n], nf4_matmul_sums(x, [part], config)), f"weight {i}"
        column += n


def test_split_k_sums_take_zeros_that_their_reader_gives_back() -> None:
    """A split-K matmul adds into the model's zeroed buffer instead of a new zero fill; finish_projection with
    `clean` reads the sums and stores the zeros back, so the next matmul finds zeros. A view taken and never given
    back (an error between the two launches) leaves the buffer dirty: the next take fills it again."""
    torch.manual_seed(0)
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    sizes, k, rows, config = (40, 24), 64 * 10, 5, (32, 64, 2, 1, 1)  # K in two parts
    layers = [nf4_layer(n, k, True, False, DEVICE)[0] for n in sizes]
    parts = [(layer.weight, layer.weight.quant_state, layer.bias) for layer in layers]
    x = torch.randn(rows, k, device=DEVICE)
    expected = nf4_matmul_sums(x, parts, config)  # into a new zeroed tensor
    zeroed = ZeroedSums()
    for _ in range(2):  # the second matmul adds into the zeros the first reader left
        sums = nf4_matmul_sums(x, parts, config, zeroed)
        assert zeroed.holds(sums) and torch.equal(sums, expected)
        y = torch.empty(rows, sum(sizes), device=DEVICE, dtype=half)
        finish_projection(y, sums, clean=True)
        assert torch.equal(y, expected.to(half))
        assert not sums.any()
        zeroed.give_back(sums)
    zeroed.take(rows, sum(sizes), x.device).fill_(float("nan"))  # taken, dirtied, never given back
    assert torch.equal(nf4_matmul_sums(x, parts, config, zeroed), expected)
    with pytest.raises(ValueError, match="src cannot be y"):
        finish_projection(y, y, clean=True)


def test_a_shrink_group_of_up_to_64_rows_projects_its_layers_in_two_launches() -> None:
    """q/k/v-like NF4 layers in a decode step of more rows than nf4_mma takes (here: any, on the CPU): the group's
    matmul and one launch finishing it (each layer's LoRA delta from its own partial sums and B columns) give each
    member what that member's own kernels give."""
    torch.manual_seed(0)
    sizes, k, slots, rank, rows = (40, 24, 16), 64 * 3, 3, 5, 6  # layer 1 starts inside a 1024-column block
    layers = [FusedNf4Linear(nf4_layer(n, k, True, False, DEVICE)[0]) for n in sizes]
    store_a = torch.randn(slots + 1, rank, len(sizes) * k, device=DEVICE) / 8
    store_b = torch.randn(slots + 1, rank, sum(sizes), device=DEVICE) / 8
    store_a[slots], store_b[slots] = 0, 0
    slot = torch.arange(rows, device=DEVICE) % (slots + 1)
    ranks = torch.tensor([rank, 3, rank, 0], dtype=torch.int32, device=DEVICE)[slot]
    x = torch.randn(rows, 1, k, device=DEVICE)
    partial, chunks = lora_shrink(x[:, 0], store_a, slot, ranks, len(sizes))
    kernels = FusedDecode()
    assert kernels.linears(layers, x[:, 0], partial, chunks, store_b, slot, ranks) is not None  # the group's path
    group, column = ShrinkGroup(store_a, store_b, layers), 0
    for member, (layer, n) in enumerate(zip(layers, sizes, strict=True)):
        b = store_b[:, :, column : column + n]
        alone = FusedDecode.linear(layer, x[:, 0], partial[member], chunks, b, slot, ranks)
        got = group.project(member, x, slot, ranks, kernels, b)
        assert torch.allclose(got, alone, atol=1e-5, rtol=1e-5), f"member {member}"
        column += n


@pytest.mark.parametrize("norm_class", sorted(NORMS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_fused_rms_norm_matches_the_module(norm_class) -> None:
    torch.manual_seed(0)
    norm = norm_class(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 96, device=DEVICE) * 4
    assert torch.allclose(FusedRMSNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


class NoShrink(FusedDecode):
    def shrink(self, *args, **kwargs):  # type: ignore[override]
        raise AssertionError("the norm's kernel made this shrink")


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, GemmaRMSNorm], ids=lambda c: c.__name__)
def test_a_norm_and_the_shrink_of_the_layers_reading_it_run_as_one_kernel(norm_class) -> None:
    """q/k/v-like layers after a norm in a decode step: the norm's kernel also makes their shrink (the group's own
    is never called), with the norm's output and each row's LoRA delta what the unfused kernels give."""
    torch.manual_seed(0)
    d, sizes, slots, rank = 320, (40, 24, 24), 3, 6  # D not a multiple of the shrink's chunks
    norm = norm_class(d, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    fused = FusedRMSNorm(norm)
    ranks = torch.tensor([6, 2, 5, 0], dtype=torch.int32, device=DEVICE)  # slot 3, the no-adapter one: 0
    used = torch.arange(rank, device=DEVICE)[None, :] < ranks[:, None]  # [S+1, R]
    store_a = torch.randn(slots + 1, rank, 3 * d + 8, device=DEVICE)[:, :, 8:].masked_fill(~used[:, :, None], 1e3)
    store_b = torch.randn(slots + 1, rank, sum(sizes), device=DEVICE) * used[:, :, None]
    context = LoraContext(slots, rank)
    context.decode_kernels, context.slot_ranks = NoShrink(), ranks
    rows = torch.tensor([2, 0, 3, 1, 2], device=DEVICE)
    context.set(rows, None)
    bases = [torch.nn.Linear(d, n).to(DEVICE) for n in sizes]
    group = ShrinkGroup(store_a, store_b, bases)
    layers, column = [], 0
    for i, (base, n) in enumerate(zip(bases, sizes, strict=True)):
        a, b = store_a[:, :, i * d : (i + 1) * d], store_b[:, :, column : column + n]
        layers.append(MultiLoraLinear(base, d, n, a, b, context, group, i))
        column += n
    x = torch.randn(1, len(rows), d, device=DEVICE) * 4
    h = NormShrink(fused, group, context)(x)
    assert torch.equal(h, fused(x))
    for i, (layer, base) in enumerate(zip(layers, bases, strict=True)):
        a = (store_a * used[:, :, None])[:, :, i * d : (i + 1) * d][rows]  # [B, R, D]
        delta = torch.bmm(torch.bmm(h[0, :, None], a.transpose(1, 2)), layer.lora_b[rows])[:, 0]
        assert torch.allclose(layer(h)[0], base(h[0]) + delta, atol=1e-4, rtol=1e-4), f"layer {i}"


class NoDownShrink(FusedDecode):
    def __init__(self, down_in: int) -> None:
        super().__init__()
        self.down_in = down_in

    def shrink(self, x, *args, **kwargs):  # type: ignore[override]
        assert x.shape[-1] != self.down_in, "the activation's kernel made down's shrink"
        return super().shrink(x, *args, **kwargs)


def test_a_gated_mlps_activation_and_the_shrink_of_its_down_projection_run_as_one_kernel() -> None:
    """A Llama MLP whose projections are wrapped, in a decode step: silu(gate) * up and down's shrink are one
    kernel (down's group never shrinks), and the output is what the unfused layers give, each row's LoRA deltas
    on all three projections."""
    torch.manual_seed(0)
    d, inter, slots, rank = 48, 300, 3, 6  # the intermediate size not a multiple of the shrink's chunks
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=4, hidden_act="silu")).to(
        DEVICE
    )
    ranks = torch.tensor([6, 2, 5, 0], dtype=torch.int32, device=DEVICE)  # slot 3, the no-adapter one: 0
    used = torch.arange(rank, device=DEVICE)[None, :] < ranks[:, None]  # [S+1, R]
    # A columns: gate, up (one group), down; B columns: gate, up, down. Past each slot's rank: never read.
    store_a = torch.randn(slots + 1, rank, 2 * d + inter, device=DEVICE).masked_fill(~used[:, :, None], 1e3)
    store_b = torch.randn(slots + 1, rank, 2 * inter + d, device=DEVICE) * used[:, :, None]
    context = LoraContext(slots, rank)
    context.decode_kernels, context.slot_ranks = NoDownShrink(inter), ranks
    rows = torch.tensor([2, 0, 3, 1, 2], device=DEVICE)
    context.set(rows, None)
    bases = {name: getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")}
    gate_up = ShrinkGroup(store_a[:, :, : 2 * d], store_b[:, :, : 2 * inter], [bases["gate_proj"], bases["up_proj"]])
    down = ShrinkGroup(store_a[:, :, 2 * d :], store_b[:, :, 2 * inter :], [bases["down_proj"]])
    columns = {"gate_proj": (0, d, 0, inter), "up_proj": (d, 2 * d, inter, 2 * inter)}
    columns["down_proj"] = (2 * d, 2 * d + inter, 2 * inter, 2 * inter + d)
    for member, name in enumerate(("gate_proj", "up_proj", "down_proj")):
        a0, a1, b0, b1 = columns[name]
        base = bases[name]
        group, member = (down, 0) if name == "down_proj" else (gate_up, member)
        wrapped = MultiLoraLinear(base, base.in_features, base.out_features, store_a[:, :, a0:a1],
                                  store_b[:, :, b0:b1], context, group, member)  # fmt: skip
        setattr(mlp, name, wrapped)

    def reference(name: str, x: torch.Tensor) -> torch.Tensor:  # x [B, in]: base + each row's delta
        a0, a1, b0, b1 = columns[name]
        a, b = (store_a * used[:, :, None])[rows, :, a0:a1], store_b[rows, :, b0:b1]  # [B, R, in], [B, R, out]
        return bases[name](x) + torch.bmm(torch.bmm(x[:, None], a.transpose(1, 2)), b)[:, 0]

    x = torch.randn(1, len(rows), d, device=DEVICE)
    h = torch.nn.functional.silu(reference("gate_proj", x[0])) * reference("up_proj", x[0])
    got = GatedMlpShrink(mlp, down, context)(x)
    assert torch.allclose(got[0], reference("down_proj", h), atol=1e-4, rtol=1e-4)


def test_a_step_failing_inside_a_layer_leaves_no_residual_for_the_next_step() -> None:
    """A decode step with the residual epilogues fails after o_proj was handed its residual but before o_proj ran
    (the engine fails that step's requests and goes on). The next step, a wider one without the kernels, gets
    what the unwrapped layer gives: the failed step's residual is not added to its o_proj output."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, 0).to(DEVICE)
    slots, rank = 2, 4
    context = LoraContext(slots, rank)
    context.decode_kernels = FusedDecode()
    context.slot_ranks = torch.tensor([4, 2, 0], dtype=torch.int32, device=DEVICE)
    projections = []
    for holder, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
        base = getattr(holder, name)
        a = torch.randn(slots + 1, rank, base.in_features, device=DEVICE) / 4
        b = torch.randn(slots + 1, rank, base.out_features, device=DEVICE) / 4
        wrapped = MultiLoraLinear(
            base, base.in_features, base.out_features, a, b, context, ShrinkGroup(a, b, [base]), 0
        )
        setattr(holder, name, wrapped)
        projections.append(wrapped)
    fused = ResidualEpilogues(layer, *projections, context)

    def step(tokens: int) -> tuple[torch.Tensor, dict]:  # x [1, N, D] and the layer's keyword arguments
        context.set(torch.arange(tokens, device=DEVICE) % (slots + 1), None)
        angles = torch.randn(1, tokens, config.head_dim // 2, device=DEVICE)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        return torch.randn(1, tokens, config.hidden_size, device=DEVICE), {"position_embeddings": (cos, sin)}

    def fail(*args: object) -> None:
        raise RuntimeError("a failure inside the step")

    x, kwargs = step(3)
    hook = layer.self_attn.k_proj.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="inside the step"):
        fused(x, **kwargs)
    hook.remove()
    x, kwargs = step(KERNEL_TOKENS + 1)
    assert not context.use_kernels
    assert torch.allclose(fused(x, **kwargs), layer(x, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_rotary_matches_the_hf_function(dtype) -> None:
    torch.manual_seed(0)
    b, t, hq, hkv, d = 2, 3, 4, 2, 32
    q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2)  # [B, H, T, D] views, as in HF
    k = torch.randn(b, t, hkv, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    angles = torch.randn(b, t, d // 2, device=DEVICE) * 3
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    ulp = torch.finfo(dtype).eps
    for got, expected in zip(rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert got.dtype == expected.dtype
        assert torch.allclose(got.float(), expected.float(), atol=4 * ulp, rtol=2 * ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_index_assignment(dtype) -> None:
    """Both caches written in one launch, from views (as the attention gets them), at each token's row and
    position."""
    torch.manual_seed(0)
    rows, heads, seq, d, n = 4, 2, 9, 24, 5  # D not a power of 2
    k_cache, v_cache = (torch.randn(rows, heads, seq, d, device=DEVICE, dtype=dtype) for _ in range(2))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    key = torch.randn(1, heads, n, d, device=DEVICE, dtype=dtype)[0].transpose(0, 1)  # [N, H, D] views
    value = torch.randn(n, heads + 1, d, device=DEVICE, dtype=dtype)[:, 1:]
    token_rows = torch.tensor([3, 0, 3, 1, 0], device=DEVICE)
    positions = torch.tensor([8, 0, 2, 5, 1], device=DEVICE)
    expected_k[token_rows, :, positions] = key
    expected_v[token_rows, :, positions] = value
    write_kv(k_cache, v_cache, key, value, token_rows, positions)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    outside = torch.tensor([rows, 0, 3, -1, 0], device=DEVICE), torch.tensor([0, seq, -1, 0, 2**40], device=DEVICE)
    write_kv(k_cache, v_cache, key + 1, value + 1, *outside)  # rows / positions past either end: nothing written
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_gives_log_softmaxs_argmax_and_logprob(dtype) -> None:
    """Each row's first largest logit and its log_softmax value, over a vocabulary of several chunks and a partial
    last one: ties across and within chunks, a chunk masked to -inf, and rows that log_softmax makes NaN."""
    torch.manual_seed(0)
    vocab = 2 * BLOCK_V + 77
    logits = (4 * torch.randn(7, vocab + 5, device=DEVICE)).to(dtype)[:, 3 : 3 + vocab]  # rows of a wider tensor
    logits[1, [BLOCK_V + 9, 40, 2 * BLOCK_V + 1]] = 50.0  # a tie across chunks: the first index wins
    logits[2, [9, 11]] = 50.0  # within one
    logits[3, :BLOCK_V] = float("-inf")  # a grammar's mask over a whole chunk
    logits[3, -1] = 60.0  # the largest in the partial chunk
    logits[4, 5] = float("nan")
    logits[5, 3000] = float("inf")
    logits[6] = float("-inf")  # nothing allowed
    tokens, logprobs = greedy_pick(logits)
    expected = logits.float().log_softmax(-1)
    finite = [0, 1, 2, 3]
    assert tokens.dtype == torch.long and tokens[finite].tolist() == expected[finite].argmax(-1).tolist()
    assert tokens[finite].tolist()[1:] == [40, 9, vocab - 1]
    assert logprobs[finite].tolist() == pytest.approx(expected[finite, tokens[finite]].tolist(), abs=1e-5)
    assert expected[4:].isnan().any(-1).all() and logprobs[4:].isnan().all()
    assert ((tokens >= 0) & (tokens < vocab)).all()  # fed to the next step whatever the logits were


def test_min_tokens_holds_back_eos_on_the_greedy_kernel(family_setup, tokenizer) -> None:
    """An all-greedy batch takes its tokens from greedy_pick, over the logits with the rows' banned tokens: an EOS
    biased to be drawn at once comes only after min_tokens (as transformers' min_new_tokens), and beside it a row
    biased the same way without min_tokens ends at once."""
    cpu_base, adapters = family_setup("qwen3")
    base = copy.deepcopy(cpu_base).to(DEVICE)
    engine = make_engine(base, tokenizer, fused_kernels=True)
    picks = []
    pick = engine._greedy_pick
    assert pick is not None

    def recording(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picks.append(logits.shape[0])
        return pick(logits)

    engine._greedy_pick = recording
    eos, prompt = 2, [5, 6, 7]
    forced = {"max_new_tokens": 5, "logit_bias": ((eos, 100.0),)}
    sink = Collector()
    engine.submit(request(prompt, SamplingParams(**forced, min_tokens=3), adapters[1], "held"), sink)
    engine.submit(request(prompt, SamplingParams(**forced), None, "free"), sink)
    run_to_end(engine)
    assert picks and max(picks) == 2  # both rows drew in one greedy_pick
    assert sink.tokens("held") == min_new_tokens_reference(base, adapters[1], prompt, 5, eos, 3)
    assert len(sink.tokens("held")) == 4 and sink.finish("held") == "stop"
    assert sink.tokens("free") == [eos] and sink.finish("free") == "stop"


def nf4_llama(tmp_path) -> torch.nn.Module:
    """The same seed-0 tiny llama as save_tiny (so the family's adapters fit), loaded in NF4."""
    load = dict(quantization_config=nf4_config(torch.float32), dtype=torch.float32, device_map={"": DEVICE})
    return AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "llama", "llama"), **load).eval()


@pytest.mark.parametrize(
    ("family", "nf4", "alone"),
    [*((f, False, False) for f in ENGINE_FAMILIES), ("llama", True, False), ("llama", True, True)],
)
def test_engine_with_kernels_matches_peft(family, nf4, alone, tmp_path, family_setup, tokenizer, monkeypatch) -> None:
    """A mixed batch, or (`alone`) each request on its own: NF4 decode steps of one row run the fused GEMV, of
    several the NF4 matmul; the decoder layers' residual adds go to o_proj's and down_proj's kernels."""
    handed = []  # per projection call of a decode step: whether it was handed a residual to add
    linear = FusedDecode.linear

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        handed.append(args[7] is not None if len(args) > 7 else kwargs.get("residual") is not None)
        return linear(*args, **kwargs)

    monkeypatch.setattr(FusedDecode, "linear", staticmethod(recording))
    shrunk = []  # the A stores of the shrinks no other kernel made
    shrink = FusedDecode.shrink

    def recording_shrink(x, a, *args):  # type: ignore[no-untyped-def]
        shrunk.append(a.data_ptr())
        return shrink(x, a, *args)

    monkeypatch.setattr(FusedDecode, "shrink", staticmethod(recording_shrink))
    cpu_base, adapters = family_setup(family)
    base = nf4_llama(tmp_path) if nf4 else copy.deepcopy(cpu_base).to(DEVICE)
    # a cache long enough that decode steps split their KV ranges (choose_config): the merge makes o_proj's shrink
    engine = make_engine(base, tokenizer, fused_kernels=True, max_seq_len=4 * MIN_SPLIT_POSITIONS)
    assert any(isinstance(m, FusedRMSNorm) for m in engine.model.modules())
    assert any(isinstance(m, NormShrink) for m in engine.model.modules())
    assert any(isinstance(m, GatedMlpShrink) for m in engine.model.modules())
    assert any(isinstance(m, ResidualEpilogues) for m in engine.model.modules())
    assert any(isinstance(m, FusedNf4Linear) for m in engine.model.modules()) == nf4
    # alone: the adapter on every projection and a base row suffice to prove the one-row GEMV and its LoRA epilogue
    rows = [adapters[1], None] if alone else [*adapters, None]
    # three tokens a row: the mixed batch's prompts (15 tokens) still prefill in one multi-row step; under the
    # interpreter each token of a step is a program of the LoRA kernels, so short prompts keep the runs short.
    # Four new tokens: the prefill's and three decode steps, the last two reading keys and values that earlier
    # decode steps wrote; every step past the first is the same launches again (~6 s each under the interpreter).
    prompt = tokenizer("fu")["input_ids"]
    sink = Collector()
    for i, adapter in enumerate(rows):
        engine.submit(request([*prompt, 3 + i], greedy(4), adapter, f"r{i}"), sink)
        if alone:
            run_to_end(engine)
    run_to_end(engine)
    assert any(handed)  # o_proj and down_proj take one
    o_projs = [m for name, m in engine.model.named_modules() if name.endswith("o_proj") and hasattr(m, "group")]
    assert o_projs and not {m.group.a.data_ptr() for m in o_projs} & set(shrunk)  # the attention's merge made them
    for i, adapter in enumerate(rows):
        tokens, logprobs = reference_generate(base, adapter, [*prompt, 3 + i], 4)
        assert sink.tokens(f"r{i}") == tokens, f"row {i}"
        # NF4: bitsandbytes' kernels round differently for different batch shapes (~1e-3); tokens must agree
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-2 if nf4 else 1e-4)


def test_only_nf4_layers_the_gemv_reads_are_swapped() -> None:
    model = torch.nn.Sequential(
        Linear4bit(128, 32, quant_type="nf4", compute_dtype=torch.float32),
        Linear4bit(128, 32, quant_type="fp4", compute_dtype=torch.float32),  # another code book
        Linear4bit(96, 32, quant_type="nf4", compute_dtype=torch.float32),  # K not a multiple of the block
        torch.nn.Linear(128, 32),
    ).to(DEVICE)
    for layer, k in zip(model, (128, 128, 96, 128), strict=True):
        layer(torch.zeros(1, k, device=DEVICE))  # on the CPU the first forward quantizes
    fuse_nf4_linears(model)
    assert [type(layer).__name__ for layer in model] == ["FusedNf4Linear", "Linear4bit", "Linear4bit", "Linear"]


def test_each_nf4_layer_looks_ahead_to_the_layer_a_step_runs_after_it(tmp_path) -> None:
    """Every NF4 layer's `ahead` is the weight of the one the model runs next (a launch of several, q/k/v or
    gate/up, takes its last layer's: the next launch's); the last layer's is none."""
    model = nf4_llama(tmp_path)
    fuse_nf4_linears(model)
    called = []  # the fused layers in the order a forward runs them
    for layer in model.modules():
        if isinstance(layer, FusedNf4Linear):
            layer.register_forward_pre_hook(lambda layer, _: called.append(layer))
    with torch.no_grad():
        model(torch.zeros(1, MAX_ROWS + 1, dtype=torch.long, device=DEVICE))  # bitsandbytes' matmul past MAX_ROWS
    assert len(called) == 7 * model.config.num_hidden_layers
    for layer, after in itertools.pairwise(called):
        assert layer.ahead is not None and layer.ahead[0] is after.base.weight
    assert called[-1].ahead is None


def test_engine_steps_past_the_per_row_kernels_match_peft(tmp_path, family_setup, tokenizer, monkeypatch) -> None:
    """A step wider than the per-row kernels (KERNEL_TOKENS lowered, so that the batch's prefill is one) takes the
    segmented kernels: runs of three adapters and base tokens in one tile of tokens give PEFT's answers. Submitted
    out of slot order, the step still lays each slot's tokens out as one run, which the tiles' bound assumes: every
    token is in a tile."""
    monkeypatch.setattr(multilora, "KERNEL_TOKENS", 8)
    widths = []
    segmented = FusedDecode.segmented

    def recording(y, x, a, b, tiles, slot_ranks):  # type: ignore[no-untyped-def]
        widths.append(y.shape[0])
        first, end = tiles[0], tiles[1]
        assert int((end - first).sum()) == y.shape[0], "a token in no tile"
        return segmented(y, x, a, b, tiles, slot_ranks)

    monkeypatch.setattr(FusedDecode, "segmented", staticmethod(recording))
    _, adapters = family_setup("llama")
    base = nf4_llama(tmp_path)
    # eager steps: the recording reads each step's tiles, which a graph's capture holds only on the device
    engine = make_engine(base, tokenizer, fused_kernels=True, max_prefill_tokens=32, cuda_graphs=False)
    rows = [None, *reversed(adapters)]
    sink = Collector()
    for i, adapter in enumerate(rows):
        engine.submit(request([5, 6, 3 + i], greedy(4), adapter, f"r{i}"), sink)
    run_to_end(engine)
    assert widths and max(widths) >= 3 * len(rows)  # the prefill of every row in one step (padded where captured)
    for i, adapter in enumerate(rows):
        tokens, logprobs = reference_generate(base, adapter, [5, 6, 3 + i], 4)
        assert sink.tokens(f"r{i}") == tokens, f"row {i}"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-2)
