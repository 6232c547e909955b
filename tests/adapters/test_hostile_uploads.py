"""Issue 14, the adapter side: hostile uploads get a clear 4xx, cost bounded work, and leave the store as
it was. Each test reproduces one way an upload used to harm the server or other clients."""

import asyncio
import bz2
import functools
import gzip
import io
import json
import lzma
import math
import re
import struct
import sys
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError
from peft_dirs import make_peft_dir, new_store
from safetensors.torch import load_file
from test_admin_api import assert_error, files_of, make_app, tar_bytes
from test_validation import copy, edit_config, edit_weights
from tiny import tiny_model

from adapters import errors
from adapters.archive import extract_archive
from adapters.bounds import MAX_GAIN
from adapters.fullmatch import MEMORY_BYTES
from adapters.gzipstream import MAX_HEADER
from adapters.lora import LoraWeights, split_peft_key
from adapters.manifest import Manifest
from adapters.multistream import MAX_MEMBERS
from adapters.validate import MAX_REGEX_CHARS, AdapterLimits


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    with TestClient(make_app(tmp_path / "store")) as test_client:
        yield test_client


def upload(client: TestClient, peft_dir: Path, name: str = "bad"):
    return client.post("/v1/adapters", data={"name": name}, files=files_of(peft_dir))


def assert_nothing_stored(client: TestClient, root: Path) -> None:
    assert client.get("/v1/adapters").json()["data"] == []
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]


def assert_refused_leaving_the_store(
    client: TestClient, root: Path, good: Path, bad: Path, code: str, says: str
) -> str:
    """`bad` is refused (`code`, a message with `says`) as a new version of an adapter stored from `good` and as a
    new adapter, and the stored one is left as it was; the message."""
    kept = upload(client, good, "kept")
    assert kept.status_code == 201, kept.text
    for name in ("kept", "bad"):
        response = upload(client, bad, name)
        assert_error(response, 422, code, says)
    listed = client.get("/v1/adapters").json()["data"]
    assert listed == [{**{k: v for k, v in kept.json().items() if k != "training"}, "state": "stored"}]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["kept"]
    store = new_store(root)
    held = {split_peft_key(key)[0] for key in load_file(good / "adapter_model.safetensors")}
    assert set(store.read_weights(store.resolve("kept@1")).modules) == held
    return response.json()["error"]["message"]


def set_first(which: str, value: float):
    def change(state: dict) -> None:
        state[next(k for k in state if f"lora_{which}" in k)][0, 0] = value

    return change


# -- item 2 and 4: an adapter's numbers, after scaling and in the serving dtype ---------------------------


@pytest.mark.parametrize(
    ("weights", "config", "code", "match"),
    [
        # finite in fp32, infinite once cast to bf16 / fp16
        (set_first("A", 3e38), {}, "invalid_adapter_weights", "lora_A"),
        (set_first("B", -3e38), {}, "invalid_adapter_weights", "lora_B"),
        (set_first("A", 1e5), {}, "invalid_adapter_weights", "lora_A"),
        (None, {"lora_alpha": 1e30}, "invalid_adapter_weights", "lora_alpha"),
        (None, {"lora_alpha": float("nan")}, "invalid_adapter_config", "finite"),
        (None, {"lora_alpha": float("inf")}, "invalid_adapter_config", "finite"),
        (None, {"alpha_pattern": {"q_proj": float("nan")}}, "invalid_adapter_config", "finite"),
        (None, {"alpha_pattern": {"q_proj": 1e30}}, "invalid_adapter_weights", "alpha_pattern"),
        (None, {"rank_pattern": {"q_proj": True}}, "invalid_adapter_config", "rank_pattern"),
    ],
)
def test_absurd_numbers_are_refused_before_anything_is_stored(
    client: TestClient, tmp_path: Path, peft_dir: Path, weights, config: dict, code: str, match: str
) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    if weights is not None:
        edit_weights(bad, weights)
    edit_config(bad, **config)  # json.dumps writes NaN / Infinity, as the attacker's file did
    assert_error(upload(client, bad), 422, code, match)
    assert_nothing_stored(client, tmp_path / "store")


def test_the_bound_admits_real_adapters_at_its_edge(tmp_path: Path) -> None:
    """rsLoRA with a large alpha on every projection: a real, if aggressive, PEFT adapter is accepted; the
    same adapter with alpha past the bound is not."""
    store = new_store(tmp_path / "store")
    big = make_peft_dir(tmp_path / "big", r=16, lora_alpha=256, use_rslora=True, target_modules="all-linear")
    assert store.put("big", big)[1]
    with pytest.raises(errors.InvalidAdapterWeights, match=f"{MAX_GAIN:g}"):
        store.put("huge", edit_config(copy(big, tmp_path / "huge"), lora_alpha=1e6))


# -- item 6: rank_pattern / alpha_pattern keys are module names, never regexes ---------------------------


@pytest.mark.parametrize("key", ["(", "(.*a){30}x", "q_proj|v_proj", "layers.[0-9].q_proj", "", "q_proj."])
def test_pattern_keys_that_are_not_module_paths_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, key: str
) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), alpha_pattern={key: 16})
    started = time.perf_counter()
    assert_error(upload(client, bad), 422, "invalid_adapter_config", "module name")
    assert time.perf_counter() - started < 2
    bad = edit_config(copy(peft_dir, tmp_path / "bad2"), rank_pattern={key: 2})
    assert_error(upload(client, bad), 422, "invalid_adapter_config", "module name")
    assert_nothing_stored(client, tmp_path / "store")


def served_as_peft_runs_it(peft_dir: Path, store_dir: Path) -> LoraWeights:
    """The adapter's weights as the store reads them, after checking each module's rank and scaling against
    PeftModel's."""
    store = new_store(store_dir)
    weights = store.read_weights(store.put("p", peft_dir)[0])
    peft = PeftModel.from_pretrained(tiny_model(), peft_dir)
    for name, module in weights.modules.items():
        layer = peft.get_submodule(f"base_model.model.{name}")
        assert module.rank == layer.r["default"] and math.isclose(module.scaling, layer.scaling["default"]), name
    return weights


def test_pattern_scalings_match_peft(tmp_path: Path) -> None:
    """PEFT's rule (a key names a module or a dotted suffix of its name), checked against PeftModel."""
    peft_dir = make_peft_dir(
        tmp_path / "p",
        r=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 24, "1.self_attn.q_proj": 3},
    )
    weights = served_as_peft_runs_it(peft_dir, tmp_path / "store")
    assert weights.modules["model.layers.1.self_attn.q_proj"].scaling == 3 / 2


def test_a_dot_in_a_pattern_key_matches_any_character_as_in_peft(tmp_path: Path) -> None:
    """PEFT reads a pattern key as a regular expression, in which '.' is any character: 'q.proj' names q_proj.
    Read as a literal name it named nothing: the adapter's q_proj was served at lora_alpha / r, not at its
    alpha_pattern value, and a PEFT adapter with such a rank_pattern key was refused."""
    peft_dir = make_peft_dir(
        tmp_path / "p", r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v.proj": 2},
        alpha_pattern={"q.proj": 24, "layers.1.self.attn.v_proj": 6},
    )  # fmt: skip
    weights = served_as_peft_runs_it(peft_dir, tmp_path / "store")
    assert weights.modules["model.layers.0.self_attn.q_proj"].scaling == 24 / 4
    assert weights.modules["model.layers.1.self_attn.v_proj"].scaling == 6 / 2


# -- PEFT is the reference: an adapter PEFT would run otherwise than as x + s B A x is refused ----------------


PROMPT = torch.tensor([[5, 9, 13, 7, 6, 20]])


def peft_logits(peft_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_model(), peft_dir)(PROMPT).logits


@pytest.mark.parametrize(
    "feature",
    [
        {"layer_replication": [[0, 1], [0, 1]]},  # PEFT runs layer 0 twice, never the base model's layer 1
        {"alora_invocation_tokens": [250, 251]},  # PEFT applies it only after these tokens
    ],
)
def test_peft_features_a_plain_lora_does_not_compute_are_refused(
    client: TestClient, tmp_path: Path, feature: dict
) -> None:
    """Real PEFT adapters whose tensors are ordinary lora_A / lora_B pairs of the base model's shapes: served as
    plain LoRA they answered otherwise than PEFT, which is checked here first."""
    (name,) = feature
    bad = make_peft_dir(tmp_path / "bad", **feature)
    plain = edit_config(copy(bad, tmp_path / "plain"), **{name: None})
    assert not torch.allclose(peft_logits(bad), peft_logits(plain), atol=1e-3)
    assert_error(upload(client, bad), 422, "unsupported_adapter", name)
    assert upload(client, plain, "plain").status_code == 201


# -- init_lora_weights: PEFT builds each LoRA layer with it before it loads the saved tensors -----------------

HELD = {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}  # peft_dir's modules
UNTRAINED = "model.layers.1.self_attn.q_proj"  # one of them


def without_tensors_of(src: Path, dest: Path, module: str) -> Path:
    """A copy of `src` whose file holds no tensors for `module`, which its config targets."""

    def drop(state: dict) -> None:
        for key in [key for key in state if split_peft_key(key)[0] == module]:
            del state[key]

    return edit_weights(copy(src, dest), drop)


@pytest.mark.parametrize(
    ("init", "extra", "peft_refuses"),
    [
        ("pissa", {}, None),
        ("pissa_niter_4", {}, None),
        ("olora", {}, None),
        ("OLoRA", {}, None),  # PEFT compares it in lower case
        ("corda", {}, "preprocess_corda"),  # it needs the data preprocess_corda attaches to the model
        # LoftQ needs scipy, and bitsandbytes on a GPU, to quantize the base weights: PEFT fails on what it misses
        ("loftq", {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "scipy|bitsandbytes|CUDA|cuda"),
    ],
)
def test_inits_that_change_the_base_weights_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, init: str, extra: dict, peft_refuses: str | None
) -> None:
    """PiSSA, OLoRA, CorDA and LoftQ make PEFT change each targeted base weight as it loads the adapter (W - s B0 A0,
    or LoftQ's quantized residual): the adapter was trained on those weights, and PEFT runs it on them. The server
    stored it and served base + B A of its tensors, an answer PEFT never gives. Refused, saying how PEFT converts
    it into a plain LoRA; a stored adapter of that name is left as it was."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), init_lora_weights=init, **extra)
    if peft_refuses is not None:
        with pytest.raises(Exception, match=peft_refuses):
            PeftModel.from_pretrained(tiny_model(), bad)
    else:
        # peft_dir is the same file with init_lora_weights true, which PEFT runs as base + B A
        assert not torch.allclose(peft_logits(bad), peft_logits(peft_dir), atol=1e-3)
        peft = PeftModel.from_pretrained(tiny_model(), bad)
        with torch.no_grad(), peft.disable_adapter():  # the base weights as PEFT left them
            assert not torch.allclose(peft(PROMPT).logits, tiny_model()(PROMPT).logits, atol=1e-3)
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", peft_dir, bad, "unsupported_adapter", f"init_lora_weights is {json.dumps(init)}"
    )
    fix = "train a LoRA on the served base model" if init == "loftq" else "path_initial_model_for_weight_conversion"
    assert fix in message and "other weights than the served base model's" in message, message


def test_a_pissa_adapter_converted_as_peft_documents_is_stored(tmp_path: Path) -> None:
    """What the refusal tells the client to do: PEFT's save_pretrained(..., path_initial_model_for_weight_conversion)
    writes a plain LoRA (init_lora_weights true, twice the rank) that PEFT runs on the unchanged base model as the
    PiSSA adapter ran on its changed one; it is stored."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    trained = get_peft_model(tiny_model(), config)
    trained.save_pretrained(tmp_path / "initial")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:  # as training would
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        expected = trained(PROMPT).logits
    converted = tmp_path / "converted"
    trained.save_pretrained(converted, path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((converted / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert torch.allclose(peft_logits(converted), expected, atol=1e-4)
    weights = served_as_peft_runs_it(converted, tmp_path / "store")
    assert {module.rank for module in weights.modules.values()} == {8}


@pytest.mark.parametrize("init", ["foo", "EVA", "Orthogonal", "PISSA", "true", 1, 2.5, ["gaussian"]])
def test_init_values_peft_cannot_load_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, init: object
) -> None:
    """PEFT raises on these as it builds the first LoRA layer (an unknown initialization, or one named in a case
    PEFT does not read it in); the server stored and served them."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), init_lora_weights=init)
    with pytest.raises((ValueError, AttributeError)):
        PeftModel.from_pretrained(tiny_model(), bad)
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", peft_dir, bad, "invalid_adapter_config", "which PEFT cannot load"
    )
    assert "set it to true" in message, message


@pytest.mark.parametrize(
    "config",
    [
        {"init_lora_weights": False},
        {"init_lora_weights": None},  # what PEFT reads as false, as it does "" and 0
        {"init_lora_weights": ""},
        {"init_lora_weights": False, "target_modules": r".*\.(q_proj|v_proj)"},
    ],
)
def test_a_random_init_of_a_targeted_module_without_tensors_is_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    """With init_lora_weights false PEFT starts each LoRA layer with nn.Linear's random A and B, and keeps them on a
    targeted module the file has no tensors for: that module's output changes at random, where the server left it
    as it was. Refused, naming the module; with every targeted module's tensors in the file PEFT computes base + B A,
    as the server does, and the adapter is stored."""
    bad = edit_config(without_tensors_of(peft_dir, tmp_path / "bad", UNTRAINED), **config)
    plain = edit_config(copy(bad, tmp_path / "plain"), init_lora_weights=True)  # base + B A of the tensors held
    assert not torch.allclose(peft_logits(bad), peft_logits(plain), atol=1e-3)
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", peft_dir, bad, "invalid_adapter_weights", f"{UNTRAINED!r}, which the config targets"
    )
    assert "set init_lora_weights to true" in message, message
    whole = edit_config(copy(peft_dir, tmp_path / "whole"), **config)
    assert torch.allclose(peft_logits(whole), peft_logits(peft_dir), atol=1e-6)
    assert set(served_as_peft_runs_it(whole, tmp_path / "served").modules) == HELD


def test_a_random_init_of_every_linear_layer_is_stored(tmp_path: Path) -> None:
    """ "all-linear" takes every Linear layer but the output embedding, which PEFT leaves out: an adapter with tensors
    for all the others has every module PEFT targets."""
    made = make_peft_dir(tmp_path / "made", target_modules="all-linear", init_lora_weights=False)
    edit_config(made, target_modules="all-linear")  # PEFT saves the names it expanded the keyword to
    assert set(served_as_peft_runs_it(made, tmp_path / "served").modules) == peft_adapted(made)


@pytest.mark.parametrize("init", [True, "gaussian", "GAUSSIAN", "eva", "lora_ga", "mica", "MICA", "orthogonal"])
def test_inits_that_leave_a_module_without_tensors_as_it_is_are_stored(
    tmp_path: Path, peft_dir: Path, init: object
) -> None:
    """These start B A at zero (B zero; MiCA: A zero; orthogonal: B's columns orthogonal to A's rows; LoRA-GA, without
    the gradients only its preprocessing attaches, as true) and leave the base weights as they are: PEFT computes base
    + B A of the file's tensors, and a targeted module without tensors unchanged, as the server serves them."""
    untrained = without_tensors_of(peft_dir, tmp_path / "untrained", UNTRAINED)
    edited = edit_config(copy(untrained, tmp_path / "edited"), init_lora_weights=init)
    assert torch.allclose(peft_logits(edited), peft_logits(untrained), atol=1e-5)
    assert set(served_as_peft_runs_it(edited, tmp_path / "served").modules) == HELD - {UNTRAINED}


@pytest.mark.parametrize(
    ("r", "config", "module"),
    [
        (3, {}, "model.layers.0.self_attn.q_proj"),
        # a targeted module the file has no tensors for, at the rank rank_pattern gives it
        (
            4,
            {"target_modules": ["q_proj", "v_proj", "k_proj"], "rank_pattern": {"k_proj": 3}},
            "layers.0.self_attn.k_proj",
        ),
    ],
)
def test_an_orthogonal_init_of_odd_rank_is_refused(
    client: TestClient, tmp_path: Path, r: int, config: dict, module: str
) -> None:
    """PEFT's orthogonal initialization takes even ranks only: it refuses to load the adapter."""
    good = make_peft_dir(tmp_path / "good", r=r)
    bad = edit_config(copy(good, tmp_path / "bad"), init_lora_weights="orthogonal", **config)
    with pytest.raises(ValueError, match="rank to be even"):
        PeftModel.from_pretrained(tiny_model(), bad)
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", good, bad, "invalid_adapter_config", f"{module}'"
    )
    assert "odd rank 3" in message, message


@pytest.mark.parametrize("init", ["mica", "MiCA"])
def test_a_mica_init_past_a_modules_smaller_dimension_is_refused(client: TestClient, tmp_path: Path, init: str) -> None:
    """PEFT starts a MiCA layer from its base weight's last r singular vectors, and refuses to load an adapter whose
    rank for a targeted module is past min(in_features, out_features), 32 for the tiny model's k_proj (64 -> 32),
    here one the file has no tensors for; MiCA was taken for a zero init, whose untrained modules are not judged."""
    good = make_peft_dir(tmp_path / "good")
    config = {"init_lora_weights": init, "target_modules": ["q_proj", "v_proj", "k_proj"]}
    bad = edit_config(copy(good, tmp_path / "bad"), rank_pattern={"k_proj": 33}, **config)
    with pytest.raises(ValueError, match="MiCA requires `r` <= min"):
        PeftModel.from_pretrained(tiny_model(), bad)
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", good, bad, "invalid_adapter_config", "layers.0.self_attn.k_proj'"
    )
    assert "rank 33" in message and "init_lora_weights to true" in message, message
    at_most = edit_config(copy(good, tmp_path / "at-most"), rank_pattern={"k_proj": 32}, **config)
    assert torch.allclose(peft_logits(at_most), peft_logits(good), atol=1e-5)  # B A = 0 where the file has none
    assert upload(client, at_most, "at-most").status_code == 201


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj"]},
        {"exclude_modules": ["v_proj"]},
        {"layers_to_transform": [1]},
        {"layers_to_transform": 0, "layers_pattern": "layers"},
        # regexes, which PEFT matches whole against each module's name (re.fullmatch)
        {"target_modules": r".*\.q_proj"},
        {"target_modules": r"model\.layers\.1\..*_proj"},
        {"exclude_modules": r".*\.v_proj"},
        {"exclude_modules": r"model\.layers\.0\..*"},
    ],
)
def test_tensors_of_modules_the_config_leaves_out_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    """PEFT puts LoRA layers only where the config says (target_modules, exclude_modules, layers_to_transform) and
    drops the other tensors as unexpected keys; the server served every pair in the file, answering otherwise."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    assert not torch.allclose(peft_logits(bad), peft_logits(peft_dir), atol=1e-3)
    assert_error(upload(client, bad), 422, "invalid_adapter_weights", "PEFT puts no LoRA layer there")
    assert_nothing_stored(client, tmp_path / "store")
    # the same settings given to PEFT itself save only what it adapts: stored, and served as PEFT runs it
    made = make_peft_dir(tmp_path / "made", **{"target_modules": ["q_proj", "v_proj"], **config})
    assert upload(client, made, "made").status_code == 201


def peft_adapted(peft_dir: Path) -> set[str]:
    """The modules PeftModel puts a LoRA layer on, under the adapter's config."""
    try:
        peft = PeftModel.from_pretrained(tiny_model(), peft_dir)
    except NoMatchingPeftModuleError:  # PEFT refuses to load an adapter whose config names no module
        return set()
    return {
        name.removeprefix("base_model.model.") for name, layer in peft.named_modules() if isinstance(layer, LoraLayer)
    }


@pytest.mark.parametrize(
    ("config", "peft_keeps_all"),
    [
        ({"target_modules": r".*\.(q_proj|v_proj)"}, True),
        ({"target_modules": "ALL-LINEAR"}, True),  # PEFT's keyword for every Linear layer but the output embedding
        ({"target_modules": r".*layers\.[01]\.self_attn\.[qv]_proj"}, True),
        ({"target_modules": r".*\.(q_proj|v_proj)\n?"}, True),
        ({"target_modules": r".*\.q_proj|v_proj"}, False),  # fullmatch: "v_proj" alone, not a name ending in it
        ({"target_modules": r".*\.(q|v)_pro"}, False),  # a prefix of the names is no match
        ({"target_modules": r"(?i).*\.[QV]_PROJ"}, True),
        ({"target_modules": ""}, False),
        ({"exclude_modules": ""}, True),  # PEFT reads an empty exclude_modules as none
        ({"exclude_modules": "all-linear"}, True),  # a keyword of target_modules only: here a regex
        ({"exclude_modules": r".*(?<!q_proj)"}, False),  # a lookbehind: every name but those ending in q_proj
        ({"exclude_modules": r".*\.1\..*"}, False),
    ],
)
def test_a_regex_target_or_exclude_is_judged_as_peft_matches_it(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict, peft_keeps_all: bool
) -> None:
    """A regex target_modules or exclude_modules was not judged: every lora_A / lora_B pair in the file was served,
    where PEFT leaves out (and drops the tensors of) each module whose name the regex does not match whole, or
    exclude_modules matches. The adapter is accepted exactly where PEFT puts a LoRA layer on each module it holds
    tensors for, and then served on those modules at PEFT's ranks and scalings."""
    edited = edit_config(copy(peft_dir, tmp_path / "edited"), **config)
    held = {split_peft_key(key)[0] for key in load_file(edited / "adapter_model.safetensors")}
    assert (held <= peft_adapted(edited)) == peft_keeps_all  # the case is what it says, as PEFT runs it
    response = upload(client, edited)
    if not peft_keeps_all:
        assert_error(response, 422, "invalid_adapter_weights", "PEFT puts no LoRA layer there")
        assert_nothing_stored(client, tmp_path / "store")
        return
    assert response.status_code == 201, response.text
    assert set(served_as_peft_runs_it(edited, tmp_path / "served").modules) == held


def test_an_invalid_or_overlong_regex_is_refused(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    """PEFT cannot load an adapter whose regex re refuses (it raises re.error at each module); the server stored and
    served it. A regex past the bound is refused before anything runs it."""
    for key in ("target_modules", "exclude_modules"):
        bad = edit_config(copy(peft_dir, tmp_path / key), **{key: r".*\.(q_proj"})
        with pytest.raises(re.error):
            PeftModel.from_pretrained(tiny_model(), bad)
        assert_error(upload(client, bad), 422, "invalid_adapter_config", f"{key} is not a regular expression")
        long = "|".join([r".*\.q_proj", r".*\.v_proj"] * (MAX_REGEX_CHARS // 20))
        response = upload(client, edit_config(bad, **{key: long}))
        assert_error(response, 422, "invalid_adapter_config", f"{key} is a regex of {len(long)} characters")
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize("config", [{"target_modules": r"(.*)*\.q_proj"}, {"exclude_modules": r"(.*\.?)*o_proj"}])
def test_a_regex_that_backtracks_exponentially_is_refused_in_bounded_time(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    """Python's re, PEFT's matcher, takes time exponential in a name's length on nested repetition: each of these
    takes minutes or more on a module name of the adapter (model.layers.0.self_attn.v_proj), which is why the
    regexes went unjudged and were stored. Judged, such a regex is refused within a bound, saying what to write
    instead, and the server takes the next upload."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    started = time.perf_counter()
    assert_error(upload(client, bad), 422, "invalid_adapter_config", "without nested repetition")
    assert time.perf_counter() - started < 5
    assert_nothing_stored(client, tmp_path / "store")
    assert upload(client, peft_dir, "honest").status_code == 201


def test_a_regex_past_the_memory_cap_is_refused_as_the_clients_fault(
    client: TestClient, tmp_path: Path, peft_dir: Path
) -> None:
    """re keeps a repeated group's state for each repetition: this pattern needs gigabytes on any module name. The
    child's memory cap stops it (a MemoryError the child answers with, within a second): the pattern's fault, as an
    overrun deadline is, so a 422 that says so (it was called "not a regular expression"), not a 503 to retry."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), target_modules=r"(?:.?){100000000}")
    started = time.perf_counter()
    says = f"the regex of target_modules took more than {MEMORY_BYTES >> 20} MiB"
    assert_error(upload(client, bad), 422, "invalid_adapter_config", says)
    assert time.perf_counter() - started < 5
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize("failure", ["cannot-start", "killed"])
def test_a_regex_the_server_cannot_check_now_is_a_503_to_retry(
    client: TestClient, tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The regex is matched in a child process. One that cannot be started (the host out of processes or memory,
    EAGAIN / ENOMEM; here its interpreter is not there, an OSError from the same fork and exec) or that dies of a
    signal (the kernel's out-of-memory killer; here its own SIGKILL) made the upload a 500, as if the server had
    failed for good or the adapter were at fault. It is the server's passing state: a 503 with Retry-After, saying
    to retry, that stores nothing, and the same upload is stored once a child runs."""
    honest = edit_config(copy(peft_dir, tmp_path / "honest"), target_modules=r".*\.(q_proj|v_proj)")
    child = tmp_path / "child"
    if failure == "killed":
        child.write_text("#!/bin/sh\nkill -KILL $$\n")
        child.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(child))  # the interpreter the child runs
    response = upload(client, honest)
    assert response.status_code == 503 and response.headers["retry-after"] == "2", response.text
    error = response.json()["error"]
    assert error["code"] == "regex_check_unavailable" and error["type"] == "server_error"
    assert error["message"].startswith("the server could not check the regex of target_modules now"), error
    assert "retry" in error["message"] and str(tmp_path) not in error["message"], error
    assert_nothing_stored(client, tmp_path / "store")
    monkeypatch.undo()
    assert upload(client, honest).status_code == 201


# -- target_modules matched against modules that are not Linear layers ------------------------------------


@pytest.mark.parametrize(
    ("config", "module", "peft_layer"),
    [
        ({"target_modules": r".*\.(q_proj|v_proj|mlp)"}, "model.layers.0.mlp", None),  # a container
        ({"target_modules": r".*(self_attn|mlp).*"}, "model.layers.0.mlp", None),  # the containers, and in them
        ({"target_modules": r".*\.(q_proj|v_proj|norm)"}, "model.norm", None),
        ({"target_modules": r".*_proj|.*\.act_fn"}, "model.layers.0.mlp.act_fn", None),
        # loaded, with an Embedding LoRA layer, which the server does not serve
        ({"target_modules": r".*(q_proj|v_proj|embed_tokens)"}, "model.embed_tokens", lora.Embedding),
        (
            {"target_modules": ["q_proj", "v_proj", "input_layernorm"], "layers_to_transform": [0, 1]},
            "model.layers.0.input_layernorm",
            None,
        ),
    ],
)
def test_a_config_that_targets_a_module_that_is_not_linear_is_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict, module: str, peft_layer: type | None
) -> None:
    """PEFT matches target_modules against every module of the model, not its Linear layers alone: it cannot put a
    LoRA layer on a norm, an activation or a container, and refuses to load such an adapter; an embedding it adapts
    with another kind of layer. The server judged configs on the Linear layers alone: it stored these regexes and
    served them as LoRAs of the projections. Refused now, naming the module and what to target, and a stored
    adapter of that name is left as it was."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    if peft_layer is None:
        with pytest.raises(ValueError, match=r"(?s)^Target module .* is not supported"):
            PeftModel.from_pretrained(tiny_model(), bad)
    else:
        layer = PeftModel.from_pretrained(tiny_model(), bad).get_submodule(f"base_model.model.{module}")
        assert type(layer) is peft_layer
    message = assert_refused_leaving_the_store(
        client, tmp_path / "store", peft_dir, bad, "incompatible_adapter", f"{module!r}"
    )
    assert "not a Linear layer" in message and "target only Linear projections" in message, message
    assert "'q_proj'" in message, message


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "v_proj", "mlp"], "exclude_modules": ["mlp"]},
        {"target_modules": r".*\.(q_proj|v_proj|mlp)", "exclude_modules": r".*\.mlp"},
        {"target_modules": ["q_proj", "v_proj", "norm"], "layers_to_transform": [0, 1]},  # model.norm: in no layer
    ],
)
def test_a_module_that_is_not_linear_named_but_left_out_by_peft_is_accepted(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    """PEFT judges a config's names with its whole rule: a module exclude_modules names, or outside
    layers_to_transform, takes no LoRA layer, and PEFT loads the adapter on its projections. The server, which had
    refused the entries as not its layers, stores it and serves it as PEFT runs it."""
    edited = edit_config(copy(peft_dir, tmp_path / "edited"), **config)
    assert peft_adapted(edited) == HELD
    assert upload(client, edited).status_code == 201
    assert set(served_as_peft_runs_it(edited, tmp_path / "served").modules) == HELD


@pytest.mark.parametrize(
    "target_modules",
    [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "all-linear",
        r".*\.(q_proj|v_proj)",
        r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",  # the containers' names, matching their projections
    ],
)
def test_configs_that_target_linear_projections_are_stored(tmp_path: Path, target_modules: list[str] | str) -> None:
    """What PEFT loads on the projections alone is stored and served as PEFT runs it: the common configs, and a
    regex that names the containers but matches only the projections in them."""
    made = make_peft_dir(tmp_path / "made", target_modules=target_modules)  # made by PEFT: it loads them
    adapted = peft_adapted(made)
    assert set(served_as_peft_runs_it(made, tmp_path / "store").modules) == adapted


def test_a_layers_pattern_is_a_name_not_a_regex(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), layers_to_transform=[0], layers_pattern="lay(e)+rs")
    assert_error(upload(client, bad), 422, "invalid_adapter_config", "not read as regular expressions")


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"target_modules": r".*\.q_proj", "layers_to_transform": [0]}, "cannot be used with a regex"),
        ({"target_modules": r".*\.q_proj", "layers_pattern": "layers"}, "cannot be used with a regex"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ],
)
def test_configs_peft_refuses_to_load_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict, says: str
) -> None:
    """LoraConfig raises on these as PEFT loads the adapter, so PEFT gives no answer the server's could equal; the
    server stored and served them."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    with pytest.raises(ValueError, match="layers_"):
        PeftModel.from_pretrained(tiny_model(), bad)
    assert_error(upload(client, bad), 422, "invalid_adapter_config", says)
    assert_nothing_stored(client, tmp_path / "store")


def test_arrow_routing_is_refused(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), arrow_config={"top_k": 2, "router_temperature": 1.0})
    assert_error(upload(client, bad), 422, "unsupported_adapter", "arrow_config")
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize(
    "config",
    [{"r": 16}, {"r": 2}, {"rank_pattern": {"v_proj": 8}}, {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}}],
)
def test_tensors_of_another_rank_than_the_config_declares_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, config: dict
) -> None:
    """PEFT builds each layer at the declared rank (r, or its rank_pattern entry) and refuses these tensors; the
    server took the tensors' rank and served them with a scaling lora_alpha / r the config never gave (4x with
    r = 16 declared for rank-4 tensors)."""
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **config)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_model(), bad)
    assert_error(upload(client, bad), 422, "invalid_adapter_weights", "declares")
    assert_nothing_stored(client, tmp_path / "store")


# -- training metadata: kept in memory with its version, on every server -----------------------------------


def test_training_metadata_is_bounded_by_what_it_costs_in_memory(client: TestClient, peft_dir: Path) -> None:
    """A version's manifest, training metadata included, lives in the index of every server sharing the store.
    4 MiB of "{}," (within the bound every JSON file had) held 100 MB per version: 20 uploads took a server's
    memory up by 2 GB. A training.json as `loraplex train` writes it for a 126-layer model still fits."""
    modules = {f"model.layers.{i}.mlp.{m}": [16384, 53248] for i in range(126) for m in ("up_proj", "gate_proj")}
    honest = {"base_model": {"architecture": "LlamaForCausalLM", "modules": modules}, "results": {"steps": 10}}
    response = client.post("/v1/adapters", data={"name": "trained"}, files=files_of(peft_dir, training=honest))
    assert response.status_code == 201 and response.json()["training"] == honest
    for training, match in ({"x": [{}] * 20_000}, "JSON values"), ({"x": "a" * (300 << 10)}, "bytes"):
        response = client.post("/v1/adapters", data={"name": "bloated"}, files=files_of(peft_dir, training=training))
        assert_error(response, 422, "invalid_adapter_config", match)
    assert [m["name"] for m in client.get("/v1/adapters").json()["data"]] == ["trained"]


def test_training_metadata_is_held_as_its_text(client: TestClient, peft_dir: Path) -> None:
    """Every version's manifest stays in memory: its training metadata is held as its compact JSON text, not as a
    Python object a value (16,384 floats took ~4 times their text: an 85 KB training.json cost ~1.4 MB a version,
    300 versions 410 MB), and answered as the object it is."""
    training = {"losses": [i + 0.5 for i in range(16_000)]}
    response = client.post("/v1/adapters", data={"name": "trained"}, files=files_of(peft_dir, training=training))
    assert response.status_code == 201 and response.json()["training"] == training
    stored = json.dumps(response.json())  # a manifest as a store reads it back, each version its own
    tracemalloc.start()
    held = [Manifest.model_validate_json(stored) for _ in range(10)]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    text = len(json.dumps(training, separators=(",", ":")))
    assert size < 10 * 2 * text, (size, text)
    assert held[-1].model_dump()["training"] == training


def test_a_listing_page_does_not_carry_training_metadata(client: TestClient, tmp_path: Path) -> None:
    """A page of up to 1000 adapters is built on the event loop: with their training metadata, 20 of 4 MiB made
    an 80 MiB answer that stalled every stream 9 s. The listing gives each adapter's origin; the metadata is
    shown by GET /v1/adapters/{name}."""
    training = {"notes": "n" * (200 << 10)}
    for i in range(3):
        peft = make_peft_dir(tmp_path / f"p{i}", seed=i)
        assert client.post("/v1/adapters", data={"name": f"t{i}"}, files=files_of(peft, training=training)).is_success
    listing = client.get("/v1/adapters")
    assert len(listing.content) < 20_000
    assert [(m["name"], m["origin"], "training" in m) for m in listing.json()["data"]] == [
        (f"t{i}", "trained", False) for i in range(3)
    ]
    assert client.get("/v1/adapters/t1").json()["training"] == training


# -- item 11 and 12: every malformed upload is a 4xx ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64, torch.int8])
def test_weights_in_a_dtype_serving_does_not_support(
    client: TestClient, tmp_path: Path, peft_dir: Path, dtype: torch.dtype
) -> None:
    def cast(state: dict) -> None:
        for key in state:
            state[key] = state[key].to(dtype)

    response = upload(client, edit_weights(copy(peft_dir, tmp_path / "bad"), cast))
    assert_error(response, 422, "invalid_adapter_weights", "float32, float16 or bfloat16")
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize("field", ["use_rslora", "use_dora", "lora_bias"])
def test_boolean_fields_are_strict(client: TestClient, tmp_path: Path, peft_dir: Path, field: str) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **{field: "false"})
    assert_error(upload(client, bad), 422, "invalid_adapter_config", f"{field} must be true or false")


@pytest.mark.parametrize("file", ["adapter_config.json", "training.json"])
def test_deeply_nested_json(client: TestClient, tmp_path: Path, peft_dir: Path, file: str) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    if file == "adapter_config.json":
        (bad / file).write_text('{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        (bad / file).write_text('{"x": ' + "[" * 500 + "]" * 500 + "}")
    files = files_of(bad)
    files["training"] = ("training.json", (bad / "training.json").read_bytes()) if file == "training.json" else None
    files = {k: v for k, v in files.items() if v is not None}
    response = client.post("/v1/adapters", data={"name": "deep"}, files=files)
    assert_error(response, 422, "invalid_adapter_config", "nested")
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize("file", ["adapter_config.json", "training.json"])
@pytest.mark.parametrize("text", ['{"a": "\\ud800"}', '{"\\udc00": 1}'], ids=["value", "key"])
def test_a_lone_surrogate_escape_is_refused(client: TestClient, tmp_path: Path, peft_dir: Path, file: str, text: str):
    """A \\u escape of half a UTF-16 pair parses to a string no UTF-8 can hold: as a value the manifest could not be
    written (a 500 that burned a version number), as a key it was stored as U+FFFD, not as uploaded."""
    bad = copy(peft_dir, tmp_path / "bad")
    if file == "adapter_config.json":
        config = (bad / file).read_text()
        (bad / file).write_text(config.replace("{", text[:-1] + ", ", 1))
        files = files_of(bad)
    else:
        files = files_of(bad) | {"training": ("training.json", text.encode())}
    response = client.post("/v1/adapters", data={"name": "surrogate"}, files=files)
    assert_error(response, 422, "invalid_adapter_config", "lone UTF-16 surrogate")
    assert_nothing_stored(client, tmp_path / "store")
    response = client.post("/v1/adapters", data={"name": "surrogate"}, files=files_of(peft_dir))
    assert response.status_code == 201 and response.json()["version"] == 1  # no version number used up


def test_malformed_multipart(client: TestClient, peft_dir: Path, tmp_path: Path) -> None:
    files = [("config", ("c", b"{}"))] * 5
    response = client.post("/v1/adapters", data={"name": "x"}, files=files)
    assert_error(response, 400, "invalid_upload", "Too many files")
    response = client.post("/v1/adapters", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert_error(response, 400, "invalid_upload", "boundary")
    files = {"config": files_of(peft_dir)["config"]}
    response = client.post("/v1/adapters", data={"name": "x" * ((1 << 20) + 16)}, files=files)  # a 1 MiB limit
    assert_error(response, 400, "invalid_upload", "exceeded maximum size")
    assert_nothing_stored(client, tmp_path / "store")


def multipart_body(name: str, files: dict) -> bytes:
    """The multipart body of an upload of `files` (as files_of gives them) as `name`, its boundary B."""
    disposition = b'--B\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n\r\n%s\r\n'
    parts = b"".join(disposition % (f.encode(), file.encode(), data) for f, (file, data) in files.items())
    return b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\n%s\r\n' % name.encode() + parts + b"--B--\r\n"


def test_a_body_cut_inside_a_part_is_refused_and_stores_nothing(client: TestClient, peft_dir: Path) -> None:
    """A multipart body that stops inside a part, its closing boundary never sent. Cut inside the training metadata it
    was stored, 201, as an uploaded adapter without it; cut inside the weights it was told they were missing."""
    assert upload(client, peft_dir, "honest").status_code == 201
    listing = client.get("/v1/adapters").json()
    whole = multipart_body("cut", files_of(peft_dir, training={"steps": 10}))
    headers = {"Content-Type": "multipart/form-data; boundary=B"}
    for cut in (whole.index(b"steps"), whole.index(b"safetensors") + 200):
        response = client.post("/v1/adapters", content=whole[:cut], headers=headers)
        assert_error(response, 400, "invalid_upload", "cut off")
    assert client.get("/v1/adapters").json() == listing
    stored = client.post("/v1/adapters", content=whole, headers=headers)
    assert stored.status_code == 201 and stored.json()["origin"] == "trained", stored.text


def test_the_media_type_is_read_in_any_case(client: TestClient, peft_dir: Path) -> None:
    """Media types are case-insensitive (RFC 9110): a body sent as Multipart/Form-Data was refused as not being
    multipart/form-data."""
    body = multipart_body("cased", files_of(peft_dir))
    for media_type, status in (("Multipart/Form-Data", 201), ("MULTIPART/FORM-DATA", 200)):
        response = client.post("/v1/adapters", content=body, headers={"Content-Type": f"{media_type}; boundary=B"})
        assert response.status_code == status and response.json()["name"] == "cased", response.text
    response = client.post("/v1/adapters", content=body, headers={"Content-Type": "Application/Json"})
    assert_error(response, 400, "invalid_upload", "multipart/form-data")


def zero_rank(state: dict) -> None:
    for key, tensor in state.items():
        state[key] = tensor[:0] if "lora_A" in key else tensor[:, :0]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_tensors_of_rank_zero_are_refused(client: TestClient, tmp_path: Path, peft_dir: Path, use_rslora: bool) -> None:
    # lora_A [0, in] and lora_B [out, 0] pair up, and the scaling alpha / r divided by zero
    bad = edit_config(edit_weights(copy(peft_dir, tmp_path / "bad"), zero_rank), use_rslora=use_rslora)
    assert_error(upload(client, bad), 422, "invalid_adapter_weights", "rank 0")
    assert_nothing_stored(client, tmp_path / "store")


BIG = "1" + "0" * 400  # an integer JSON reads exactly, past float's range
HUGE = "1" * 5000  # past the digits Python converts to an int at all


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lora_alpha", BIG, "finite"),
        ("alpha_pattern", f'{{"q_proj": {BIG}}}', "finite"),
        ("lora_alpha", HUGE, "not valid JSON"),
        ("r", HUGE, "not valid JSON"),
    ],
)
def test_integers_past_floats_range_are_refused(
    client: TestClient, tmp_path: Path, peft_dir: Path, field: str, value: str, match: str
) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **{field: "@"})
    config = bad / "adapter_config.json"
    config.write_text(config.read_text().replace('"@"', value))  # json.dumps cannot write these
    assert_error(upload(client, bad), 422, "invalid_adapter_config", match)
    assert_nothing_stored(client, tmp_path / "store")


def test_a_weights_header_with_a_huge_integer_is_damaged(client: TestClient, tmp_path: Path, peft_dir: Path) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    header = b'{"x": ' + HUGE.encode() + b"}"
    (bad / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_error(upload(client, bad), 415, "unsafe_adapter_format", "damaged")
    assert_nothing_stored(client, tmp_path / "store")


# -- item 5 and 11: archives whose headers would cost memory or time ---------------------------------------


def gz_tar(path: Path, *parts: tuple[tarfile.TarInfo, bytes | int]) -> Path:
    """A .tar.gz written block by block, so headers can say what tarfile itself would never write; a part's
    payload is bytes, or a count of b'1' bytes streamed into the archive without holding them."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        for info, payload in parts:
            size = payload if isinstance(payload, int) else len(payload)
            info.size = size
            out.write(info.tobuf(tarfile.GNU_FORMAT))
            if isinstance(payload, int):
                chunk = b"1" * (1 << 20)
                for start in range(0, size, len(chunk)):
                    out.write(chunk[: size - start])
            else:
                out.write(payload)
            out.write(b"\0" * (-size % 512))
        out.write(b"\0" * 1024)
    return path


def meta(type_: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo("././@LongLink" if type_ in (b"L", b"K") else "././@PaxHeader")
    info.type = type_
    return info


def refused_peak(archive: Path, dest: Path, max_bytes: int, says: str) -> int:
    """The peak of memory allocated while extract_archive refuses `archive` with an error saying `says`."""
    tracemalloc.start()
    try:
        with pytest.raises(errors.UnsafeArchive, match=says):
            extract_archive(archive, dest, max_bytes)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("type_", [b"L", b"K", b"x", b"g"])
def test_huge_tar_metadata_headers_are_refused_unread(tmp_path: Path, type_: bytes) -> None:
    archive = gz_tar(tmp_path / "a.tar.gz", (meta(type_), 64 << 20), (tarfile.TarInfo("adapter_config.json"), b"{}"))
    assert archive.stat().st_size < 1 << 20
    assert refused_peak(archive, tmp_path / "out", 1 << 30, "header") < 8 << 20


def test_pax_header_of_digits_is_refused_at_once(tmp_path: Path) -> None:
    archive = gz_tar(tmp_path / "a.tar.gz", (meta(b"x"), b"9" * 50_000), (tarfile.TarInfo("x"), b"x"))
    started = time.perf_counter()
    with pytest.raises(errors.UnsafeArchive):
        extract_archive(archive, tmp_path / "out", 1 << 20)
    assert time.perf_counter() - started < 0.5


def test_pax_records_that_are_not_well_formed(tmp_path: Path) -> None:
    for i, payload in enumerate([b"99 path=x\n", b"0 path=x\n", b"12 pathx\n", b"x" * 100]):
        archive = gz_tar(tmp_path / f"{i}.tar.gz", (meta(b"x"), payload), (tarfile.TarInfo("x"), b"x"))
        with pytest.raises(errors.UnsafeArchive, match="damaged"):
            extract_archive(archive, tmp_path / f"out{i}", 1 << 20)


def test_long_names_and_pax_paths_still_work(tmp_path: Path, peft_dir: Path) -> None:
    """What real packers write: GNU long names, pax paths (tarfile's default format), nested directories."""
    long = "run-" + "x" * 150 + "é"  # past ustar's 100 bytes, and not ASCII
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        archive = tmp_path / f"{fmt}.tar.gz"
        with tarfile.open(archive, "w:gz", format=fmt) as tar:
            tar.add(peft_dir, arcname=long if fmt != tarfile.USTAR_FORMAT else "u" * 120)  # ustar: a prefix
        found = extract_archive(archive, tmp_path / f"out{fmt}", 1 << 20)
        assert found.name in (long, "u" * 120) and (found / "adapter_config.json").is_file()


def test_an_archive_of_a_directorys_contents_with_its_root_entry_works(tmp_path: Path, peft_dir: Path) -> None:
    """`tar -czf a.tar.gz -C adapter-dir .` writes the root as `./` and the files as `./name`."""
    for i, root in enumerate((".", "./")):
        archive = tmp_path / f"{i}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo(root)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for file in sorted(peft_dir.iterdir()):
                tar.add(file, arcname=f"./{file.name}")
        found = extract_archive(archive, tmp_path / f"out{i}", 1 << 20)
        assert found == tmp_path / f"out{i}" and (found / "adapter_config.json").is_file()
    dot_file = io.BytesIO()
    with tarfile.open(fileobj=dot_file, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("./"), io.BytesIO())  # a regular file named `./` is still refused
    (tmp_path / "f.tar").write_bytes(dot_file.getvalue())
    with pytest.raises(errors.UnsafeArchive, match="outside"):
        extract_archive(tmp_path / "f.tar", tmp_path / "outf", 1 << 20)


def test_empty_archives_are_a_4xx(client: TestClient, tmp_path: Path) -> None:
    empty_tar = io.BytesIO()
    tarfile.open(fileobj=empty_tar, mode="w").close()
    for name, data in [
        ("e.tar.gz", gzip.compress(empty_tar.getvalue())),
        ("e.tar", empty_tar.getvalue()),
        ("z.tar.gz", gzip.compress(b"")),
    ]:
        response = client.post("/v1/adapters", data={"name": "e"}, files={"archive": (name, data)})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsafe_archive", name
    assert_nothing_stored(client, tmp_path / "store")


def test_tar_that_unpacks_past_the_budget_stops_reading(tmp_path: Path) -> None:
    # a gzip bomb of one big member: cut off at the budget, not decompressed whole
    archive = gz_tar(tmp_path / "a.tar.gz", (tarfile.TarInfo("adapter_model.safetensors"), 256 << 20))
    started = time.perf_counter()
    with pytest.raises(errors.AdapterTooLarge, match="unpacks to more than"):
        extract_archive(archive, tmp_path / "out", 1 << 20)
    assert time.perf_counter() - started < 1


def zip_of(path: Path, compress_type: int, data: bytes | int) -> Path:
    """A zip of one member, its payload bytes or a count of zero bytes streamed in without holding them."""
    info = zipfile.ZipInfo("adapter_model.safetensors")
    info.compress_type = compress_type
    with zipfile.ZipFile(path, "w") as zf, zf.open(info, "w", force_zip64=True) as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            for _ in range(data >> 20):
                out.write(bytes(1 << 20))
    return path


@pytest.mark.parametrize("compress_type", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_members_zipfile_would_decompress_unbounded_are_refused(tmp_path: Path, compress_type: int) -> None:
    # zipfile bounds a deflate read by its size; bzip2 and lzma reads inflate a whole compressed chunk at once
    # (64 MiB from a few hundred bytes here; gigabytes from one 4 KiB chunk), before the budget can stop them
    archive = zip_of(tmp_path / "a.zip", compress_type, 64 << 20)
    assert archive.stat().st_size < 64 << 10
    assert refused_peak(archive, tmp_path / "out", 1 << 20, "compression") < 8 << 20


def test_encrypted_and_unknown_zip_members_are_a_4xx(client: TestClient, tmp_path: Path) -> None:
    encrypted = bytearray(zip_of(tmp_path / "e.zip", zipfile.ZIP_STORED, b"{}").read_bytes())
    unknown = encrypted.copy()
    for header, flags, method in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):  # local and central
        at = encrypted.find(header)
        encrypted[at + flags] |= 1  # "encrypted": zipfile asks for a password
        unknown[at + method] = 99  # a method zipfile does not implement
    for data, says in ((encrypted, "encrypted"), (unknown, "compression")):
        response = client.post("/v1/adapters", data={"name": "z"}, files={"archive": ("a.zip", bytes(data))})
        assert_error(response, 400, "unsafe_archive", says)
    assert_nothing_stored(client, tmp_path / "store")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_deeply_nested_archive_is_a_4xx_and_leaves_nothing(client: TestClient, tmp_path: Path, kind: str) -> None:
    # directories only, 100 to 1,900 levels deep: making (and removing) them recursed a frame a level, so the
    # upload was a 500 that left the tree in the store's scratch space
    names = ["a/" * depth for depth in range(100, 2000, 100)]
    data = io.BytesIO()
    if kind == "tar":
        with tarfile.open(fileobj=data, mode="w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    else:
        with zipfile.ZipFile(data, "w") as zf:
            for name in names:
                zf.writestr(name, b"")
    response = client.post("/v1/adapters", data={"name": "deep"}, files={"archive": (f"a.{kind}", data.getvalue())})
    assert_error(response, 400, "unsafe_archive", "levels deep")
    assert_nothing_stored(client, tmp_path / "store")
    assert not list((tmp_path / "store").glob(".tmp-*/*/*"))  # no scratch directory left inside the process's


def test_a_tar_member_name_with_a_nul_byte_is_a_4xx(tmp_path: Path) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"path": "adapter\0config.json"}  # ustar names end at a NUL; pax paths need not
        tar.addfile(info, io.BytesIO())
    (tmp_path / "a.tar").write_bytes(archive.getvalue())
    with pytest.raises(errors.UnsafeArchive, match="NUL"):
        extract_archive(tmp_path / "a.tar", tmp_path / "out", 1 << 20)


# -- gzip headers and members, and errors that would name the server's paths -------------------------------


def plain_tar(*members: tuple[str, bytes | None]) -> bytes:
    """An uncompressed tar of these (name, data) members (data None: a directory), in order, repeats kept."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return buffer.getvalue()


def peft_tar(peft_dir: Path) -> bytes:
    return plain_tar(*((path.name, path.read_bytes()) for path in sorted(peft_dir.iterdir())))


def gzip_member(
    data: bytes,
    extra: bytes | None = None,
    name: bytes | None = None,
    comment: bytes | None = None,
    crc16: bool = False,
) -> bytes:
    """One gzip member of `data` (RFC 1952) with the optional header fields given, which gzip.compress never writes."""
    flags = (extra is not None) << 2 | (name is not None) << 3 | (comment is not None) << 4 | crc16 << 1
    header = b"\x1f\x8b\x08" + bytes([flags]) + bytes(6)
    if extra is not None:
        header += len(extra).to_bytes(2, "little") + extra
    header += b"".join(field + b"\0" for field in (name, comment) if field is not None)
    if crc16:
        header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
    deflate = zlib.compressobj(wbits=-15)
    return header + deflate.compress(data) + deflate.flush() + struct.pack("<II", zlib.crc32(data), len(data))


def test_gzip_files_as_packers_write_them_are_read(tmp_path: Path, peft_dir: Path) -> None:
    """The bounded reader reads what gzip, bgzip (an extra field, a member per block) and concatenated or
    zero-padded gzip files hold, and refuses one cut off."""
    tar = peft_tar(peft_dir)
    thirds = [tar[i : i + len(tar) // 3 + 1] for i in range(0, len(tar), len(tar) // 3 + 1)]
    honest = {
        "gzip": gzip.compress(tar),
        "named": gzip_member(tar, name=b"adapter.tar", comment=b"packed by hand", crc16=True),
        "bgzip": b"".join(gzip_member(part, extra=b"BC\x02\x00\x00\x00") for part in [*thirds, b""]),
        "padded": gzip.compress(thirds[0]) + bytes(1000) + b"".join(map(gzip.compress, thirds[1:])),
    }
    for kind, data in honest.items():
        (tmp_path / f"{kind}.tar.gz").write_bytes(data)
        found = extract_archive(tmp_path / f"{kind}.tar.gz", tmp_path / kind, 1 << 20)
        assert {p.name: p.read_bytes() for p in found.iterdir()} == {p.name: p.read_bytes() for p in peft_dir.iterdir()}
    (tmp_path / "cut.tar.gz").write_bytes(honest["gzip"][: len(honest["gzip"]) // 2])
    with pytest.raises(errors.UnsafeArchive, match="ends inside a gzip member"):
        extract_archive(tmp_path / "cut.tar.gz", tmp_path / "cut", 1 << 20)


def test_gzip_headers_are_bounded_before_they_are_read(tmp_path: Path, peft_dir: Path) -> None:
    """gzip.open read a header's file name and comment a byte at a time, however long: a 64 MiB name took 8 s of
    the interpreter, and the archive was then extracted. A name of the bound's length is still read."""
    tar = peft_tar(peft_dir)
    fits = gzip_member(tar, name=b"n" * (MAX_HEADER - 11))  # the name, its NUL and 10 fixed bytes
    (tmp_path / "fits.tar.gz").write_bytes(fits)
    assert (extract_archive(tmp_path / "fits.tar.gz", tmp_path / "fits", 1 << 20) / "adapter_config.json").is_file()
    for field in ("name", "comment"):
        (tmp_path / "a.tar.gz").write_bytes(gzip_member(tar, **{field: b"n" * (MAX_HEADER - 10)}))
        with pytest.raises(errors.UnsafeArchive, match=f"over {MAX_HEADER} bytes"):
            extract_archive(tmp_path / "a.tar.gz", tmp_path / field, 1 << 20)


@pytest.mark.parametrize(("kind", "compress"), [("bzip2", bz2.compress), ("xz", lzma.compress)])
def test_bzip2_and_xz_files_of_several_streams_are_read(tmp_path: Path, peft_dir: Path, kind, compress) -> None:
    """The counting reader reads a tar compressed as one stream, as a stream a part with xz's zero padding between
    them (pbzip2 writes a stream a block), and after empty streams up to MAX_MEMBERS in all; it refuses one more
    stream, and a file cut off inside a stream."""
    tar = peft_tar(peft_dir)
    third = len(tar) // 3 + 1
    empty = [compress(b"")] * (MAX_MEMBERS - 1)
    honest = {
        "one": compress(tar),
        "parts": b"".join(compress(tar[i : i + third]) + bytes(4) for i in range(0, len(tar), third)),
        "most": b"".join(empty) + compress(tar),
    }
    for name, data in honest.items():
        (tmp_path / name).write_bytes(data)
        found = extract_archive(tmp_path / name, tmp_path / f"{name}-out", 1 << 20)
        assert {p.name: p.read_bytes() for p in found.iterdir()} == {p.name: p.read_bytes() for p in peft_dir.iterdir()}
    (tmp_path / "more").write_bytes(compress(b"") + honest["most"])
    with pytest.raises(errors.UnsafeArchive, match=f"over {MAX_MEMBERS} {kind} streams"):
        extract_archive(tmp_path / "more", tmp_path / "more-out", 1 << 20)
    (tmp_path / "cut").write_bytes(honest["one"][: len(honest["one"]) // 2])
    with pytest.raises(errors.UnsafeArchive, match=f"ends inside a {kind} stream"):
        extract_archive(tmp_path / "cut", tmp_path / "cut-out", 1 << 20)


# each: the archive (made once the test runs), what its refusal says
HOSTILE_ARCHIVES = {
    "gzip-name": (lambda tar: gzip_member(tar, name=b"n" * (64 << 20)), "gzip header"),
    "gzip-comment": (lambda tar: gzip_member(tar, comment=b"c" * (64 << 20)), "gzip header"),
    # 20 bytes each, every one a round of the interpreter's: 100 MiB of them took 35 s
    "gzip-empty-members": (lambda tar: gzip.compress(b"", mtime=0) * 100_000 + gzip.compress(tar), "gzip members"),
    # 14 and 32 bytes each, a decompressor set up by the interpreter for each: 8 MiB of them took bz2.open and
    # lzma.open 1 s, and the archive after them was stored
    "bzip2-empty-streams": (lambda tar: bz2.compress(b"") * 100_000 + bz2.compress(tar), "bzip2 streams"),
    "xz-empty-streams": (lambda tar: lzma.compress(b"") * 100_000 + lzma.compress(tar), "xz streams"),
    "twice": (lambda _: gzip.compress(plain_tar(("a", b"1"), ("a", b"2"))), "'a' clashes with another member"),
    "file-and-directory": (lambda _: gzip.compress(plain_tar(("x", b"1"), ("x/", None))), "'x/' clashes"),
    "through-a-file": (lambda _: gzip.compress(plain_tar(("x", b"1"), ("x/y", b"2"))), "'x/y' clashes"),
    "long-name": (lambda _: gzip.compress(plain_tar(("n" * 300, b"1"))), "File name too long"),
}


def test_hostile_archives_harm_no_honest_upload(tmp_path: Path, peft_dir: Path) -> None:
    """Hostile archives sent through a real server while honest uploads are in flight: each is a 400 within seconds
    that names the member by its path in the archive (never the store's scratch path) and stores nothing; each
    honest upload is stored as sent and the adapter stored before is untouched."""
    root = tmp_path / "store"
    app = make_app(root, AdapterLimits(max_rank=16, max_bytes=128 << 20))
    tar = peft_tar(peft_dir)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        kept = http.post("/v1/adapters", data={"name": "kept"}, files=files_of(peft_dir)).json()
        for kind, (make, says) in HOSTILE_ARCHIVES.items():
            archive = {"archive": ("adapter.tar.gz", make(tar))}
            honest = pool.submit(http.post, "/v1/adapters", data={"name": f"honest-{kind}"}, files=files_of(peft_dir))
            started = time.perf_counter()
            response = http.post("/v1/adapters", data={"name": kind}, files=archive)
            assert time.perf_counter() - started < 5, kind
            assert_error(response, 400, "unsafe_archive", says)
            assert str(root) not in response.text and ".tmp-" not in response.text, response.text
            answer = honest.result()
            assert answer.status_code == 201, answer.text
            assert answer.json()["sha256"] == kept["sha256"] and answer.json()["name"] == f"honest-{kind}"
        listed = {m["name"]: m for m in http.get("/v1/adapters", params={"limit": 1000}).json()["data"]}
    assert sorted(listed) == sorted(["kept", *(f"honest-{kind}" for kind in HOSTILE_ARCHIVES)])
    assert listed["kept"] == {**{k: v for k, v in kept.items() if k != "training"}, "state": "stored"}
    assert not list(root.glob(".tmp-*/*/*"))  # no scratch directory left inside the process's


# -- item 4 and 11: what cannot be read or loaded is visible and removable through the API ----------------


def test_broken_and_failed_versions_are_listed_and_deletable(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    store = new_store(root)
    store.put("bot", peft_dir)
    store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    store.put("ghost", peft_dir)
    (root / "bot" / "2" / "manifest.json").write_text('{"alpha": NaN')  # what a NaN upload used to leave
    (root / "ghost" / "1" / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # loads, then fails
    with TestClient(make_app(root)) as client:
        listing = client.get("/v1/adapters").json()
        assert [(b["key"], b["version"]) for b in listing["broken"]] == [("bot@2", 2)]
        assert "manifest" in listing["broken"][0]["error"]
        assert [(m["name"], m["version"], m["state"]) for m in listing["data"]] == [
            ("bot", 1, "stored"),
            ("ghost", 1, "stored"),
        ]
        with pytest.raises(errors.AdapterLoadFailed):
            asyncio.run(client.app.state.registry.acquire("ghost"))
        assert [m["state"] for m in client.get("/v1/adapters").json()["data"]] == ["stored", "failed"]
        assert client.get("/v1/adapters", params={"after": "a"}).json().get("broken") is None  # first page only
        assert client.delete("/v1/adapters/bot@2").json()["versions_deleted"] == 1
        assert client.delete("/v1/adapters/ghost").json()["versions_deleted"] == 1
        assert client.get("/v1/adapters").json()["broken"] == []
        assert [m["name"] for m in client.get("/v1/adapters").json()["data"]] == ["bot"]


# -- an upload's disk work is off the event loop ------------------------------------------------------------


@functools.cache
def watch_removals() -> list[list[str]]:
    """Every file or directory removed by a thread that runs an event loop is appended to each list in the answer
    (audit hooks cannot be removed: one is installed, and records while a test holds a list in it)."""
    recorders: list[list[str]] = []

    def hook(event: str, args: tuple) -> None:
        if recorders and event in ("os.remove", "os.rmdir") and asyncio_running():
            for removed in recorders:
                removed.append(str(args[0]))

    sys.addaudithook(hook)
    return recorders


def asyncio_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("kind", ["stored", "refused"])
def test_an_uploads_files_are_removed_off_the_event_loop(client: TestClient, peft_dir: Path, kind: str) -> None:
    """Removing what an upload left in its scratch directory (the archive, and the files it unpacked to) is the
    disk's work in proportion to their size, ~0.1 s for 512 MiB: on the event loop it held every stream that long,
    and a .tar.gz of 0.5 MB unpacks to the 512 MiB of --max-adapter-mb (zeros, in a file beside the adapter's)."""
    config = (peft_dir / "adapter_config.json").read_bytes()
    members = {
        "adapter_config.json": config if kind == "stored" else config.replace(b'"LORA"', b'"IA3"'),
        "adapter_model.safetensors": (peft_dir / "adapter_model.safetensors").read_bytes(),
        "padding": bytes(256 << 10),
    }
    removed_on_loop: list[str] = []
    watch_removals().append(removed_on_loop)
    try:
        response = client.post(
            "/v1/adapters", data={"name": "bot"}, files={"archive": ("a.tar.gz", tar_bytes(members))}
        )
    finally:
        watch_removals().remove(removed_on_loop)
    assert response.status_code == (201 if kind == "stored" else 422), response.text
    assert removed_on_loop == []
