"""The Triton kernels of the decode step against the computations they replace: the per-row LoRA gather,
the HF RMSNorm modules, and, through the whole engine, PEFT. With CUDA they run on the device; without,
under Triton's CPU interpreter."""

import copy

import pytest
import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end
from tiny import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from loraplex.basemodel import nf4_config
from server.engine.kernels import add_lora_delta
from server.engine.kernels.rmsnorm import NORMS, FusedRMSNorm
from server.engine.kernels.rope import rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows", [[2, 0, 3, 2, 1], [1]])
def test_lora_delta_matches_per_row_gather(rows) -> None:
    torch.manual_seed(0)
    slots, rank, k, n = 3, 6, 320, 300  # K and N not multiples of the kernels' blocks, rank not a power of 2
    store_a = torch.randn(slots + 1, rank, k + 40, device=DEVICE)[:, :, 20 : 20 + k]  # views of wider stores
    store_b = torch.randn(slots + 1, rank, n + 8, device=DEVICE)[:, :, :n]
    store_a[slots], store_b[slots] = 0, 0  # the no-adapter slot
    rows = torch.tensor(rows, device=DEVICE)
    x, y = torch.randn(len(rows), k, device=DEVICE), torch.randn(len(rows), n, device=DEVICE)
    expected = y + torch.bmm(torch.bmm(x[:, None], store_a[rows].transpose(1, 2)), store_b[rows])[:, 0]
    base_rows = y[rows == slots].clone()
    add_lora_delta(y, x, store_a, store_b, rows)
    assert torch.allclose(y, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[rows == slots], base_rows)  # the no-adapter slot adds exactly nothing


@pytest.mark.parametrize("norm_class", sorted(NORMS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_fused_rms_norm_matches_the_module(norm_class) -> None:
    torch.manual_seed(0)
    norm = norm_class(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 96, device=DEVICE) * 4
    assert torch.allclose(FusedRMSNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize(("family", "nf4"), [*((f, False) for f in FAMILIES), ("llama", True)])
def test_engine_with_kernels_matches_peft(family, nf4, tmp_path, family_setup, tokenizer) -> None:
    cpu_base, adapters = family_setup(family)
    base = copy.deepcopy(cpu_base).to(DEVICE)
    if nf4:  # the same seed-0 tiny llama as save_tiny, so the adapters fit
        load = dict(quantization_config=nf4_config(torch.float32), dtype=torch.float32, device_map={"": DEVICE})
        base = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / family, family), **load).eval()
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
        # NF4: bitsandbytes' kernels round differently for different batch shapes (~1e-3); tokens must agree
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-2 if nf4 else 1e-4)
