"""The app factory's start-up behaviour: readiness, the warning an open server gives off loopback, and the layers
adapters are checked against."""

import logging
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from peft_dirs import LIMITS
from ready import wait_ready
from tiny import save_tiny, tiny_model
from transformers import AutoTokenizer

from adapters.fingerprint import base_fingerprint
from adapters.localstore import LocalBackend
from adapters.store import AdapterStore
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app


@pytest.mark.parametrize(
    ("host", "keys", "warns"), [("0.0.0.0", [], True), ("127.0.0.1", [], False), ("0.0.0.0", ["k"], False)]
)
def test_open_server_warns_off_loopback(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
    keys: list[str],
    warns: bool,
) -> None:
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(
        host=host,
        api_key=keys,
        adapter_dir=tmp_path / "store",
        cache_dir=tmp_path,
        device="cpu",
        max_seq_len=64,
        max_batch_size=2,
    )
    with caplog.at_level(logging.WARNING, logger="loraplex"), TestClient(create_app(settings, base=base)) as client:
        wait_ready(client)
        assert client.get("/ready").json()["model"] == "llama"
    assert any("no API keys configured" in r.message for r in caplog.records) == warns


def test_the_server_sets_the_interpreters_switch_interval(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The engine's thread gives the interpreter lock up at each wait on the device: how long the event loop may keep
    it from the engine is the server's setting, not Python's 5 ms (BENCHMARKS.md measures both)."""
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(adapter_dir=tmp_path / "store", cache_dir=tmp_path, device="cpu", max_seq_len=64,
                        max_batch_size=2, switch_interval_ms=0.25)  # fmt: skip
    before = sys.getswitchinterval()
    try:
        with TestClient(create_app(settings, base=base)) as client:
            wait_ready(client)
            assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)


def test_adapters_are_checked_against_the_layers_that_take_lora(tmp_path: Path) -> None:
    """A base model may have linear layers the engine serves no LoRA on (Phi-3's fused qkv_proj and gate_up_proj): an
    adapter on them, as PEFT trains it for that model, was stored (201) and then failed every request with 500
    adapter_load_failed, telling the client to delete it and upload it again, which stored it again. Uploads are
    checked against the layers the engine serves, and a version stored before is refused with a 4xx."""
    model_dir = save_tiny(tmp_path / "phi3", "phi3")
    get_peft_model(tiny_model("phi3"), LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    files = {
        field: (tmp_path / "adapter" / file).read_bytes()
        for field, file in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE))
    }
    # stored as a server checking against every linear layer did
    AdapterStore(LocalBackend(tmp_path / "store"), base_fingerprint(tiny_model("phi3")), LIMITS).put(
        "stored", tmp_path / "adapter"
    )
    base = load_base_model(str(model_dir), cache_dir=tmp_path, device="cpu", quantize=False, dtype=torch.float32)
    settings = Settings(
        adapter_dir=tmp_path / "store", cache_dir=tmp_path, device="cpu", max_seq_len=64, max_batch_size=2
    )
    with TestClient(create_app(settings, base=base)) as client:
        wait_ready(client)
        refused = client.post("/v1/adapters", data={"name": "phi"}, files=files)
        assert refused.status_code == 422, refused.text
        assert "qkv_proj" in refused.json()["error"]["message"]
        assert [entry["name"] for entry in client.get("/v1/adapters").json()["data"]] == ["stored"]
        body = {"inputs": "hi", "parameters": {"adapter_id": "stored", "max_new_tokens": 2}}
        answer = client.post("/generate", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "incompatible_adapter" and "qkv_proj" in answer.text
        assert client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_a_prompt_of_no_tokens_is_a_422_saying_so(tmp_path: Path) -> None:
    """A text prompt or a chat the model's template renders to nothing (this one writes nothing for any message;
    the byte tokenizer adds no special token): the engine refuses a prompt of no tokens, and a chat's reached it as
    a 500."""
    model = save_tiny(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for message in messages %}{% endfor %}"
    tokenizer.save_pretrained(model)
    settings = Settings(
        base_model=str(model), adapter_dir=tmp_path / "store", cache_dir=tmp_path, device="cpu", max_seq_len=64
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=120)
        chat = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        for path, body in (("/v1/completions", {"model": "model", "prompt": "", "max_tokens": 2}),
                           ("/v1/chat/completions", chat)):  # fmt: skip
            answer = client.post(path, json=body)
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "empty_prompt", answer.text
