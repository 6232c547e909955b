"""Every client value is bounded where it enters (in process, tiny byte-level model, max_seq_len 64): a value
the engine cannot execute is a 422 naming its field, or is mapped to what it means (top_k over the vocabulary
is no top-k at all), and the engine never sees it."""

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from ready import wait_ready

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app
from server.inference import ClientDisconnected, until_disconnected

MAX_SEQ_LEN = 64
TGI_ROUTES = ["/generate", "/generate_stream", "/"]
ROUTES = [*TGI_ROUTES, "/v1/completions", "/v1/chat/completions"]


def body(path: str, prompt: str = "hi", **params: object) -> dict:
    """A request on `path` with sampling `params` where that protocol puts them."""
    if path in TGI_ROUTES:
        return {"inputs": prompt, "parameters": params}
    if path == "/v1/completions":
        return {"model": "llama", "prompt": prompt, **params}
    return {"model": "llama", "messages": [{"role": "user", "content": prompt}], **params}


@pytest.fixture(scope="module")
def app_settings(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("boundary")
    # hermes: tool_choice "auto" is answered, so the tools reach the template without a grammar
    settings = Settings(
        adapter_dir=tmp / "store",
        cache_dir=tmp,
        device="cpu",
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=2,
        tool_call_parser="hermes",
    )
    return tiny_model_dirs["llama"], settings


def start(app_settings: tuple) -> TestClient:
    model_dir, settings = app_settings
    base = load_base_model(
        str(model_dir), cache_dir=settings.cache_dir, device="cpu", quantize=False, dtype=torch.float32
    )
    return TestClient(create_app(settings, base=base))


@pytest.fixture(scope="module")
def client(app_settings: tuple) -> Iterator[TestClient]:
    with start(app_settings) as c:
        yield wait_ready(c)


def post(client: TestClient, path: str, payload: dict | str) -> tuple[int, dict]:
    """Status and JSON (an error, or the answer; a stream answers its last event)."""
    kwargs = (
        {"content": payload, "headers": {"content-type": "application/json"}}
        if isinstance(payload, str)
        else {"json": payload}
    )
    with client.stream("POST", path, **kwargs) as response:  # type: ignore[arg-type]
        text = response.read().decode()
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
        return response.status_code, {"events": events}
    return response.status_code, response.json()


def assert_422(client: TestClient, path: str, payload: dict | str, says: str, code: str = "invalid_request") -> None:
    status, answer = post(client, path, payload)
    assert status == 422, (status, answer)
    assert answer["error"]["code"] == code and says in answer["error"]["message"], answer


def sampled(path: str, **params: object) -> dict:
    # TGI samples with do_sample; OpenAI's default temperature is 1
    return (
        body(path, max_new_tokens=4, do_sample=True, **params)
        if path in TGI_ROUTES
        else body(path, max_tokens=4, **params)
    )


@pytest.mark.parametrize("path", ROUTES)
def test_seed_is_bounded_to_what_torch_accepts(client: TestClient, path: str) -> None:
    assert_422(client, path, sampled(path, seed=2**64), "seed")
    assert_422(client, path, sampled(path, seed=-1), "seed")
    assert post(client, path, sampled(path, seed=2**64 - 1))[0] == 200
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("value", ['"NaN"', '"Infinity"', "NaN", "-Infinity", "1e999"])
def test_non_finite_floats_are_422(client: TestClient, path: str, value: str) -> None:
    fields = ["temperature", "top_p", "frequency_penalty"]
    fields += ["repetition_penalty"] if path in TGI_ROUTES else ["presence_penalty"]
    for field in fields:
        payload = body(path, **{field: 123456.0})
        raw = json.dumps(payload).replace("123456.0", value)
        assert_422(client, path, raw, field)


@pytest.mark.parametrize("path", TGI_ROUTES)
def test_tgi_parameters_not_implemented_are_refused_unless_their_no_op_value(client: TestClient, path: str) -> None:
    """typical_p and watermark change TGI's answer: ignored, the answer would not be the one asked for. TGI's clients
    send them at their defaults, which change nothing."""
    assert_422(client, path, sampled(path, typical_p=0.5), "typical_p is not supported: typical sampling is not")
    assert_422(client, path, sampled(path, watermark=True), "watermark is not supported: watermarking is not")
    for no_op in ({"typical_p": None, "watermark": False}, {"typical_p": 1.0}, {"typical_p": 1, "watermark": None}):
        status, answer = post(client, path, sampled(path, **no_op))
        assert status == 200, (no_op, answer)


def test_sane_ranges(client: TestClient) -> None:
    assert_422(client, "/generate", body("/generate", temperature=1000), "temperature")
    assert_422(client, "/generate", body("/generate", repetition_penalty=1e-30), "repetition_penalty")
    assert_422(client, "/generate", body("/generate", repetition_penalty=1000), "repetition_penalty")
    assert_422(client, "/generate", body("/generate", frequency_penalty=2.5), "frequency_penalty")
    assert_422(client, "/v1/completions", body("/v1/completions", presence_penalty=-3), "presence_penalty")
    chat = body("/v1/chat/completions", frequency_penalty=-2.1)
    assert_422(client, "/v1/chat/completions", chat, "frequency_penalty")
    assert_422(client, "/generate", body("/generate", truncate=0), "truncate")
    assert_422(client, "/generate", body("/generate", adapter_id="a" * 300), "adapter_id")
    assert_422(client, "/v1/completions", {**body("/v1/completions"), "model": "m" * 300}, "model")


def tokens(client: TestClient, **params: object) -> list[int]:
    status, answer = post(client, "/generate", body("/generate", max_new_tokens=8, details=True, seed=7, **params))
    assert status == 200, answer
    return [t["id"] for t in answer["details"]["tokens"]]


def test_top_k_over_the_vocabulary_means_no_top_k(client: TestClient) -> None:
    assert tokens(client, top_k=100_000) == tokens(client, top_k=2**70) == tokens(client, do_sample=True)


def test_tiny_temperatures_are_raised_to_the_smallest_safe_one(client: TestClient) -> None:
    assert tokens(client, temperature=1e-30) == tokens(client, temperature=0.01)


@pytest.mark.parametrize("path", ROUTES)
def test_stop_strings_are_bounded(client: TestClient, path: str) -> None:
    assert_422(client, path, body(path, stop=["x"] * 17), "stop")
    assert_422(client, path, body(path, stop=["x" * 257]), "stop")
    assert post(client, path, body(path, stop=["y" * 256] * 16))[0] == 200


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text content"),
        ([{"role": "user", "content": [5]}], "messages.0.content"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages.0.content"),
        ([{"role": "robot", "content": "hi"}], "messages.0.role"),
        ([{"role": "user", "content": "hi"}] * 1025, "messages"),
        # bounded over all messages, counted before any is validated: a 4 MiB body of ~160,000 empty parts held
        # the event loop for most of a second
        ([{"role": "user", "content": [{"type": "text", "text": ""}] * 513}] * 2, "1026 content parts; at most 1024"),
        ([], "messages"),
    ],
)
def test_chat_message_shapes(client: TestClient, messages: list, says: str) -> None:
    assert_422(client, "/v1/chat/completions", {"model": "llama", "messages": messages}, says)


def test_text_content_parts_are_joined(client: TestClient) -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    joined = post(
        client,
        "/v1/chat/completions",
        {"model": "llama", "messages": [{"role": "user", "content": parts}], "max_tokens": 4, "temperature": 0},
    )
    plain = post(client, "/v1/chat/completions", body("/v1/chat/completions", max_tokens=4, temperature=0))
    assert joined[0] == 200 and joined[1]["choices"] == plain[1]["choices"]


# pydantic reports every element of a list that fails: 2 million in a 4 MiB body held the event loop for 18 s while
# it built a 180 MB error. Each of these is one short error, at once.
BAD_LISTS = [
    ("/v1/completions", {"model": "llama", "prompt": [True] * 20_000}, "prompt.ids.0"),
    ("/v1/completions", {"model": "llama", "prompt": [[5], *[[True]] * 7]}, "prompt.batch.1.0"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": [5] * 20_000}]}, "content"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "robot", "content": "hi"}] * 1024}, "role"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image"}] * 1024}]}, "text content parts"),
    ("/detokenize", {"tokens": ["x"] * 20_000}, "tokens.0"),
]


@pytest.mark.parametrize(("path", "payload", "says"), BAD_LISTS)
def test_a_long_list_of_bad_elements_is_one_short_error(
    client: TestClient, path: str, payload: dict, says: str
) -> None:
    status, answer = post(client, path, payload)
    assert status == 422, (status, str(answer)[:300])
    assert says in answer["error"]["message"] and len(answer["error"]["message"]) < 1000, str(answer)[:300]


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "says"),
    [
        (b"{not json", "application/json", 422, "not valid JSON: Expecting property name enclosed in double quotes"),
        (b'{"model": "llama", "prompt": "\xff"}', "application/json", 400, "byte 30 is not UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "application/json", 400, "nests arrays or objects too deeply"),
        (b'{"model": "llama", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "application/json", 400, "digits"),
        (b'{"model": "llama", "prompt": "hi"}', "text/plain", 422, "content-type: application/json"),
        (b"", "application/json", 422, "no body"),
        (b"[1, 2]", "application/json", 422, "the body is an array: send a JSON object"),
        (b'{"prompt": "hi"}', "application/x-www-form-urlencoded", 422, "content-type: application/json"),
        (b"[]", "application/json", 422, "the body is an array: send a JSON object"),
        (b"3", "application/json", 422, "the body is a number: send a JSON object"),
    ],
)
# /tokenize's body is one of three kinds (TGI's, vLLM's prompt or chat): a body of none was refused as about a field
@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_a_body_that_is_not_a_json_object_says_what_it_is(
    client: TestClient, path: str, payload: bytes, content_type: str, status: int, says: str
) -> None:
    response = client.post(path, content=payload, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"], response.text


# a history turn whose call's arguments (JSON text, rendered by templates) are "@"
CALLED = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "@"}}]},
    {"role": "tool", "tool_call_id": "c", "content": "1"},
]
# a tool whose parameters' schema (compiled, or rendered by templates under tool_choice "auto") names a property "@"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"@": {"type": "string"}}}}}]
SURROGATE_BODIES = [
    *((path, json.dumps(body(path, "@")), "invalid_request") for path in ROUTES),
    (
        "/v1/chat/completions",
        json.dumps({"model": "llama", "messages": [{"role": "user", "content": [{"type": "text", "text": "@"}]}]}),
        "invalid_request",
    ),
    ("/v1/chat/completions", json.dumps({"model": "llama", "messages": CALLED}), "invalid_request"),
    ("/tokenize", json.dumps({"prompt": "@"}), "invalid_request"),
    ("/tokenize", json.dumps({"inputs": "@"}), "invalid_request"),
    ("/tokenize", json.dumps({"messages": [{"role": "user", "content": "@"}]}), "invalid_request"),
    ("/tokenize", json.dumps({"messages": CALLED}), "invalid_request"),
    *(
        (
            "/v1/chat/completions",
            json.dumps(body("/v1/chat/completions", tools=TOOLS, tool_choice=choice)),
            "invalid_grammar",
        )
        for choice in ("auto", "required")
    ),
    ("/v1/completions", json.dumps(body("/v1/completions", guided_json={"const": "@"})), "invalid_grammar"),
    ("/v1/completions", json.dumps(body("/v1/completions", guided_regex="@")), "invalid_grammar"),
    ("/generate", json.dumps(body("/generate", grammar={"type": "json", "value": {"enum": ["@"]}})), "invalid_grammar"),
]


@pytest.mark.parametrize(("path", "payload", "code"), SURROGATE_BODIES)
def test_text_that_is_not_unicode_is_a_422(client: TestClient, path: str, payload: str, code: str) -> None:
    # JSON may escape half of a surrogate pair alone: Python holds it, no UTF-8 can, and the tokenizer and the grammar
    # engine raise on it
    status, answer = post(client, path, payload.replace('"@"', '"h\\ud800i"'))
    assert status == 422, (status, answer)
    assert answer["error"]["code"] == code and "unicode" in answer["error"]["message"].lower(), answer


# a schema whose number 123456.0 becomes NaN or Infinity, on each route and field that takes a JSON schema
NUMBER_SCHEMA = {"type": "object", "properties": {"x": {"type": "number", "maximum": 123456.0}}}
SCHEMA_BODIES = [
    (
        "/v1/chat/completions",
        body("/v1/chat/completions", response_format={"type": "json_schema", "json_schema": {"schema": NUMBER_SCHEMA}}),
    ),
    ("/v1/completions", body("/v1/completions", guided_json=NUMBER_SCHEMA)),
    ("/v1/completions", body("/v1/completions", structured_outputs={"json": json.dumps(NUMBER_SCHEMA)})),
    ("/generate", body("/generate", grammar={"type": "json", "value": NUMBER_SCHEMA})),
    ("/generate", body("/generate", grammar={"type": "json", "value": json.dumps(NUMBER_SCHEMA)})),
    ("/generate", body("/generate", response_format={"type": "json_object", "schema": NUMBER_SCHEMA})),
    (
        "/v1/chat/completions",
        body(
            "/v1/chat/completions",
            tools=[{"type": "function", "function": {"name": "f", "parameters": NUMBER_SCHEMA}}],
            tool_choice="required",
        ),
    ),
]


@pytest.mark.parametrize(("path", "payload"), SCHEMA_BODIES)
@pytest.mark.parametrize("value", ["NaN", "-Infinity", "1e999"])
def test_a_schema_holding_nan_or_infinity_is_a_422_saying_where(
    client: TestClient, path: str, payload: dict, value: str
) -> None:
    """Python's JSON reader takes NaN and Infinity (and 1e999 as Infinity), in a body and in a schema sent as text;
    the grammar compiler, reading the schema as JSON, refused it only as "expected value at line 1 column N"."""
    raw = json.dumps(payload).replace("123456.0", value)
    status, answer = post(client, path, raw)
    assert status == 422, (status, answer)
    message = answer["error"]["message"]
    assert answer["error"]["code"] == "invalid_grammar" and "/properties/x/maximum" in message, answer
    assert "NaN and Infinity are not JSON numbers" in message and "send a finite number" in message, answer


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/generate", "max_new_tokens"),
        ("/generate_stream", "max_new_tokens"),
        ("/v1/completions", "max_tokens"),
        ("/v1/completions", "max_completion_tokens"),
        ("/v1/chat/completions", "max_tokens"),
    ],
)
def test_too_many_new_tokens_names_the_field_sent(client: TestClient, path: str, field: str) -> None:
    status, answer = post(client, path, body(path, "hi", **{field: 100}))  # "hi": 2 tokens; 100 > 64
    assert status == 422, answer
    error = answer["error"]
    assert error["code"] == "max_tokens_too_large" and f"{field} 100" in error["message"], error
    if field != "max_new_tokens":
        assert "max_new_tokens" not in error["message"]
    if path == "/v1/completions":
        assert f"{field} <= 62" in error["message"]  # 64 - the prompt's 2 tokens


@pytest.mark.parametrize("path", ROUTES)
def test_a_prompt_that_leaves_no_room_is_prompt_too_long(client: TestClient, path: str) -> None:
    assert_422(client, path, body(path, "x" * 200), "max_seq_len 64", code="prompt_too_long")


@pytest.mark.parametrize("path", ROUTES)
def test_prompt_characters_are_bounded_before_tokenizing(client: TestClient, path: str) -> None:
    assert_422(client, path, body(path, "x" * 100_000), "characters", code="prompt_too_long")


def test_the_ids_of_a_chats_tool_turns_count_against_the_prompts_characters(client: TestClient) -> None:
    """Templates render a history's call ids and tool_call_ids (Mistral's do), which may take 256 characters each:
    1,024 calls and as many tool turns carried ~0.5 MB past the character bound to the tokenizer uncounted."""
    ids = [f"{i:0256d}" for i in range(8)]
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": i, "content": "1"} for i in ids),
    ]
    status, answer = post(client, "/v1/chat/completions", {"model": "llama", "messages": messages, "max_tokens": 1})
    assert status == 422 and answer["error"]["code"] == "prompt_too_long", answer
    assert "characters" in answer["error"]["message"], answer


def test_no_prompt_is_tokenized_or_templated_in_the_servers_process(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing and chat templates run Python (a tokenizer's wrapper, Jinja), which holds the interpreter lock the
    engine thread needs: they run in the tokenizer's worker processes, never in the server's."""
    tokenizer_type = type(client.app.state.runtime.base.tokenizer)  # type: ignore[attr-defined]
    called: list[str] = []

    def spy(name: str) -> Callable[..., object]:
        original = getattr(tokenizer_type, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            called.append(name)
            return original(*args, **kwargs)

        return wrapper

    for name in ("__call__", "encode", "apply_chat_template"):
        monkeypatch.setattr(tokenizer_type, name, spy(name))
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        assert post(client, path, body(path, max_new_tokens=1, max_tokens=1))[0] == 200
    assert called == []


def test_unknown_adapters_share_one_metrics_label(client: TestClient) -> None:
    for i in range(20):
        assert client.post("/generate", json=body("/generate", adapter_id=f"nobody-{i}")).status_code == 404
        assert client.post("/generate", json=body("/generate", adapter_id=f"Bad Name {i}")).status_code == 400
        assert client.post("/v1/completions", json={**body("/v1/completions"), "model": f"x{i}"}).status_code == 404
    metrics = client.get("/metrics").text
    assert "nobody-" not in metrics and "Bad Name" not in metrics and 'adapter="x' not in metrics
    assert 'adapter="<unknown>",status="404"' in metrics and 'adapter="<unknown>",status="400"' in metrics


def test_a_client_that_leaves_is_one_typed_error_not_a_cancellation() -> None:
    class Gone:
        url = SimpleNamespace(path="/generate")

        async def is_disconnected(self) -> bool:
            return True

    async def forever() -> None:
        await asyncio.sleep(60)

    with pytest.raises(ClientDisconnected):
        asyncio.run(until_disconnected(Gone(), forever))  # type: ignore[arg-type]


def test_health_fails_once_the_engine_stopped(app_settings: tuple) -> None:
    with start(app_settings) as c:
        wait_ready(c)
        assert c.get("/health").json() == {"status": "ok"}
        c.app.state.runtime.engine.stop()  # type: ignore[attr-defined]
        response = c.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped"


# Every value has its JSON type, as OpenAI's API wants: pydantic's lax mode read "2" and true as 2 and 1, "true" as
# true, 2.0 as 2, so a client's mistyped field passed as a value it did not write
MISTYPED = [
    ("/v1/completions", body("/v1/completions", n="2"), "n"),
    ("/v1/completions", body("/v1/completions", max_tokens=True), "max_tokens"),
    ("/v1/completions", body("/v1/completions", max_tokens=4.0), "max_tokens"),
    ("/v1/completions", body("/v1/completions", temperature="0.5"), "temperature"),
    ("/v1/completions", body("/v1/completions", echo=1), "echo"),
    ("/v1/completions", body("/v1/completions", logprobs=True), "logprobs"),
    ("/v1/chat/completions", body("/v1/chat/completions", logprobs=1), "logprobs"),
    ("/v1/chat/completions", body("/v1/chat/completions", stream="true"), "stream"),
    ("/v1/chat/completions", body("/v1/chat/completions", seed="7"), "seed"),
    ("/v1/chat/completions", body("/v1/chat/completions", stream_options={"include_usage": "yes"}), "include_usage"),
    ("/v1/responses", {"model": "llama", "input": "hi", "max_output_tokens": "8"}, "max_output_tokens"),
    ("/generate", body("/generate", max_new_tokens="8"), "max_new_tokens"),
    ("/generate", body("/generate", do_sample="true"), "do_sample"),
    ("/generate", {"inputs": "hi", "stream": 0}, "stream"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "false"}, "add_special_tokens"),
    ("/detokenize", {"tokens": ["5"]}, "tokens.0"),
]


@pytest.mark.parametrize(("path", "payload", "field"), MISTYPED, ids=lambda v: v if isinstance(v, str) else "")
def test_a_value_of_another_json_type_is_refused_by_name(client: TestClient, path, payload, field) -> None:
    assert_422(client, path, payload, field)


def test_an_integer_is_a_number(client: TestClient) -> None:
    """JSON has one number type: an integer where a float is asked is that float, as everywhere."""
    assert post(client, "/v1/completions", body("/v1/completions", temperature=1, top_p=1, max_tokens=2))[0] == 200
    assert post(client, "/generate", body("/generate", temperature=1, top_p=1, max_new_tokens=2))[0] == 200


def test_null_is_the_default_where_openai_lets_a_field_be_null(client: TestClient) -> None:
    """OpenAI's spec lets n, stream, echo, the penalties, ... be null, meaning their defaults."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        plain = post(client, path, body(path, max_tokens=3, temperature=0))
        nulls = dict.fromkeys(["n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "seed"])
        nulled = post(client, path, body(path, max_tokens=3, temperature=0, **nulls))
        assert nulled[0] == plain[0] == 200, nulled
        assert nulled[1]["choices"] == plain[1]["choices"]
    assert_422(client, "/v1/completions", {"prompt": "hi", "model": None}, "model")  # no default: still refused


# A field this server does not implement is taken at its no-op value alone, of its own type: a falsy value of another
# type (0 for false, [] for "") was taken as off, and a truthy one was refused as asking for it
UNSUPPORTED_OFF = [
    ("/generate", {"watermark": False}, {"watermark": 0}, "watermark"),
    ("/generate", {"typical_p": 1.0}, {"typical_p": True}, "typical_p"),
    ("/v1/completions", {"suffix": ""}, {"suffix": 0}, "suffix"),
    ("/v1/completions", {"use_beam_search": False}, {"use_beam_search": ""}, "use_beam_search"),
    ("/v1/chat/completions", {"functions": []}, {"functions": {}}, "functions"),
    ("/v1/chat/completions", {"guided_grammar": ""}, {"guided_grammar": False}, "guided_grammar"),
]


@pytest.mark.parametrize(
    ("path", "off", "other", "field"), UNSUPPORTED_OFF, ids=lambda v: v if isinstance(v, str) else ""
)
def test_an_unsupported_field_is_off_only_at_its_own_no_op_value(client: TestClient, path, off, other, field) -> None:
    assert post(client, path, body(path, max_tokens=2, max_new_tokens=2, **off))[0] == 200
    assert_422(client, path, body(path, max_tokens=2, max_new_tokens=2, **other), field)


@pytest.mark.parametrize(
    ("path", "payload", "says"),
    [
        (
            "/v1/chat/completions",
            {"model": "llama", "messages": [{"role": "user", "content": 5}]},
            "messages.0.content:",
        ),
        ("/v1/completions", body("/v1/completions", stop=5), "stop: "),
        (
            "/v1/chat/completions",
            body("/v1/chat/completions", tool_choice={"function": {"name": "f"}}),
            "tool_choice.type:",
        ),
        ("/v1/responses", {"model": "llama", "input": 5}, "input: "),
    ],
)
def test_an_errors_place_is_the_requests_not_pydantics(client: TestClient, path, payload, says) -> None:
    """The place an error names is the request's fields and indexes: none of pydantic's own steps (validators,
    types, a union's member models) that clients cannot read."""
    status, answer = post(client, path, payload)
    message = answer["error"]["message"]
    assert status == 422 and says in message, message
    assert not re.search(r"function-|constrained-|tagged-|\[|NamedToolChoice|\bstr\b\.", message.split(": ", 1)[1]), (
        message
    )
