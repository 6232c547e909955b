"""The Triton kernels of the decode step against the computations they replace: bitsandbytes' dequantize +
matmul, the per-row LoRA gather, the HF RMSNorm modules, and, through the whole engine, PEFT.

With CUDA they run on the device; without, under Triton's CPU interpreter (fp32 there: the interpreter's
bf16 is not faithful, so the bf16 checks are GPU-only).
"""

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end
from tiny import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM

from loraplex.basemodel import nf4_config
from server.engine.kernels import add_lora_delta
from server.engine.kernels.nf4 import FusedNf4Linear, nf4_matmul, pick_config
from server.engine.kernels.rmsnorm import NORMS, FusedRMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(
    n: int, k: int, nested: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, bnbf.QuantState, torch.Tensor]:
    weight = torch.randn(n, k, dtype=dtype, device=DEVICE)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return packed, state, bnbf.dequantize_4bit(packed, state)  # [N*K/2, 1] uint8, state, [N, K]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 96, 512, (1, 32, 2, 4, 3)),  # one row: the dot-product path, K split over two programs
        (3, 80, 256, (16, 64, 1, 4, 3)),  # N not a multiple of BLOCK_N
        (5, 64, 512, (16, 64, 2, 4, 3)),  # tensor-core path with split K
        (17, 64, 64, (32, 64, 1, 4, 3)),  # K of one quantization block
        (64, 48, 768, None),  # the largest decode batch, with the configuration the launcher picks
    ],
)
def test_nf4_matmul_matches_dequantized_matmul(m, n, k, config, nested) -> None:
    torch.manual_seed(m)
    packed, state, dense = quantized(n, k, nested)
    x, bias = torch.randn(m, k, device=DEVICE), torch.randn(n, device=DEVICE)
    config = config or pick_config(m, n, k, sms=2)
    assert torch.allclose(nf4_matmul(x, packed, state, None, config), x @ dense.T, atol=1e-4, rtol=1e-4)
    assert torch.allclose(nf4_matmul(x, packed, state, bias, config), x @ dense.T + bias, atol=1e-4, rtol=1e-4)


def test_fused_nf4_linear_matches_bitsandbytes_and_hands_prefill_back() -> None:
    torch.manual_seed(0)
    layer = Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(96, 128), "bias": torch.randn(96)})
    layer = layer.to(DEVICE)  # quantizes
    fused = FusedNf4Linear(layer)
    decode, prefill = torch.randn(3, 1, 128, device=DEVICE), torch.randn(1, 70, 128, device=DEVICE)  # prefill: bnb
    for x in (decode, prefill):
        assert torch.allclose(fused(x), layer(x), atol=1e-4, rtol=1e-4)


def test_lora_delta_matches_per_row_gather() -> None:
    torch.manual_seed(0)
    slots, rank, k, n = 3, 6, 320, 300  # K and N not multiples of the kernels' blocks, rank not a power of 2
    store_a = torch.randn(slots + 1, rank, k + 40, device=DEVICE)[:, :, 20 : 20 + k]  # views of wider stores
    store_b = torch.randn(slots + 1, rank, n + 8, device=DEVICE)[:, :, :n]
    store_a[slots], store_b[slots] = 0, 0  # the no-adapter slot
    rows = torch.tensor([2, 0, 3, 2, 1], device=DEVICE)
    x, y = torch.randn(len(rows), k, device=DEVICE), torch.randn(len(rows), n, device=DEVICE)
    expected = y + torch.bmm(torch.bmm(x[:, None], store_a[rows].transpose(1, 2)), store_b[rows])[:, 0]
    add_lora_delta(y, x, store_a, store_b, rows)
    assert torch.allclose(y, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[2], expected[2])


@pytest.mark.parametrize("norm_class", sorted(NORMS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_fused_rms_norm_matches_the_module(norm_class) -> None:
    torch.manual_seed(0)
    norm = norm_class(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 96, device=DEVICE) * 4
    assert torch.allclose(FusedRMSNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_with_kernels_matches_peft(family, family_setup, tokenizer) -> None:
    cpu_base, adapters = family_setup(family)
    base = copy.deepcopy(cpu_base).to(DEVICE)
    engine = make_engine(base, tokenizer, fused_kernels=True)
    assert any(isinstance(m, FusedRMSNorm) for m in engine.model.modules())
    rows = [*adapters, None]
    prompt = tokenizer("fused kernels")["input_ids"]
    sink = Collector()
    for i, adapter in enumerate(rows):
        engine.submit(request([*prompt, 3 + i], greedy(6), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, adapter in enumerate(rows):
        tokens, logprobs = reference_generate(base, adapter, [*prompt, 3 + i], 6)
        assert sink.tokens(f"r{i}") == tokens, f"row {i}"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)


def test_engine_with_kernels_on_an_nf4_base_matches_peft(tmp_path, family_setup, tokenizer) -> None:
    _, adapters = family_setup("llama")  # the same seed-0 tiny llama as save_tiny, so the adapters fit
    load = dict(quantization_config=nf4_config(torch.float32), dtype=torch.float32, device_map={"": DEVICE})
    base = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "llama", "llama"), **load).eval()
    engine = make_engine(base, tokenizer, fused_kernels=True)
    assert sum(isinstance(m, FusedNf4Linear) for m in engine.model.modules()) == 14
    rows = [*adapters, None]
    prompt = tokenizer("nf4 kernels")["input_ids"]
    sink = Collector()
    for i, adapter in enumerate(rows):
        engine.submit(request([*prompt, 3 + i], greedy(6), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, adapter in enumerate(rows):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, [*prompt, 3 + i], 6)[0], f"row {i}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 32, 64])
def test_nf4_matmul_in_bf16_at_8b_shapes(m) -> None:
    torch.manual_seed(0)
    for n, k in ((1024, 4096), (4096, 14336)):
        packed, state, dense = quantized(n, k, nested=True, dtype=torch.bfloat16)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
        expected = x.float() @ dense.float().T
        error = (nf4_matmul(x, packed, state).float() - expected).abs().max() / expected.abs().max()
        assert error < 1e-2, (n, k, error)
