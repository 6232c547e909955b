"""Uploaded files are bounded before they are parsed: a weights file's header (size, tensor count), the JSON files."""

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from peft_dirs import new_store

from adapters import errors, validate
from adapters.validate import MAX_JSON_BYTES, MAX_TENSORS, MAX_TRAINING_BYTES, AdapterLimits, read_safetensors


def weights_bytes(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(header)) + header + data


def weights_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(weights_bytes(header, data))
    return path


def empty_tensors(count: int) -> bytes:
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    entries = {f"base_model.model.layers.{i}.q_proj.lora_A.weight": empty for i in range(count)}
    return json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()


@pytest.fixture
def load_file_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors parsed a header that should have been refused")

    monkeypatch.setattr(validate, "load_file", refuse)


def test_more_tensors_than_an_adapter_has_are_refused_unparsed(tmp_path: Path, load_file_unused: None) -> None:
    path = weights_file(tmp_path / "adapter_model.safetensors", empty_tensors(MAX_TENSORS + 1))
    with pytest.raises(errors.UnsafeAdapterFormat, match=f"declares {MAX_TENSORS + 1} tensors"):
        read_safetensors(path)


def test_a_header_over_the_bound_is_refused_unread(tmp_path: Path, load_file_unused: None) -> None:
    header = b'{"__metadata__": {"pad": "' + b"x" * (5 << 20) + b'"}}'  # one entry, 5 MB of header
    path = weights_file(tmp_path / "adapter_model.safetensors", header)
    with pytest.raises(errors.UnsafeAdapterFormat, match="header takes"):
        read_safetensors(path)


@pytest.mark.parametrize("header", [b"{" + b"[" * 100_000, b'{"a": 1', b'{"\xff": 1}'], ids=["deep", "cut", "utf8"])
def test_a_malformed_header_is_damaged(tmp_path: Path, header: bytes, load_file_unused: None) -> None:
    path = weights_file(tmp_path / "adapter_model.safetensors", header)
    with pytest.raises(errors.UnsafeAdapterFormat, match="damaged"):
        read_safetensors(path)


def test_an_adapter_at_the_tensor_bound_is_read(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "adapter_model.safetensors", empty_tensors(MAX_TENSORS))
    assert len(read_safetensors(path)) == MAX_TENSORS


def test_an_upload_with_too_many_tensors_leaves_the_store_as_it_was(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store", AdapterLimits(max_rank=16, max_bytes=8 << 20))  # the header fits
    store.put("good", peft_dir)
    bad = Path(shutil.copytree(peft_dir, tmp_path / "bad"))
    weights_file(bad / "adapter_model.safetensors", empty_tensors(MAX_TENSORS + 1))
    with pytest.raises(errors.UnsafeAdapterFormat, match="tensors"):
        store.put("good", bad)
    assert [m.version for m in store.versions("good")] == [1]


@pytest.mark.parametrize(
    ("name", "bound"), [("adapter_config.json", MAX_JSON_BYTES), ("training.json", MAX_TRAINING_BYTES)]
)
def test_json_files_over_the_bound_are_refused_unparsed(tmp_path: Path, peft_dir: Path, name: str, bound: int) -> None:
    store = new_store(tmp_path / "store", AdapterLimits(max_rank=16, max_bytes=16 << 20))
    bad = Path(shutil.copytree(peft_dir, tmp_path / "bad"))
    (bad / name).write_bytes(b"[" + b"0," * (bound // 2) + b"0]")  # valid JSON, just over the bound
    parse = json.loads

    def small_only(document: bytes | str) -> object:
        assert len(document) <= bound, "a JSON file over the bound was parsed"
        return parse(document)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json, "loads", small_only)
        with pytest.raises(errors.InvalidAdapterConfig, match=f"over the server's bound of {bound}"):
            store.put("bad", bad)


def test_a_header_whose_length_starts_like_a_pickle_is_read(tmp_path: Path) -> None:
    """A header of 0x...80 bytes starts the file with 0x80, as a pickle does: one honest adapter in 32."""
    tensor = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    header = json.dumps({"__metadata__": {"pad": ""}, "base_model.model.q_proj.lora_A.weight": tensor}).encode()
    header = header.replace(b'"pad": ""', b'"pad": "' + b"x" * (-(len(header) - 128) % 256) + b'"')
    path = weights_file(tmp_path / "adapter_model.safetensors", header, struct.pack("<f", 1.5))
    assert path.read_bytes()[:1] == b"\x80"
    assert read_safetensors(path)["base_model.model.q_proj.lora_A.weight"].tolist() == [1.5]


@pytest.mark.parametrize("item", ["0", "{}"])
def test_a_json_file_within_the_bound_costs_about_what_parsing_it_does(tmp_path: Path, item: str) -> None:
    """After json.loads, a JSON file's depth and values are counted (the config's depth, the training metadata's
    values). A pass of the interpreter per value took 1.3-1.7 s for a 4 MiB config of `0,` or `{},`, 15-25 times
    json.loads' own time, holding the interpreter lock, at the upload and at every load of the version from disk.
    This thread's CPU time is compared, which other processes on a busy machine do not stretch."""
    text = '{"peft_type": "LORA", "junk": [' + ",".join([item] * 200_000) + "]}"
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    started = time.thread_time()
    json.loads(text)
    parse = time.thread_time() - started
    started = time.thread_time()
    validate.read_config(path)
    read = time.thread_time() - started
    assert read < 6 * parse + 0.02, (read, parse)
