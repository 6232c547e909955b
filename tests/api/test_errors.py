"""Client mistakes through the real routes (in process, tiny model): each a 4xx in OpenAI's error shape that
says what is wrong, never a 5xx."""

from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient
from ready import wait_ready

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app


@pytest.fixture(scope="module")
def client(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("errors")
    base = load_base_model(
        str(tiny_model_dirs["qwen3"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    base.tokenizer.chat_template = (  # a template that refuses tool turns, as many real ones do
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=64, max_batch_size=2)
    with TestClient(create_app(settings, base=base)) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "says"),
    [
        (
            "/v1/chat/completions",
            {"model": "qwen3", "messages": [{"role": "tool", "content": "x"}]},
            422,
            "invalid_messages",
            "tool turns are not supported",
        ),
        ("/v1/chat/completions", {"model": "qwen3", "messages": []}, 422, "invalid_request", "messages"),
        ("/v1/completions", {"model": "qwen3", "prompt": "hi", "n": 9}, 422, "invalid_request", "n:"),
        ("/v1/completions", {"model": "qwen3", "prompt": ["a"] * 3, "n": 3}, 422, "invalid_request", "9 requests"),
        ("/v1/completions", {"model": "Not A Name!", "prompt": "hi"}, 404, "model_not_found", "GET /v1/models"),
        (
            "/v1/completions",
            {"model": "qwen3", "prompt": "hi", "max_tokens": 100},
            422,
            "max_tokens_too_large",
            "max_tokens <= ",
        ),
        ("/generate", {"inputs": ""}, 422, "invalid_request", "inputs"),
        ("/generate", {"inputs": "hi", "parameters": {"temperature": -1}}, 422, "invalid_request", "temperature"),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"adapter_id": "x@0"}},
            400,
            "invalid_adapter_name",
            "NAME@VERSION",
        ),
    ],
)
def test_client_mistakes(client: TestClient, path: str, body: dict, status: int, code: str, says: str) -> None:
    """Each answer is the error its route's OpenAPI schema documents for that status (its 422 was FastAPI's own
    validation shape, and its other 4xx undocumented)."""
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"] and error["type"] == "invalid_request_error"
    spec = client.get("/openapi.json").json()
    documented = spec["paths"][path]["post"]["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), {**documented, "components": spec["components"]})


def test_base_model_name_and_empty_adapter_mean_the_base(client: TestClient) -> None:
    by_name = client.post("/v1/completions", json={"model": "qwen3", "prompt": "hi", "max_tokens": 4, "temperature": 0})
    tgi = client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "", "max_new_tokens": 4}})
    assert by_name.status_code == tgi.status_code == 200
    assert by_name.json()["choices"][0]["text"] == tgi.json()["generated_text"]


def test_tgi_truncate_keeps_the_prompts_last_tokens(client: TestClient) -> None:
    long = {"inputs": "x" * 200 + "hello", "parameters": {"max_new_tokens": 4, "details": True, "truncate": 5}}
    short = {"inputs": "hello", "parameters": {"max_new_tokens": 4, "details": True}}
    kept = client.post("/generate", json=long).json()  # 205 tokens would not fit max_seq_len 64
    assert kept["details"]["prompt_tokens"] == 5
    assert kept["generated_text"] == client.post("/generate", json=short).json()["generated_text"]
