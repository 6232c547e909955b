"""base_fingerprint: the same for the plain model, its NF4 form and a PeftModel wrapping either."""

from pathlib import Path

from peft import LoraConfig, get_peft_model
from tiny import save_tiny, tiny_model

from adapters.fingerprint import base_fingerprint
from loraplex.basemodel import load_base_model


def test_fingerprint_of_plain_nf4_and_peft_models(tmp_path: Path) -> None:
    plain = base_fingerprint(tiny_model("qwen3"))
    assert plain.architecture == "Qwen3ForCausalLM"
    assert plain.modules["model.layers.0.mlp.down_proj"] == (128, 64)
    assert plain.modules["lm_head"] == (64, 259)
    assert len(plain.modules) == 2 * 7 + 1  # q k v o gate up down per layer, and the head

    nf4 = load_base_model(str(save_tiny(tmp_path / "m", "qwen3")), cache_dir=tmp_path, device="cpu").model
    assert type(nf4.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert base_fingerprint(nf4) == plain
    wrapped = get_peft_model(nf4, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert base_fingerprint(wrapped) == plain


def test_mismatch_explains_itself() -> None:
    llama = base_fingerprint(tiny_model("llama"))
    part = llama.restrict(["model.layers.0.self_attn.q_proj"])
    assert llama.mismatch(part) is None
    wider = base_fingerprint(tiny_model("llama", hidden_size=32, head_dim=8))
    assert "model.layers.0.self_attn.q_proj" in (wider.mismatch(part) or "")
    assert "LlamaForCausalLM" in (base_fingerprint(tiny_model("gemma")).mismatch(part) or "")
