"""The Responses API's request, read into the Chat Completions request it asks for, without a model: its input
items as messages, its tools and tool_choice, text.format, the sampling fields it shares, and what it refuses."""

import pytest
from pydantic import ValidationError

from server.api.responses_schemas import MAX_METADATA_KEYS, ResponsesRequest
from server.api.schemas import MAX_CONTENT_PARTS
from server.tokenizer_pool import MAX_MESSAGES

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def read(**fields: object) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def refusal(**fields: object) -> str:
    with pytest.raises(ValidationError) as info:
        read(**fields)
    return str(info.value)


def test_a_conversation_of_items_is_the_chat_of_its_turns() -> None:
    """Instructions first, as a system message; a turn's function_call items one assistant message with its calls;
    each output a tool message answering its call; text parts joined."""
    chat = read(
        instructions="Be brief.",
        input=[
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Oslo?"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city": "Bergen"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": "sun"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Rain and sun."}]},
            {"role": "developer", "content": "Answer in French."},
        ],
    ).chat_request()
    assert [m.template() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Bergen"}'}},
            ],
        },
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "tool", "content": "sun", "tool_call_id": "c2"},
        {"role": "assistant", "content": "Rain and sun."},
        {"role": "developer", "content": "Answer in French."},
    ]


def test_the_answers_settings_are_the_chat_requests() -> None:
    tools = [{"type": "function", "name": "weather", "description": "d", "parameters": WEATHER, "strict": True}]
    chat = read(
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        stream=True,
        tools=tools,
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
        seed=3,
        top_k=5,
    ).chat_request()
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.seed, chat.top_k) == (7, 0.5, 0.9, 3, 5)
    assert chat.stream and chat.include_usage and chat.n == 1 and not chat.logprobs
    assert chat.tools is not None and chat.tools[0].function.model_dump() == {
        "name": "weather", "description": "d", "parameters": WEATHER, "strict": True
    }  # fmt: skip
    assert chat.tool_plan is not None and chat.tool_plan.mode == "named" and chat.tool_plan.name == "weather"
    assert chat.parallel_tool_calls is False
    schema = read(text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER}}).chat_request()
    assert schema.response_format is not None and schema.response_format.json_schema is not None
    assert schema.response_format.json_schema.schema_ == WEATHER
    assert read(text={"format": {"type": "json_object"}}).chat_request().response_format.type == "json_object"
    assert read(text={"format": {"type": "text"}}).chat_request().response_format is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"previous_response_id": "resp_1"}, "keeps no responses: send the whole conversation in input"),
        ({"background": True}, "background responses are not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "only messages of text, and the function_call"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "only messages of text, and the function_call"),
        ({"tools": [{"type": "web_search"}]}, "only function tools are supported, not 'web_search'"),
        ({"tools": [{"type": "function", "name": "a b"}]}, "is not 1 to 64"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 'needs its "schema"'),
        ({"metadata": {f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}}, "at most 16"),
        ({"metadata": {"k": "v" * 513}}, "strings of at most 512"),
        ({"input": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, f"at most {MAX_MESSAGES}"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * (MAX_CONTENT_PARTS + 1)}]},
            f"at most {MAX_CONTENT_PARTS} in all",
        ),
        ({"input": "\ud800"}, "half of a UTF-16 surrogate pair"),
        ({"instructions": "\ud800"}, "half of a UTF-16 surrogate pair"),
        ({"max_output_tokens": 0}, "greater than or equal to 1"),
        ({"temperature": float("nan")}, "finite number"),
        ({"truncation": "auto"}, 'send "disabled"'),
        ({"top_logprobs": 5}, "logprobs are not implemented on this route"),
        ({"logprobs": True}, "logprobs are not implemented on this route"),
        ({"max_tokens": 5}, "max_output_tokens"),
        ({"max_completion_tokens": 5}, "max_output_tokens"),
        ({"response_format": {"type": "json_object"}}, "text.format"),
        ({"n": 3}, "one response a request"),
    ],
)
def test_what_the_server_cannot_answer_as_asked_is_refused_saying_what_to_send(fields: dict, says: str) -> None:
    assert says in refusal(**fields)


def test_those_fields_at_their_no_op_values_are_taken() -> None:
    read(
        truncation="disabled", top_logprobs=0, logprobs=False, n=1, max_tokens=None, response_format=None
    ).chat_request()


def test_the_chat_requests_own_checks_apply() -> None:
    """Fields past the Responses request's own (the sampling extras, the tools against tool_choice) are checked as
    the chat route checks them."""
    with pytest.raises(ValidationError, match="needs tools"):
        read(tool_choice="required").chat_request()
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        read(repetition_penalty=1000).chat_request()
