"""The foundation: settings and flags, base-model loading in NF4 on CPU, and start-up errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, ViTConfig

from loraplex import cpu_weights
from loraplex.basemodel import check_base_model, load_base_model, nf4_config
from loraplex.cli import build_parser
from loraplex.cpu_weights import DequantizedLinear4bit
from loraplex.errors import BaseModelError
from loraplex.settings import Settings
from server.cli import settings_from_args


def serve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraplex", "serve", *argv], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize(("family", "dense"), [("llama", True), ("qwen3", True), ("gemma", True), ("llama", False)])
def test_tiny_model_loads_in_nf4_on_cpu(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dense: the NF4 layers' dequantized copies fit the memory available (else, the layers stay bitsandbytes')."""
    if not dense:
        monkeypatch.setattr(cpu_weights, "available_memory", lambda device: 1 << 20)
    base = load_base_model(str(tiny_model_dirs[family]), cache_dir=tmp_path, device="cpu")
    linears = [m for n, m in base.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(isinstance(m, DequantizedLinear4bit) == dense for m in linears)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert base.served_name == family
    # a CPU computes in fp32: its bf16 matmuls are emulated without AVX512-BF16
    assert all(m.compute_dtype == torch.float32 for m in linears)
    assert base.model.get_input_embeddings().weight.dtype == torch.float32
    out = base.model(torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, base.model.config.vocab_size) and torch.isfinite(out).all()
    # double quantization, its scales expanded to fp32 once at load: the model bitsandbytes loads, the same logits
    assert all(not m.weight.quant_state.nested and m.weight.quant_state.absmax.dtype == torch.float32 for m in linears)
    load = {"quantization_config": nf4_config(torch.float32), "dtype": torch.float32, "device_map": {"": "cpu"}}
    nested = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], **load)
    assert all(m.weight.quant_state.nested for n, m in nested.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert torch.equal(nested(torch.tensor([[5, 6, 7]])).logits, out)
    # training: the same gradients reach the inputs through the frozen NF4 layers
    grads = []
    for model in (base.model, nested):
        embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7]])).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.square().sum().backward()
        grads.append(embeds.grad)
    assert torch.equal(*grads)


def test_served_name_override(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", quantize=False, served_name="my-base"
    )
    assert base.served_name == "my-base"


def test_missing_and_non_causal_base_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="does not exist"):
        check_base_model(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        check_base_model(str(tmp_path), tmp_path)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(BaseModelError, match="not a causal language model"):
        check_base_model(str(tmp_path / "vit"), tmp_path)


def test_flags_override_env_and_lists_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LORAPLEX_PORT", "9000")
    monkeypatch.setenv("LORAPLEX_API_KEY", "a, b")
    args = build_parser().parse_args(["serve", "--port", "9001", "--admin-key", "x", "--admin-key", "y"])
    settings = settings_from_args(args)
    assert (settings.port, settings.max_batch_size) == (9001, 7)
    assert settings.api_key == ["a", "b"] and settings.admin_key == ["x", "y"]
    assert Settings(preload=["a,b", "c"]).preload == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--port", "http"], "--port (LORAPLEX_PORT): Input should be a valid integer"),
        (["--device", "tpu"], "--device (LORAPLEX_DEVICE): Input should be 'auto', 'cuda' or 'cpu'"),
        (["--max-active-adapters", "16", "--max-cpu-adapters", "4"], "max_cpu_adapters (4) must be >="),
        (["--max-concurrent-uploads", "2", "--max-uploads-per-client", "3"], "max_uploads_per_client (3) must be <="),
        (["--base-model", "/definitely/not/here"], "base model directory '/definitely/not/here' does not exist"),
    ],
)
def test_bad_serve_flags_fail_with_one_clear_line(argv: list[str], expected: str) -> None:
    result = serve(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraplex serve: error: ") and expected in lines[0]


def test_not_a_causal_lm_fails_at_start(tmp_path: Path) -> None:
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    result = serve("--base-model", str(tmp_path))
    assert result.returncode == 2 and "not a causal language model" in result.stderr


def test_a_model_that_fails_to_load_after_the_port_opens_stops_the_server(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = serve("--base-model", str(broken), "--port", "0", "--cache-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 1
    assert "cannot load base model" in result.stderr


def test_an_adapter_directory_that_cannot_be_one_stops_the_server_in_one_line(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """--adapter-dir naming a file (or a directory the server may not write) stopped the server with the
    traceback of a mkdir."""
    (tmp_path / "adapters").write_text("not a directory")
    result = serve(
        "--base-model", str(tiny_model_dirs["llama"]), "--port", "0", "--cache-dir", str(tmp_path), "--device", "cpu",
        "--adapter-dir", str(tmp_path / "adapters"),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        f"start-up failed: cannot use the adapter directory {tmp_path / 'adapters'}: a file is in the way"
        in result.stderr
    )
