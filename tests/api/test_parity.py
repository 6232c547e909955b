"""Generation API parity with vLLM, TGI and LoRAX, in process on the tiny byte-level llama (max_seq_len 64):
tokenizer endpoints, log probabilities, several choices, adapter mixing and structured output."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def client(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("parity")
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=MAX_SEQ_LEN,
                        max_batch_size=4)
    base = load_base_model(str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False,
                           dtype=torch.float32)
    with TestClient(create_app(settings, base=base)) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield c


def error_of(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- tokenizer endpoints ---------------------------------------------------------------------------------


def test_vllm_tokenize_and_detokenize_round_trip(client: TestClient) -> None:
    out = client.post("/tokenize", json={"model": "llama", "prompt": "héllo", "return_token_strs": True}).json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) and out["max_model_len"] == MAX_SEQ_LEN
    assert client.post("/detokenize", json={"model": "llama", "tokens": out["tokens"]}).json() == {"prompt": "héllo"}


def test_vllm_chat_tokenize_applies_the_template(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = client.post("/tokenize", json={"messages": messages}).json()
    without = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert with_prompt["count"] > without["count"] > 2 and with_prompt["token_strs"] is None
    rendered = client.post("/detokenize", json={"tokens": with_prompt["tokens"]}).json()["prompt"]
    assert "hi" in rendered


def test_tgi_tokenize_gives_offsets(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"inputs": "ab c", "parameters": {"max_new_tokens": 3}}).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("a", 0, 1), ("b", 1, 2), (" ", 2, 3), ("c", 3, 4)]
    assert all(isinstance(t["id"], int) for t in tokens)


@pytest.mark.parametrize(("path", "payload", "says", "code"), [
    ("/tokenize", {"prompt": "x" * 10_000}, "characters", "prompt_too_long"),
    ("/tokenize", {"inputs": "x" * 10_000}, "characters", "prompt_too_long"),
    ("/tokenize", {"messages": []}, "messages", "invalid_request"),
    ("/detokenize", {"tokens": [1] * (MAX_SEQ_LEN + 1)}, "at most", "invalid_tokens"),
    ("/detokenize", {"tokens": [10**9]}, "vocabulary", "invalid_tokens"),
    ("/detokenize", {"tokens": [-1]}, "vocabulary", "invalid_tokens"),
])
def test_tokenizer_inputs_are_bounded(client: TestClient, path: str, payload: dict, says: str, code: str) -> None:
    error = error_of(client.post(path, json=payload))
    assert error["code"] == code and says in error["message"], error
