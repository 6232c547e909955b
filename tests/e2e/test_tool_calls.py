"""OpenAI tool calling end to end, with the `openai` client against the real server on the embedded model (NF4,
CPU): a named function's arguments and tool_choice "required"'s calls hold to the tools' schemas, streamed deltas
add up to the whole answer, a conversation's tool turns are taken, and each hostile tools request gets its 4xx
while an honest call runs beside it, unchanged."""

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from e2e.server import embedded_server
from server.api.tool_parsers import Hermes, read_answer

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} of a place", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MESSAGES = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)


def calls_of(message) -> list[tuple[str, str]]:
    """(name, arguments) of each call, every one checked against its tool's schema."""
    assert message.content is None and message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
    return [(call.function.name, call.function.arguments) for call in message.tool_calls]


def streamed_calls(client: openai.OpenAI, **params: object) -> tuple[list[list[tuple[str, str]]], list[str | None]]:
    """Each choice's calls as its deltas add up (OpenAI's form: a call's first delta has its id, type and name,
    the others fragments of its arguments), and each choice's finish reason."""
    calls: dict[int, dict[int, dict]] = {}
    finish: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(stream=True, **params):  # type: ignore[call-overload]
        for choice in chunk.choices:
            assert not choice.delta.content, choice  # no text beside the calls
            for delta in choice.delta.tool_calls or []:
                own = calls.setdefault(choice.index, {})
                if delta.id is not None:
                    assert delta.index == len(own) and delta.type == "function" and delta.function.name in SCHEMAS
                    own[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
                else:
                    assert delta.function.name is None
                    own[delta.index]["arguments"] += delta.function.arguments
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    indexes = sorted(finish)
    return [[(c["name"], c["arguments"]) for c in calls[i].values()] for i in indexes], [finish[i] for i in indexes]


def test_a_named_function_is_called_with_arguments_of_its_schema_streamed_or_not(client: openai.OpenAI) -> None:
    """OpenAI's and vLLM's finish reason for a named function is "stop"; each request computes its prompt afresh (a
    cache_salt of its own), so greedy answers are equal."""
    params = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 48,
              "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**params, extra_body={"cache_salt": "named-whole"})
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    calls = calls_of(choice.message)
    assert [name for name, _ in calls] == ["get_weather"]
    streamed, finish = streamed_calls(client, **params, extra_body={"cache_salt": "named-stream"})
    assert streamed == [calls] and finish == ["stop"]


def test_required_calls_are_of_the_tools_each_choice_its_own_and_streamed_alike(client: openai.OpenAI) -> None:
    """tool_choice "required": one or more calls (finish reason "tool_calls", as OpenAI's and vLLM's), each of a
    tool and of its schema; n choices, sampled, each with calls of its own; a stream adds up to the same calls."""
    params = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 96,
              "temperature": 1.0, "seed": 7, "n": 3}  # fmt: skip
    whole = client.chat.completions.create(**params, extra_body={"cache_salt": "required-whole"})
    assert [c.finish_reason for c in whole.choices] == ["tool_calls"] * 3
    answers = [calls_of(c.message) for c in whole.choices]
    assert len({json.dumps(a) for a in answers}) > 1  # sampled choices differ
    streamed, finish = streamed_calls(client, **params, extra_body={"cache_salt": "required-stream"})
    assert streamed == answers and finish == ["tool_calls"] * 3
    one = client.chat.completions.create(**{**params, "n": 1, "parallel_tool_calls": False})
    assert len(calls_of(one.choices[0].message)) == 1


def test_a_required_answer_cut_by_the_clients_stop_sequence_is_not_passed_off_as_calls(client: openai.OpenAI) -> None:
    """A "required" answer that the client's own stop sequence cuts is unfinished JSON: its finish reason stays
    "stop", not "tool_calls" (which would have the client make calls of it), and vLLM's stop_reason names the
    sequence, streamed or not; an answer that ends whole has none."""
    params = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 96,
              "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**params, extra_body={"cache_salt": "uncut"}).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.model_extra["stop_reason"] is None
    cut = {**params, "stop": ["parameters"]}  # every call's JSON holds it: {"name": ..., "parameters": ...}
    choice = client.chat.completions.create(**cut, extra_body={"cache_salt": "cut"}).choices[0]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", "parameters")
    last = [c for c in client.chat.completions.create(stream=True, **cut, extra_body={"cache_salt": "cut-stream"})
            if c.choices and c.choices[0].finish_reason is not None]  # fmt: skip
    assert [(c.choices[0].finish_reason, c.choices[0].model_extra["stop_reason"]) for c in last] == [
        ("stop", "parameters")
    ]


def test_a_conversation_with_tool_turns_is_taken(client: openai.OpenAI) -> None:
    """An assistant's earlier calls and the tool messages answering them reach the chat template; the next answer
    can be text or another call."""
    called = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=48, temperature=0
    ).choices[0]
    call = called.message.tool_calls[0]
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."},
    ]
    text = client.chat.completions.create(model=MODEL, messages=history, max_tokens=16, temperature=0)
    assert text.choices[0].message.content and not text.choices[0].message.tool_calls
    again = client.chat.completions.create(
        model=MODEL,
        messages=[*history, {"role": "user", "content": "And the time in Paris?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=16,
        temperature=0,
    )
    assert [name for name, _ in calls_of(again.choices[0].message)] == ["get_time"]


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tools_with(**function: object) -> list[dict]:
    return [{"type": "function", "function": {"name": "get_weather", **function}}]


# (the body's fields besides model, messages and max_tokens, the status, the error code, a phrase of its message)
HOSTILE: list[tuple[dict, int, str, str]] = [
    ({"tools": TOOLS}, 422, "invalid_request", 'tool_choice "auto"'),  # a server without --tool-call-parser
    ({"tools": TOOLS, "tool_choice": "auto"}, 422, "invalid_request", 'send tool_choice "required"'),
    ({"tool_choice": "required"}, 422, "invalid_request", "needs tools"),
    ({"tools": [*TOOLS, TOOLS[0]], "tool_choice": "required"}, 422, "invalid_request", "twice"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        422,
        "invalid_request",
        "not among tools",
    ),
    ({"tools": tools_with(name="x" * 65), "tool_choice": "required"}, 422, "invalid_request", "1 to 64"),
    ({"tools": tools_with(name="rm -rf"), "tool_choice": "required"}, 422, "invalid_request", "1 to 64"),
    ({"tools": [TOOLS[0]] * 129, "tool_choice": "required"}, 422, "invalid_request", "at most 128"),
    ({"tools": tools_with(parameters=deep_schema(40)), "tool_choice": NAMED}, 422, "invalid_grammar", "nests"),
    (
        {"tools": tools_with(parameters={"enum": ["x" * 40_000]}), "tool_choice": NAMED},
        422,
        "invalid_grammar",
        "at most 32768",
    ),
    (
        {"tools": tools_with(parameters={"type": "foo"}), "tool_choice": "required"},
        422,
        "invalid_grammar",
        "the tools' parameters",
    ),
    (
        {"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}},
        422,
        "invalid_grammar",
        "send one",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}] * 1100}]},
        422,
        "invalid_request",
        "tool calls",
    ),
]


def test_hostile_tools_requests_get_their_4xx_and_an_honest_call_beside_them_is_unchanged(
    server: str, client: openai.OpenAI
) -> None:
    params = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 48,
              "temperature": 0}  # fmt: skip
    alone = calls_of(client.chat.completions.create(**params, extra_body={"cache_salt": "alone"}).choices[0].message)
    beside: list = []
    stream = client.chat.completions.create(stream=True, **params, extra_body={"cache_salt": "beside"})
    first = next(iter(stream))  # the honest request runs (its role chunk is out) while the hostile ones come
    reader = threading.Thread(target=lambda: beside.extend(stream))
    reader.start()
    try:
        for fields, status, code, says in HOSTILE:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **fields}
            answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
            assert answer.status_code == status, (fields.keys(), answer.text[:300])
            error = answer.json()["error"]
            assert error["code"] == code and says in error["message"], (fields.keys(), error)
    finally:
        reader.join(timeout=120)
    deltas = [d for chunk in [first, *beside] for c in chunk.choices for d in c.delta.tool_calls or []]
    assert [(deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas))] == alone
    assert httpx.get(f"{server}/health").status_code == 200


# ---- tool_choice "auto", read by --tool-call-parser ---------------------------------------------------------

SUM = [{"role": "user", "content": "What is 2+2? Answer with the number only."}]  # greedy: "2 + 2 = 4", then the end
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
# the embedded model writes no calls of its own (its template does not show tools), but greedy it repeats a turn
# of its history when asked to: this one, text then a call in Hermes's format
REPEATED_CALL = [
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "Let me check.\n" + HERMES_CALL},
    {"role": "user", "content": "Say it again, exactly the same."},
]


@pytest.fixture(scope="module")
def auto_client(embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A server with --tool-call-parser hermes, started once for this module's "auto" tests (~15 s on two cores)."""
    tmp = tmp_path_factory.mktemp("auto")
    flags = ("--max-batch-size", "4", "--max-seq-len", "512", "--tool-call-parser", "hermes")
    with embedded_server(tmp, embedded_cache_dir, *flags) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def streamed_answers(client: openai.OpenAI, **params: object) -> list[tuple[str | None, list[tuple[str, str]], str]]:
    """Each choice's content, calls and finish reason as its chunks add up; each chunk holds one call delta at most,
    a call's first with its id, type and name, the next its arguments."""
    content: dict[int, str] = {}
    calls: dict[int, list[dict]] = {}
    finish: dict[int, str] = {}
    ids: list[str] = []
    for chunk in client.chat.completions.create(stream=True, **params):  # type: ignore[call-overload]
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            own = calls.setdefault(choice.index, [])
            assert len(choice.delta.tool_calls or []) <= 1, choice.delta
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index == len(own) and delta.type == "function" and delta.id.startswith("call_")
                    ids.append(delta.id)
                    own.append({"name": delta.function.name, "arguments": delta.function.arguments or ""})
                else:
                    assert delta.function.name is None and delta.index == len(own) - 1
                    own[-1]["arguments"] += delta.function.arguments
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert len(set(ids)) == len(ids)  # every call of every choice an id of its own
    return [
        ((content[i] or None) if calls[i] else content[i], [(c["name"], c["arguments"]) for c in calls[i]], finish[i])
        for i in sorted(finish)
    ]


def whole_answer(choice) -> tuple[str | None, list[tuple[str, str]], str]:
    calls = choice.message.tool_calls or []
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    return choice.message.content, [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason


def test_auto_is_refused_naming_the_flag_on_a_server_without_a_parser(client: openai.OpenAI) -> None:
    for choice in ({}, {"tool_choice": "auto"}):  # sent, or OpenAI's default where tools are sent
        with pytest.raises(openai.UnprocessableEntityError, match=r'tool_choice "auto".*--tool-call-parser \(hermes\)'):
            client.chat.completions.create(model=MODEL, messages=SUM, tools=TOOLS, max_tokens=8, **choice)


def test_auto_answers_text_as_content_streamed_or_not(auto_client: openai.OpenAI) -> None:
    """The model answers in text: its content, finish reason "stop", as the same request answers without tools
    (the embedded template does not show them: the prompt is the same); each request computes its prompt afresh."""
    params = {"model": MODEL, "messages": SUM, "max_tokens": 32, "temperature": 0}
    plain = auto_client.chat.completions.create(**params, extra_body={"cache_salt": "plain"}).choices[0]
    assert plain.finish_reason == "stop" and "4" in plain.message.content
    whole = auto_client.chat.completions.create(**params, tools=TOOLS, extra_body={"cache_salt": "auto-whole"})
    assert whole_answer(whole.choices[0]) == (plain.message.content, [], "stop")
    streamed = streamed_answers(auto_client, **params, tools=TOOLS, tool_choice="auto",
                                extra_body={"cache_salt": "auto-stream"})  # fmt: skip
    assert streamed == [(plain.message.content, [], "stop")]
    with pytest.raises(openai.UnprocessableEntityError, match="leaves no way to call"):
        auto_client.chat.completions.create(**params, tools=TOOLS, response_format={"type": "json_object"})
    named = auto_client.chat.completions.create(**params, tools=TOOLS, tool_choice=NAMED)  # forced, as before
    assert [name for name, _ in calls_of(named.choices[0].message)] == ["get_weather"]


def test_auto_reads_the_models_calls_out_of_its_text_streamed_or_not_each_choice_its_own(
    auto_client: openai.OpenAI,
) -> None:
    """The text before the call is content, the call a tool call, finish reason "tool_calls"; streamed, the same,
    for each of n choices, with ids of their own."""
    params = {"model": MODEL, "messages": REPEATED_CALL, "tools": TOOLS, "max_tokens": 48, "temperature": 0}
    raw = auto_client.chat.completions.create(**params, tool_choice="none", extra_body={"cache_salt": "raw"})
    text = raw.choices[0].message.content
    assert HERMES_CALL in text  # the model's answer, the tools unused: a call in the format, as asked
    content, calls = read_answer(Hermes(SCHEMAS), text)
    expected = (content, [(c.function.name, c.function.arguments) for c in calls], "tool_calls")
    assert content and calls and expected[1] == [("get_weather", '{"city": "Paris", "days": 3}')]  # text, then the call
    whole = auto_client.chat.completions.create(**params, extra_body={"cache_salt": "calls-whole"})
    assert whole_answer(whole.choices[0]) == expected
    jsonschema.validate(json.loads(whole.choices[0].message.tool_calls[0].function.arguments), WEATHER)
    streamed = streamed_answers(auto_client, **params, n=2, extra_body={"cache_salt": "calls-stream"})
    assert streamed == [expected, expected]


def test_auto_leaves_a_call_of_a_function_not_among_the_tools_as_text_streamed_or_not(
    auto_client: openai.OpenAI,
) -> None:
    """The model repeats its call of get_weather, but this request's tools hold get_time alone: the client has no
    get_weather to run, so the call stays in the content, as the model wrote it, and the finish reason is the
    text's, not "tool_calls"."""
    params = {"model": MODEL, "messages": REPEATED_CALL, "tools": [TOOLS[1]], "max_tokens": 48, "temperature": 0}
    raw = auto_client.chat.completions.create(**params, tool_choice="none", extra_body={"cache_salt": "other-raw"})
    text = raw.choices[0].message.content
    assert HERMES_CALL in text and raw.choices[0].finish_reason == "stop"
    whole = auto_client.chat.completions.create(**params, extra_body={"cache_salt": "other-whole"})
    assert whole_answer(whole.choices[0]) == (text, [], "stop")
    streamed = streamed_answers(auto_client, **params, extra_body={"cache_salt": "other-stream"})
    assert streamed == [(text, [], "stop")]
