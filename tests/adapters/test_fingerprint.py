"""base_fingerprint: the same for the plain model, its NF4 form and a PeftModel wrapping either."""

import json
from pathlib import Path

from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, get_peft_model
from peft_dirs import make_peft_dir, new_store
from tiny import save_tiny, tiny_model

from adapters.fingerprint import BaseFingerprint, base_fingerprint
from adapters.manifest import Manifest
from loraplex.basemodel import load_base_model


def test_fingerprint_of_plain_nf4_and_peft_models(tmp_path: Path) -> None:
    plain = base_fingerprint(tiny_model("qwen3"))
    assert plain.architecture == "Qwen3ForCausalLM"
    assert plain.modules["model.layers.0.mlp.down_proj"] == (128, 64)
    assert plain.modules["lm_head"] == (64, 259)
    assert len(plain.modules) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    # and the modules that are not Linear layers, each by its full name, once (no LoRA layer's parts when wrapped)
    assert {"model.embed_tokens", "model.layers.1.mlp", "model.layers.1.mlp.act_fn", "model.norm"} <= plain.others
    assert "model.layers.0.self_attn.q_norm" in plain.others and not plain.others & plain.modules.keys()
    assert len(plain.others) == 5 + 2 * 8  # model, embed_tokens, layers, norm, rotary_emb; 8 per decoder layer

    nf4 = load_base_model(str(save_tiny(tmp_path / "m", "qwen3")), cache_dir=tmp_path, device="cpu").model
    assert isinstance(nf4.model.layers[0].mlp.down_proj, Linear4bit)
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


def test_the_modules_that_are_not_linear_are_held_by_the_served_record_only(tmp_path: Path) -> None:
    """The served model's record names its modules that are not Linear layers, to refuse configs that target them;
    a manifest's record (restrict) and every written form stay as they were, and a form written before reads back."""
    served = base_fingerprint(tiny_model("llama"))
    part = served.restrict(["model.layers.0.self_attn.q_proj"])
    assert part.others == frozenset() and served.restrict(served.modules, keep_others=True) == served
    written = served.model_dump(mode="json")
    assert set(written) == {"architecture", "modules"}  # never written: names repeat for every layer
    assert BaseFingerprint.model_validate(written) == served.restrict(served.modules)
    stored = make_peft_dir(tmp_path / "p")
    manifest = new_store(tmp_path / "store").put("a", stored)[0]
    on_disk = json.loads((tmp_path / "store" / "a" / "1" / "manifest.json").read_text())
    assert set(on_disk["base"]) == {"architecture", "modules"} and Manifest.model_validate(on_disk) == manifest
