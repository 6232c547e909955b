"""Every field of PEFT's LoraConfig, judged against PEFT itself: a value under which PEFT computes other than the
base model + scaling B A on its targeted Linear layers, or cannot load the adapter, is refused; any other is served
as PEFT runs it. A PEFT release that adds a field fails the first test until the field is judged."""

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from peft_dirs import LIMITS, make_peft_dir
from safetensors.torch import load_file
from test_admin_api import make_app
from test_hostile_uploads import PROMPT, assert_refused_leaving_the_store, peft_logits, upload
from test_validation import copy, edit_config, edit_weights
from tiny import tiny_model

from adapters.errors import InvalidAdapterConfig
from adapters.fingerprint import base_fingerprint
from adapters.localstore import LocalBackend
from adapters.lora import split_peft_key
from adapters.store import AdapterStore
from adapters.validate import _UNSERVED_FEATURES

# The fields _UNSERVED_FEATURES does not refuse outright, and how the validation treats a non-default value
JUDGED = {
    "task_type": "checked: PEFT refuses others; it only picks PEFT's wrapper, whose logits are the LoRA model's",
    "peft_type": "checked: LORA only",
    "auto_mapping": "metadata (AutoPeftModel's classes); not read by PeftModel.from_pretrained",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata: the adapter runs on the served base model",
    "revision": "metadata",
    "inference_mode": "sets requires_grad only",
    "r": "served: the tensors' rank must be it (or rank_pattern's), scaling from it",
    "target_modules": "served: which modules PEFT adapts (_left_out_by_peft, _check_only_linear_adapted)",
    "exclude_modules": "served: _left_out_by_peft",
    "lora_alpha": "served: scaling",
    "lora_dropout": "checked: PEFT loads probabilities only; no dropout at inference",
    "fan_in_fan_out": "no effect: PEFT resets it on nn.Linear, and a Linear layer's forward does not read it",
    "bias": "checked: PEFT raises on other values; the base biases it saves are refused (_check_no_base_biases)",
    "use_rslora": "served: scaling alpha / sqrt(r)",
    "init_lora_weights": "served or refused: _lora_init",
    "layers_to_transform": "served: _left_out_by_peft",
    "layers_pattern": "served: _left_out_by_peft",
    "rank_pattern": "served: the per-module rank",
    "alpha_pattern": "served: the per-module scaling",
    "megatron_core": "read only with megatron_config, which is refused",
    "loftq_config": "read only with init_lora_weights 'loftq', which is refused",
    "eva_config": "checked (EvaConfig's bounds): EVA's init leaves B A = 0, its ranks are saved in rank_pattern",
    "corda_config": "checked (an object): read only with init_lora_weights 'corda', which is refused",
    "lora_ga_config": "checked (an object): loaded from a file, LoRA-GA takes the default init",
    "qalora_group_size": "read only with use_qalora, which is refused",
    "runtime_config": "not saved (LoraConfig.to_dict drops it); device placement only",
    "ensure_weight_tying": "ties the adapters of tied embeddings, whose adaptation is refused; a regex PEFT reads as "
    "naming one adds it, refused under a random init (_check_no_tied_embedding_adapted)",
}


def test_every_lora_config_field_is_judged() -> None:
    unjudged = sorted({f.name for f in dataclasses.fields(LoraConfig)} - set(_UNSERVED_FEATURES) - set(JUDGED))
    assert not unjudged, (
        f"PEFT's LoraConfig has fields that the adapter validation has not judged: {unjudged}. For each, read what "
        "PEFT does with a non-default value (peft/tuners/lora: config.py, layer.py, variants.py) and load an adapter "
        "with one (PeftModel.from_pretrained on tests/tiny.py's model). If PEFT then computes other than base + "
        "scaling B A on the targeted Linear layers, or cannot load some values, refuse those in "
        "adapters/validate.py (_UNSERVED_FEATURES, or a check of the value) and test it here; then add the field to "
        "JUDGED with the reason."
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path / "store")) as test_client:
        yield test_client


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3)


def without_tensors(src: Path, dest: Path, drop: str) -> Path:
    """A copy of `src` without the tensors whose key holds `drop`."""

    def remove(state: dict) -> None:
        for key in [key for key in state if drop in key]:
            del state[key]

    return edit_weights(copy(src, dest), remove)


# -- features PEFT computes otherwise, or cannot load on the served base model -----------------------------


@pytest.mark.parametrize(
    ("feature", "peft_refuses"),
    [
        ({"kasa_config": {}}, None),  # an empty KasaConfig turns KaSA on: PEFT truncates each targeted base weight
        ({"arrow_config": {}}, AttributeError),  # an empty ArrowConfig turns Arrow on, which needs its task adapters
        # the factors named block-diagonal take other shapes than the file's
        ({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"], "nblocks": 2}},
         RuntimeError),
        ({"megatron_config": {"num_layers": 2}}, ImportError),  # PEFT imports Megatron for it
    ],
)  # fmt: skip
def test_features_peft_runs_otherwise_or_cannot_load_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, feature: dict, peft_refuses: type[Exception] | None
) -> None:
    """A plain PEFT adapter with the feature set in its config: these were stored and served as plain LoRA."""
    (name,) = feature
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **feature)
    if peft_refuses is None:
        assert differs(peft_logits(bad), peft_logits(peft_dir))
    else:
        with pytest.raises(peft_refuses):
            peft_logits(bad)
    assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", name)


@pytest.mark.parametrize(
    ("feature", "says"),
    [
        ({"kasa_config": KasaConfig()}, "KaSA"),
        ({"use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2)}, "BD"),
    ],
)
def test_adapters_of_variants_peft_runs_otherwise_are_refused_saying_why(
    client: TestClient, tmp_path: Path, peft_dir: Path, feature: dict, says: str
) -> None:
    """As save_pretrained writes them (extra tensors, block-shaped factors), they were refused as damaged files."""
    (name,) = feature
    bad = make_peft_dir(tmp_path / "bad", **feature)
    message = assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", name)
    assert says in message


def test_lora_on_parameters_is_refused(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    """target_parameters puts LoRA on v_proj's weight, initialized at random (init_lora_weights false) where the file
    has no tensors for it: the server served q_proj's LoRA alone."""
    saved = make_peft_dir(
        tmp_path / "p",
        target_modules=["q_proj"],
        target_parameters=["self_attn.v_proj.weight"],
        init_lora_weights=False,
    )
    bad = without_tensors(saved, tmp_path / "bad", "v_proj")
    plain = edit_config(copy(bad, tmp_path / "plain"), target_parameters=None)
    assert differs(peft_logits(bad), peft_logits(plain))
    assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", "target_param")


def test_qalora_is_refused(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    """QALoRA's lora_A takes the input averaged over groups of qalora_group_size (on GPTQ base models): PEFT cannot
    load it on the served base model; refused as taken from another model before."""

    def pooled(state: dict) -> None:
        for key in [key for key in state if ".lora_A." in key]:
            state[key] = state[key][:, :4].contiguous()  # 64 input features in groups of 16

    bad = edit_weights(edit_config(copy(peft_dir, tmp_path / "bad"), use_qalora=True, qalora_group_size=16), pooled)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_model(), bad)
    assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", "use_qalora")


@pytest.mark.parametrize(
    ("feature", "state"),
    [
        ({"velora_config": VeloraConfig()}, "lora_velora_embed"),
        ({"monteclora_config": MontecloraConfig()}, "lora_monteclora_sampler"),
    ],
)
def test_variants_saved_with_training_state_are_refused_saying_how_to_serve_them(
    client: TestClient, tmp_path: Path, peft_dir: Path, feature: dict, state: str
) -> None:
    """At inference PEFT runs them as the plain LoRA of their lora_A / lora_B; the message's way to that is checked."""
    (name,) = feature
    saved = make_peft_dir(tmp_path / "saved", **feature)
    message = assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, saved, "unsupported_adapter", name)
    assert state in message
    plain = edit_config(without_tensors(saved, tmp_path / "plain", state), **{name: None})
    assert torch.allclose(peft_logits(saved), peft_logits(plain), atol=1e-5)
    assert upload(client, plain, "plain").status_code == 201


# -- base biases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_base_biases_trained_with_the_adapter_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, bias: str
) -> None:
    """PEFT saves the base model's biases with such an adapter and loads them over the base model's."""
    model = get_peft_model(
        tiny_model(attention_bias=True), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias)
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA's and the trained biases
                param.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "bad")
    bad = tmp_path / "bad"
    assert any(split_peft_key(key) is None for key in load_file(bad / "adapter_model.safetensors"))
    without = without_tensors(bad, tmp_path / "without", ".bias")

    def run(path: Path) -> torch.Tensor:
        with torch.no_grad():
            return PeftModel.from_pretrained(tiny_model(attention_bias=True), path)(PROMPT).logits

    assert differs(run(bad), run(without))
    message = assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", "bias")
    assert 'bias="none"' in message


# -- values PEFT cannot load, of fields that change nothing otherwise ----------------------------------------


def test_a_regex_that_peft_reads_as_a_tied_embedding_under_weight_tying_is_refused_at_random_init(
    tmp_path: Path, peft_dir: Path
) -> None:
    """PEFT tests a regex target_modules against the bare names embed_tokens and lm_head; with ensure_weight_tying, on
    a model whose embeddings are tied, a match adds the input embedding to the targets and ties the output
    embedding's adapter to it. Under init_lora_weights false both start random and the file has no tensors for them
    (an embedding's are refused): PEFT computes other logits than the server serves. Under true, or on an untied
    model, PEFT computes the plain LoRA, which is served."""
    regex = {"target_modules": r"embed_tokens|.*\.(q|v)_proj", "ensure_weight_tying": True}
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), init_lora_weights=False, **regex)
    zero = edit_config(copy(peft_dir, tmp_path / "zero"), init_lora_weights=True, **regex)

    def logits(path: Path, tied: bool) -> torch.Tensor:
        with torch.no_grad():
            return PeftModel.from_pretrained(tiny_model(tie_word_embeddings=tied), path)(PROMPT).logits

    assert differs(logits(bad, tied=True), logits(peft_dir, tied=True))
    assert not differs(logits(zero, tied=True), logits(peft_dir, tied=True))
    assert not differs(logits(bad, tied=False), logits(peft_dir, tied=False))
    tied = AdapterStore(LocalBackend(tmp_path / "tied"), base_fingerprint(tiny_model(tie_word_embeddings=True)), LIMITS)
    kept, _ = tied.put("kept", peft_dir)
    for name in ("kept", "bad"):
        with pytest.raises(InvalidAdapterConfig, match="ensure_weight_tying is true") as refused:
            tied.put(name, bad)
    assert "set ensure_weight_tying to false, or init_lora_weights to true" in str(refused.value)
    assert tied.versions("kept") == [kept] and not tied.has("bad")
    assert tied.put("zero", zero)[1]
    untied = AdapterStore(LocalBackend(tmp_path / "untied"), base_fingerprint(tiny_model()), LIMITS)
    assert untied.put("bad", bad)[1]


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"bias": "some"}, "bias"),
        ({"bias": None}, "bias"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"lora_dropout": None}, "lora_dropout"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"task_type": "CHAT"}, "task_type"),
        ({"task_type": {"a": 1}}, "task_type"),  # unhashable: looked up in a set, it raised TypeError (a 500)
        ({"task_type": ["CAUSAL_LM"]}, "task_type"),
        ({"eva_config": {"rho": 0.5}}, "rho"),
        ({"eva_config": {"tau": "high"}}, "rho"),
        ({"eva_config": [2.0]}, "eva_config"),
        ({"corda_config": "fast"}, "corda_config"),
        ({"lora_ga_config": 1}, "lora_ga_config"),
    ],
)
def test_values_peft_cannot_load_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict, says: str
) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    with pytest.raises((ValueError, TypeError, AttributeError, NotImplementedError)):
        PeftModel.from_pretrained(tiny_model(), bad)
    assert_refused_leaving_the_store(client, tmp_path / "store", peft_dir, bad, "invalid_adapter_config", says)


@pytest.mark.parametrize(
    "config",
    [
        {"fan_in_fan_out": True},
        {"lora_dropout": 0.3},
        {"bias": "all"},  # the tiny llama has no biases: none are saved
        {"task_type": "SEQ_CLS"},
        {"inference_mode": True},
        {"ensure_weight_tying": True},
        {"megatron_core": "megatron.other"},
        {"runtime_config": {"ephemeral_gpu_offload": True}},
        {"eva_config": {"rho": 1.0, "tau": 0.9}},
        {"loftq_config": {"loftq_bits": 4}},
        {"velora_config": None, "kasa_config": None, "use_bdlora": None, "target_parameters": [], "use_qalora": False},
        {"auto_mapping": {"base_model_class": "LlamaForCausalLM"}, "revision": "main", "peft_version": "0.99.0"},
    ],
)
def test_values_that_change_nothing_are_served_as_peft_runs_them(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    edited = edit_config(copy(peft_dir, tmp_path / "edited"), **config)
    assert torch.allclose(peft_logits(edited), peft_logits(peft_dir), atol=1e-5)
    response = upload(client, edited, "edited")
    assert response.status_code == 201, response.text
