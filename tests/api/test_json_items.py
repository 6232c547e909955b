"""A JSON body's items (commas and opening brackets outside strings) are bounded before it is parsed: counted at
the speed of a byte search, a body past the items of the largest honest request is a JSON 413, unparsed; one at the
bound is served (in process, tiny model, max_seq_len 64)."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from ready import wait_ready

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.api.jsonbody import PARSE_ON_LOOP_BYTES
from server.api.jsonitems import ITEM_BYTES, items_within, max_json_items
from server.app import create_app

MAX_SEQ_LEN = 64
LIMIT = max_json_items(MAX_SEQ_LEN)


def items(body: bytes) -> int:
    """The items of a body whose strings hold no commas or brackets."""
    return sum(map(body.count, ITEM_BYTES))


def completion(extra: object) -> bytes:
    """A request that is served, with `extra` in a field it ignores."""
    return json.dumps({"model": "llama", "prompt": "hi", "max_tokens": 1, "x": extra}).encode()


def test_a_body_at_the_limit_is_within_it_and_one_item_more_is_not() -> None:
    for limit in (0, 1, 5, 1000):
        at = json.dumps([0] * limit).encode() if limit else b"0"
        assert items(at) == limit and items_within(at, limit) and not items_within(at, limit - 1)


@pytest.mark.parametrize(
    "text",
    [",,,[[[{{{" * 500, 'a quote \\" then ,[{', "ends in a backslash \\\\", 'both \\\\\\" then [,{', "é, 𝄞 [{"],
    ids=["plain", "escaped-quote", "escaped-backslash", "both", "non-ascii"],
)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_commas_and_brackets_in_strings_are_not_items(text: str, encoding: str) -> None:
    value = {"a": [text, {"b": text}, text], "c": "]" + text}  # {, [, two commas, {, one comma: 6 items
    body = json.dumps(value, ensure_ascii=False).encode(encoding)
    assert items_within(body, 6) and not items_within(body, 5)


def test_strings_are_items_as_any_value() -> None:
    """1,000 items: the array's bracket and 999 commas, one in a string; past 4 quotes an item, none is split."""
    body = json.dumps([",", *[""] * 999]).encode()
    assert items_within(body, 1000) and not items_within(body, 999) and not items_within(body, 100)


@pytest.fixture(scope="module")
def client(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("json-items")
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=MAX_SEQ_LEN)
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    with TestClient(create_app(settings, base=base)) as client:
        wait_ready(client)
        yield client


def post(client: TestClient, path: str, body: bytes) -> tuple[int, dict]:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    return response.status_code, response.json()


def test_a_request_at_the_limit_is_served_and_one_item_more_is_a_json_413(client: TestClient) -> None:
    at = completion([0] * (LIMIT - 4))  # the object's bracket, 3 commas between its fields, the list's bracket
    over = completion([0] * (LIMIT - 3))
    assert items(at) == LIMIT and items(over) == LIMIT + 1
    assert post(client, "/v1/completions", at)[0] == 200
    status, answer = post(client, "/v1/completions", over)
    assert status == 413
    error = answer["error"]
    assert error["code"] == "too_many_json_items" and error["type"] == "invalid_request_error"
    assert f"more than {LIMIT:,} JSON items" in error["message"] and "send the prompt as text" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b'{"model": "llama", "prompt": [' + b"[3]," * 200_000 + b"[3]]}"),
        ("/detokenize", json.dumps({"tokens": [0] * 200_000}).encode()),
        ("/generate", json.dumps({"inputs": "hi", "parameters": {"stop": [""] * LIMIT}}).encode()),
        ("/v1/chat/completions", json.dumps({"model": "llama", "messages": [{}] * LIMIT}).encode()),
    ],
    ids=["token-batches", "ids", "stop", "messages"],
)
def test_a_body_past_the_limit_is_refused_on_every_inference_route(client: TestClient, path: str, body: bytes) -> None:
    """On or off the event loop (bodies past PARSE_ON_LOOP_BYTES are counted on the parsing threads)."""
    status, answer = post(client, path, body)
    assert status == 413 and answer["error"]["code"] == "too_many_json_items", answer


def test_a_large_body_of_commas_in_strings_is_served(client: TestClient) -> None:
    body = completion([",[{" * 1000] * 100)  # 300,000 commas and brackets, in 100 strings
    assert len(body) > PARSE_ON_LOOP_BYTES and items(body) > LIMIT
    assert post(client, "/v1/completions", body)[0] == 200
