"""Every validation rule, each with a real bad adapter, through the store (the one way in)."""

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_dirs import make_peft_dir, new_store
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from adapters import errors
from adapters.archive import MAX_MEMBERS, extract_archive
from adapters.validate import AdapterLimits


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def edit_weights(path: Path, change) -> Path:
    state = load_file(path / "adapter_model.safetensors")
    change(state)
    save_file(state, path / "adapter_model.safetensors")
    return path


def test_valid_adapter_is_stored_with_its_manifest(tmp_path: Path, peft_dir: Path) -> None:
    manifest, created = new_store(tmp_path / "store").put("good", peft_dir)
    assert created and manifest.key == "good@1" and manifest.origin == "uploaded"
    assert manifest.rank == 4 and manifest.alpha == 8 and not manifest.use_rslora
    assert manifest.target_modules == ["q_proj", "v_proj"]
    assert manifest.base.architecture == "LlamaForCausalLM"
    assert manifest.base.modules["model.layers.1.self_attn.v_proj"] == (64, 32)
    assert len(manifest.base.modules) == 4  # only the targeted modules


def test_pickle_bin_is_refused_without_unpickling(tmp_path: Path, peft_dir: Path) -> None:
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = copy(peft_dir, tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()
    torch.save({"x": Boom()}, bad / "adapter_model.bin")
    with pytest.raises(errors.UnsafeAdapterFormat, match="pickle"):
        new_store(tmp_path / "store").put("bad", bad)
    # the same bytes under the safetensors name: refused by the header check
    (bad / "adapter_model.bin").rename(bad / "adapter_model.safetensors")
    with pytest.raises(errors.UnsafeAdapterFormat, match="pickle"):
        new_store(tmp_path / "store").put("bad", bad)
    assert not marker.exists()


def test_garbage_weights_are_not_safetensors(tmp_path: Path, peft_dir: Path) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(errors.UnsafeAdapterFormat, match="not a safetensors"):
        new_store(tmp_path / "store").put("bad", bad)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"peft_type": "IA3"}, errors.InvalidAdapterConfig, "only LoRA"),
        ({"use_dora": True}, errors.UnsupportedAdapter, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, errors.UnsupportedAdapter, "modules_to_save"),
        ({"trainable_token_indices": [5, 6]}, errors.UnsupportedAdapter, "trainable_token_indices"),
        ({"target_modules": ["q_proj", "lm_head"]}, errors.UnsupportedAdapter, "vocabulary"),
        ({"target_modules": ["q_proj", "c_attn"]}, errors.IncompatibleAdapter, "c_attn"),
        ({"r": "four"}, errors.InvalidAdapterConfig, "positive integer"),
        ({"lora_alpha": "16"}, errors.InvalidAdapterConfig, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": None}}, errors.InvalidAdapterConfig, "alpha_pattern"),
        ({"target_modules": [1, 2]}, errors.InvalidAdapterConfig, "target_modules"),
        # each entry is matched against every module at upload and at every load: bounded by the base's modules
        ({"rank_pattern": {f"m{i}": 4 for i in range(5000)}}, errors.InvalidAdapterConfig, "5000 entries"),
        ({"target_modules": ["q_proj"] * 5000}, errors.InvalidAdapterConfig, "5000 entries"),
        # each module's layer index is looked for under every name in the list
        (
            {"layers_to_transform": [0, 1], "layers_pattern": ["x"] * 4999 + ["layers"]},
            errors.InvalidAdapterConfig,
            "5000",
        ),
    ],
)
def test_bad_config(tmp_path: Path, peft_dir: Path, changes: dict, error: type, match: str) -> None:
    bad = edit_config(copy(peft_dir, tmp_path / "bad"), **changes)
    with pytest.raises(error, match=match):
        new_store(tmp_path / "store").put("bad", bad)


def test_config_not_json(tmp_path: Path, peft_dir: Path) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{'r': 4,")
    with pytest.raises(errors.InvalidAdapterConfig, match="not valid JSON"):
        new_store(tmp_path / "store").put("bad", bad)


def test_real_dora_and_lm_head_adapters_are_refused(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    with pytest.raises(errors.UnsupportedAdapter, match="DoRA"):
        store.put("dora", make_peft_dir(tmp_path / "dora", use_dora=True))
    with pytest.raises(errors.UnsupportedAdapter, match="vocabulary"):
        store.put("head", make_peft_dir(tmp_path / "head", target_modules=["q_proj", "lm_head"]))
    with pytest.raises(errors.UnsupportedAdapter, match="modules_to_save"):
        store.put("mts", make_peft_dir(tmp_path / "mts", modules_to_save=["lm_head"]))
    assert len(store) == 0


def test_nan_weights(tmp_path: Path, peft_dir: Path) -> None:
    def poison(state: dict) -> None:
        key = next(k for k in state if "lora_B" in k)
        state[key][0, 0] = float("nan")

    with pytest.raises(errors.InvalidAdapterWeights, match="NaN"):
        new_store(tmp_path / "store").put("nan", edit_weights(copy(peft_dir, tmp_path / "bad"), poison))


def test_unpaired_or_foreign_tensors(tmp_path: Path, peft_dir: Path) -> None:
    def drop_b(state: dict) -> None:
        del state[next(k for k in state if "lora_B" in k)]

    with pytest.raises(errors.InvalidAdapterWeights, match="not both"):
        new_store(tmp_path / "store").put("x", edit_weights(copy(peft_dir, tmp_path / "a"), drop_b))

    def add_bias(state: dict) -> None:
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(64)

    with pytest.raises(errors.InvalidAdapterWeights, match="unexpected tensor"):
        new_store(tmp_path / "store").put("x", edit_weights(copy(peft_dir, tmp_path / "b"), add_bias))


def test_a_weight_key_with_a_trailing_newline_is_refused(tmp_path: Path, peft_dir: Path) -> None:
    """A key that ends in a newline is none PEFT loads (it drops it, leaving lora_B at zero), so served as
    lora_B it would change the answers PEFT gives."""

    key = next(k for k in load_file(peft_dir / "adapter_model.safetensors") if "lora_B" in k)

    def add_newline(state: dict) -> None:
        state[key + "\n"] = state.pop(key)

    bad = edit_weights(copy(peft_dir, tmp_path / "bad"), add_newline)
    peft = PeftModel.from_pretrained(tiny_model(), bad)
    assert not peft.get_submodule(key.removesuffix(".weight") + ".default").weight.any()  # left as initialised
    store = new_store(tmp_path / "store")
    with pytest.raises(errors.InvalidAdapterWeights, match="unexpected tensor"):
        store.put("x", bad)
    assert len(store) == 0


@pytest.mark.parametrize("alias", ["no-prefix", "default"])
def test_a_weight_named_twice_is_refused(tmp_path: Path, peft_dir: Path, alias: str) -> None:
    """One lora_A under two keys (PEFT's prefix dropped, or the ".default" adapter name): which one the server
    served was left to the file's key order, where PEFT picks by its own rules."""

    def name_twice(state: dict) -> None:
        key = next(k for k in state if "lora_A" in k)
        aliases = {
            "no-prefix": key.removeprefix("base_model.model."),
            "default": key.replace(".weight", ".default.weight"),
        }
        state[aliases[alias]] = torch.full_like(state[key], 0.5)

    with pytest.raises(errors.InvalidAdapterWeights, match="again"):
        new_store(tmp_path / "store").put("x", edit_weights(copy(peft_dir, tmp_path / "c"), name_twice))


def test_wrong_shapes_from_another_base_model(tmp_path: Path) -> None:
    # a LoRA trained on a model with another hidden size: same module names, other shapes
    model = get_peft_model(tiny_model(hidden_size=32, head_dim=8), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(errors.IncompatibleAdapter, match="do not fit"):
        new_store(tmp_path / "store").put("wide", tmp_path / "wide")


def test_module_missing_from_base(tmp_path: Path, peft_dir: Path) -> None:
    def rename(state: dict) -> None:
        for key in [k for k in state if ".layers.1." in k]:
            state[key.replace(".layers.1.", ".layers.7.")] = state.pop(key)

    with pytest.raises(errors.IncompatibleAdapter, match=r"layers\.7.*is not a layer of the served base model"):
        new_store(tmp_path / "store").put("deep", edit_weights(copy(peft_dir, tmp_path / "bad"), rename))


def test_rank_over_limit(tmp_path: Path) -> None:
    big = make_peft_dir(tmp_path / "big", r=32)
    with pytest.raises(errors.AdapterRankTooLarge, match="rank 32"):
        new_store(tmp_path / "store").put("big", big)
    assert errors.AdapterRankTooLarge.http_status == 422


def test_size_limit(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store", AdapterLimits(max_rank=16, max_bytes=4096))
    with pytest.raises(errors.AdapterTooLarge, match="max-adapter-mb"):
        store.put("big", peft_dir)


def test_training_metadata_must_be_an_object(tmp_path: Path, peft_dir: Path) -> None:
    bad = copy(peft_dir, tmp_path / "bad")
    (bad / "training.json").write_text("[1, 2]")
    with pytest.raises(errors.InvalidAdapterConfig, match="JSON object"):
        new_store(tmp_path / "store").put("bad", bad)
    (bad / "training.json").write_text(json.dumps({"dataset_sha256": "ab" * 32, "losses": [2.0, 1.5]}))
    manifest, _ = new_store(tmp_path / "store").put("bad", bad)
    training = {"dataset_sha256": "ab" * 32, "losses": [2.0, 1.5]}
    assert manifest.origin == "trained" and manifest.model_dump()["training"] == training


@pytest.mark.parametrize("name", ["", "Bot", "-bot", "bot@1", "a" * 65, "../etc", "bot/x"])
def test_bad_names(tmp_path: Path, peft_dir: Path, name: str) -> None:
    with pytest.raises(errors.InvalidAdapterName):
        new_store(tmp_path / "store").put(name, peft_dir)


# -- archives -----------------------------------------------------------------------------------------


def tar_of(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type, info.linkname = tarfile.SYMTYPE, symlink[1]
            tar.addfile(info)
    return path


def peft_members(peft_dir: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in peft_dir.iterdir() if p.suffix in (".json", ".safetensors")}


def test_nested_tar_and_zip_are_accepted(tmp_path: Path, peft_dir: Path) -> None:
    found = extract_archive(tar_of(tmp_path / "a.tar.gz", peft_members(peft_dir, "run-1/")), tmp_path / "t", 1 << 20)
    assert found == tmp_path / "t" / "run-1"
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for name, data in peft_members(peft_dir).items():
            zf.writestr(name, data)
    assert extract_archive(tmp_path / "a.zip", tmp_path / "z", 1 << 20) == tmp_path / "z"
    assert new_store(tmp_path / "store").put("zipped", tmp_path / "z")[1]


def test_tar_path_traversal(tmp_path: Path, peft_dir: Path) -> None:
    archive = tar_of(tmp_path / "a.tar.gz", {**peft_members(peft_dir), "../evil.txt": b"x"})
    with pytest.raises(errors.UnsafeArchive, match="outside"):
        extract_archive(archive, tmp_path / "out", 1 << 20)
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(errors.UnsafeArchive, match="outside"):
        extract_archive(tar_of(tmp_path / "b.tar.gz", {"/etc/x": b"x"}), tmp_path / "out2", 1 << 20)


def test_tar_symlink_member(tmp_path: Path, peft_dir: Path) -> None:
    archive = tar_of(tmp_path / "a.tar.gz", peft_members(peft_dir), symlink=("adapter_model.bin", "/etc/passwd"))
    with pytest.raises(errors.UnsafeArchive, match="link"):
        extract_archive(archive, tmp_path / "out", 1 << 20)


def test_zip_symlink_and_traversal(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = 0o120777 << 16  # a symlink, as `zip --symlinks` writes it
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(errors.UnsafeArchive, match="link"):
        extract_archive(tmp_path / "link.zip", tmp_path / "out", 1 << 20)
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        zf.writestr("a/../../evil", "x")
    with pytest.raises(errors.UnsafeArchive, match="outside"):
        extract_archive(tmp_path / "up.zip", tmp_path / "out2", 1 << 20)


def test_zip_bomb_is_stopped_while_extracting(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (8 << 20))  # 8 MiB of zeros: a few KB packed
    assert (tmp_path / "bomb.zip").stat().st_size < 64 << 10
    with pytest.raises(errors.AdapterTooLarge, match="unpacks to more than"):
        extract_archive(tmp_path / "bomb.zip", tmp_path / "out", 1 << 20)


def test_tar_bomb_of_members(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "many.tar.gz", {f"f{i}": b"" for i in range(MAX_MEMBERS + 1)})
    with pytest.raises(errors.UnsafeArchive, match="members"):
        extract_archive(archive, tmp_path / "out", 1 << 20)


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"hello, not an archive")
    with pytest.raises(errors.UnsafeArchive, match="neither"):
        extract_archive(tmp_path / "x.tar.gz", tmp_path / "out", 1 << 20)
