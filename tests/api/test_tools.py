"""Tool calling's pure parts, without a model: the request's checks, the grammar of tool_choice "required" (its
references moved with each tool's schema, its bounds), and the reading of an answer into calls, streamed or whole."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from loraplex.synthetic import BYTE_VOCAB, byte_tokenizer
from server.api.schemas import AssistantMessage, ChatCompletionRequest, ChatDelta
from server.api.tools import CALLS_DEPTH, MAX_TOOLS, CallScanner, read_calls, rebased, tool_plan
from server.grammar import MAX_GRAMMAR_CHARS, MAX_SCHEMA_DEPTH, Grammars, InvalidGrammar
from server.tokenizer_workers import _with_argument_objects

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def tool(name: str, parameters: dict | None = None) -> dict:
    function: dict = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def refusal(**fields: object) -> str:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    return str(info.value)


NAMED = {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tool_choice": "required"}, 'tool_choice "required" needs tools'),
        ({"tool_choice": NAMED}, "needs tools"),
        ({"tools": [tool("weather"), tool("weather")], "tool_choice": "required"}, "'weather' twice"),
        ({"tools": [tool("time")], "tool_choice": NAMED}, "'weather', which is not among tools ('time')"),
        ({"tools": [tool("a b")], "tool_choice": "required"}, "'a b' is not 1 to 64"),
        ({"tools": [tool("x" * 65)], "tool_choice": "required"}, "is not 1 to 64"),
        ({"tools": [tool("é")], "tool_choice": "required"}, "is not 1 to 64"),
        ({"tools": [tool("w")], "tool_choice": "sometimes"}, 'tool_choice is "none", "auto", "required"'),
        ({"tools": [{"type": "custom", "function": {"name": "w"}}], "tool_choice": "required"}, "'function'"),
        ({"tools": [tool(f"t{i}") for i in range(MAX_TOOLS + 1)], "tool_choice": "required"}, "at most 128"),
        ({"functions": [{"name": "w"}]}, "send them as tools"),
    ],
)
def test_tools_and_tool_choice_that_cannot_be_answered_as_asked_are_refused_saying_what_to_send(
    fields: dict, says: str
) -> None:
    assert says in refusal(**fields)


def test_none_keeps_tools_unused_and_forcing_choices_plan_a_grammar() -> None:
    assert chat(tools=[tool("weather")], tool_choice="none").tool_plan is None
    for auto in (chat(tools=[tool("weather", WEATHER)]), chat(tools=[tool("weather")], tool_choice="auto")):
        plan = auto.tool_plan  # OpenAI's default with tools: the tools go to the template, the answer is free
        assert auto.auto_tools and plan is not None and plan.mode == "auto" and plan.spec is None
        assert plan.template_tools[0]["function"]["name"] == "weather" and auto.grammar_spec() is None
    with pytest.raises(InvalidGrammar, match='tool_choice "auto" lets the model answer in text or call a tool'):
        chat(tools=[tool("weather")], response_format={"type": "json_object"}).grammar_spec()
    assert not chat(tools=[tool("weather")], tool_choice="required").auto_tools
    named = chat(tools=[tool("weather", WEATHER), tool("time")], tool_choice=NAMED).tool_plan
    assert named is not None and named.mode == "named" and named.name == "weather"
    assert json.loads(named.spec.text) == WEATHER  # the function's own schema: its arguments are the answer
    required = chat(tools=[tool("weather", WEATHER), tool("time")], tool_choice="required").tool_plan
    assert required is not None and required.mode == "required"
    schema = json.loads(required.spec.text)
    names = [branch["properties"]["name"]["const"] for branch in schema["items"]["anyOf"]]
    assert names == ["weather", "time"] and "maxItems" not in schema
    empty = schema["items"]["anyOf"][1]["properties"]["parameters"]  # no parameters: an empty object
    assert empty == {"type": "object", "properties": {}, "additionalProperties": False}
    single = chat(tools=[tool("time")], tool_choice="required", parallel_tool_calls=False).tool_plan
    assert single is not None and json.loads(single.spec.text)["maxItems"] == 1


def test_a_tools_references_to_its_own_root_follow_it_into_the_calls_schema() -> None:
    """Pydantic's schemas refer to "#/$defs/...": moved under a branch of the anyOf, they must point there. A
    property named like a keyword is a name; an enum holding a "$ref" is data."""
    schema = {
        "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "type": "object",
        "properties": {
            "p": {"$ref": "#/$defs/P"},
            "again": {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
            "enum": {"$ref": "#/$defs/P"},
            "data": {"enum": [{"$ref": "#/kept"}]},
        },
    }
    at = "#/items/anyOf/3/properties/parameters"
    moved = rebased(schema, at)
    assert moved["properties"]["p"] == {"$ref": f"{at}/$defs/P"}
    assert moved["properties"]["again"]["anyOf"][1] == {"$ref": at}
    assert moved["properties"]["enum"] == {"$ref": f"{at}/$defs/P"}
    assert moved["properties"]["data"] == {"enum": [{"$ref": "#/kept"}]}
    assert moved["$defs"] == schema["$defs"]


def test_the_calls_schema_takes_each_tools_depth_bound_and_a_size_bound_naming_the_tools() -> None:
    deep: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 - 1):  # two levels a property: at the bound, alone and within the calls
        deep = {"type": "object", "properties": {"a": deep}}
    plan = chat(tools=[tool("deep", deep)], tool_choice="required").tool_plan
    assert plan is not None and CALLS_DEPTH > 0
    deeper = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidGrammar, match=r"tools\[1\] \(deeper\): its parameters: .* nests"):
        _ = chat(tools=[tool("deep", deep), tool("deeper", deeper)], tool_choice="required").tool_plan
    # each schema within the bound, together past it: "required" compiles them into one
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_GRAMMAR_CHARS // 64)}}
    many = [tool(f"t{i}", wide) for i in range(4)]
    with pytest.raises(InvalidGrammar, match='tool_choice "required" compiles the 4 tools'):
        _ = chat(tools=many, tool_choice="required").tool_plan
    named = chat(tools=many, tool_choice={"type": "function", "function": {"name": "t2"}}).tool_plan
    assert named is not None and json.loads(named.spec.text) == wide


def test_the_calls_grammar_takes_calls_of_the_tools_and_refuses_any_other_name() -> None:
    tokenizer = byte_tokenizer()
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    try:
        tools = [
            tool("weather", WEATHER),
            tool("time", {"type": "object", "properties": {"zone": {"enum": ["utc"]}}, "additionalProperties": False}),
        ]
        plan = tool_plan(chat(tools=tools, tool_choice="required").tools or [], "required", True)
        grammar = asyncio.run(grammars.get(plan.spec))
    finally:
        grammars.close()

    def takes(text: str) -> bool:
        matcher = grammar.matcher()
        try:
            for token in tokenizer(text)["input_ids"]:
                matcher.advance(token)
        except ValueError:
            return False
        return matcher.is_finished()

    assert takes('[{"name":"weather","parameters":{"city":"Oslo","days":2}},{"name":"time","parameters":{}}]')
    assert not takes('[{"name":"other","parameters":{}}]')
    assert not takes('[{"name":"time","parameters":{"city":"Oslo","days":2}}]')  # another tool's arguments
    assert not takes("[]")


CALLS = [
    ("weather", '{"city":"a}\\"]b","days":2}'),  # braces, brackets and escaped quotes in a string
    ("time", "{}"),
    ("nested", '{"a":[{"b":[1,{"c":"}"}]}],"d":null}'),
    ("scalar", "5"),
]
REQUIRED_TEXT = "[" + ",".join(f'{{"name":"{n}","parameters":{a}}}' for n, a in CALLS) + "]"


@pytest.mark.parametrize("step", [1, 2, 7, len(REQUIRED_TEXT)])
def test_a_required_answer_is_read_into_the_same_calls_streamed_in_any_pieces_or_whole(step: int) -> None:
    scanner = CallScanner()
    deltas = []
    for i in range(0, len(REQUIRED_TEXT), step):
        deltas += scanner.feed(REQUIRED_TEXT[i : i + step])
    # OpenAI's stream: a call's first delta has its index, id, type and name; the others argument fragments
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta.id is not None:
            assert delta.index == len(calls) and delta.type == "function" and delta.function.arguments == ""
            calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
        else:
            assert delta.function.name is None and delta.id is None
            calls[delta.index]["arguments"] += delta.function.arguments
    assert [(c["name"], c["arguments"]) for c in calls.values()] == CALLS
    assert [(c.id, c.function.name, c.function.arguments) for c in scanner.calls()] == [
        (c["id"], c["name"], c["arguments"]) for c in calls.values()
    ]
    assert len({c["id"] for c in calls.values()}) == len(CALLS) and all(
        c["id"].startswith("call_") for c in calls.values()
    )
    assert [(c.function.name, c.function.arguments) for c in read_calls(REQUIRED_TEXT, None)] == CALLS


def test_a_named_answer_is_its_arguments_and_an_answer_cut_short_keeps_what_it_has() -> None:
    scanner = CallScanner("weather")
    first, *rest = scanner.feed('{"city":')
    assert first.id is not None and first.function.name == "weather" and first.function.arguments == ""
    assert [d.function.arguments for d in rest + scanner.feed('"Oslo"}')] == ['{"city":', '"Oslo"}']
    assert [(c.function.name, c.function.arguments) for c in scanner.calls()] == [("weather", '{"city":"Oslo"}')]
    # cut by max_tokens: the calls read so far, the last one's arguments as far as they went
    cut = '[{"name":"time","parameters":{}},{"name":"weather","parameters":{"city":"Os'
    assert [(c.function.name, c.function.arguments) for c in read_calls(cut, None)] == [
        ("time", "{}"),
        ("weather", '{"city":"Os'),
    ]
    assert read_calls('[{"name":"wea', None) == []  # no name yet: no call


def test_history_tool_turns_are_passed_to_the_template_and_bounded() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
    body = chat(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    )
    assert [m.template() for m in body.messages] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    many = [{"role": "assistant", "tool_calls": [call] * 600}] * 2
    assert "1200 tool calls; at most 1024" in refusal(messages=many)


def test_answers_without_calls_keep_their_shape_and_call_deltas_leave_out_what_they_do_not_carry() -> None:
    assert AssistantMessage(content="hi").model_dump_json() == '{"role":"assistant","content":"hi"}'
    assert ChatDelta(content="hi").model_dump_json() == '{"role":null,"content":"hi"}'
    fragment = CallScanner("f")
    fragment.feed("")
    (delta,) = fragment.feed("{}")
    assert ChatDelta(tool_calls=[delta]).model_dump_json() == (
        '{"role":null,"content":null,"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}'
    )


def test_the_templates_take_a_calls_arguments_as_an_object_where_they_are_one() -> None:
    def call(arguments: str) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}

    assert _with_argument_objects(call('{"a": [1]}'))["tool_calls"][0]["function"]["arguments"] == {"a": [1]}
    for kept in ("[1]", "not json", "[" * 100_000):
        assert _with_argument_objects(call(kept)) == call(kept)
    assert _with_argument_objects({"role": "user", "content": "x"}) == {"role": "user", "content": "x"}
