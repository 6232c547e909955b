"""OpenAI's Responses API end to end, with the `openai` client against the real server on the embedded model (NF4,
CPU): an answer is the Chat Completions answer to the same conversation, streamed events add up to the whole
answer in the order the SDK reads them, calls and structured output hold to their schemas, a conversation's
function_call items are taken, and each request the server cannot answer as asked gets its 4xx while an honest
stream beside it runs unchanged."""

import json
import threading

import httpx
import jsonschema
import openai
import pytest

from e2e.test_tool_calls import MODEL, WEATHER

pytestmark = pytest.mark.e2e
QUESTION = "What is the capital of France?"
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather of a city", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)


def streamed(client: openai.OpenAI, started: threading.Event | None = None, **params: object) -> tuple[list, object]:
    """The stream's events, checked as a client reads them (numbered in order, deltas inside their items), and the
    response its last event carries; `started` is set once the first event is read."""
    events = []
    for event in client.responses.create(stream=True, **params):  # type: ignore[call-overload]
        events.append(event)
        if started is not None:
            started.set()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    texts: dict[str, str] = {}
    for event in events:
        if event.type == "response.output_text.delta":
            texts[event.item_id] = texts.get(event.item_id, "") + event.delta
        elif event.type == "response.output_text.done":
            assert event.text == texts.get(event.item_id, "")
    return events, events[-1].response


# greedy, the embedded model answers it in 7 tokens and ends ("The capital of France is Paris"): 4 cut it, 48 do not
SHORT_ANSWER = f"{QUESTION} Say only the city."


@pytest.mark.parametrize(("max_output_tokens", "cut"), [(4, True), (48, False)])
def test_an_answer_is_the_chat_answer_to_the_same_conversation_streamed_or_not(
    client: openai.OpenAI, max_output_tokens: int, cut: bool
) -> None:
    """Instructions are the conversation's system message. An answer cut by max_output_tokens is incomplete, as
    OpenAI says so, one that ends completed; each request computes its prompt afresh (a cache_salt of its own), so
    greedy answers are equal."""
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": SHORT_ANSWER}],
        max_tokens=max_output_tokens,
        temperature=0,
        extra_body={"cache_salt": f"chat-{max_output_tokens}"},
    )
    params = {"model": MODEL, "instructions": "Answer in one word.", "input": SHORT_ANSWER,
              "max_output_tokens": max_output_tokens, "temperature": 0}  # fmt: skip
    whole = client.responses.create(**params, extra_body={"cache_salt": f"whole-{max_output_tokens}"})
    choice = chat.choices[0]
    assert whole.output_text == choice.message.content and whole.id.startswith("resp_")
    assert choice.finish_reason == ("length" if cut else "stop"), choice
    assert whole.status == ("incomplete" if cut else "completed")
    assert (whole.incomplete_details is not None) == cut
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    (item,) = whole.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    events, final = streamed(client, **params, extra_body={"cache_salt": f"stream-{max_output_tokens}"})
    assert final.output_text == whole.output_text and final.status == whole.status
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def test_a_named_function_and_required_calls_hold_to_the_schema_and_stream_alike(client: openai.OpenAI) -> None:
    params = {"model": MODEL, "input": "What will the weather be in Paris for the next 3 days?", "tools": TOOLS,
              "max_output_tokens": 64, "temperature": 0}  # fmt: skip
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        whole = client.responses.create(**params, tool_choice=choice, extra_body={"cache_salt": f"w-{choice}"})
        assert whole.status == "completed" and whole.output, whole
        for item in whole.output:
            assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
            jsonschema.validate(json.loads(item.arguments), WEATHER)
        # the SDK's own stream reader (it accumulates the events into the response)
        with client.responses.stream(**params, tool_choice=choice, extra_body={"cache_salt": f"s-{choice}"}) as stream:
            final = stream.get_final_response()
        assert [(i.name, i.arguments) for i in final.output] == [(i.name, i.arguments) for i in whole.output]


def test_a_conversation_with_function_call_items_is_taken(client: openai.OpenAI) -> None:
    called = client.responses.create(
        model=MODEL,
        input="What will the weather be in Paris tomorrow?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=48,
        temperature=0,
    ).output[0]
    history = [
        {"role": "user", "content": "What will the weather be in Paris tomorrow?"},
        {"type": "function_call", "call_id": called.call_id, "name": called.name, "arguments": called.arguments},
        {"type": "function_call_output", "call_id": called.call_id, "output": "Sunny, 24 degrees."},
    ]
    answer = client.responses.create(model=MODEL, input=history, max_output_tokens=16, temperature=0)
    assert answer.output_text and answer.output[0].type == "message"


def test_structured_output_holds_to_its_schema(client: openai.OpenAI) -> None:
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"],
            "additionalProperties": False}  # fmt: skip
    answer = client.responses.create(
        model=MODEL,
        input=QUESTION,
        text={"format": {"type": "json_schema", "name": "city", "schema": city, "strict": True}},
        max_output_tokens=32,
        temperature=0,
    )
    jsonschema.validate(json.loads(answer.output_text), city)
    assert answer.text.format.type == "json_schema"


HOSTILE = [
    ({"previous_response_id": "resp_0"}, "keeps no responses"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "only text"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "only messages of text"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "only function tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata keys"),
    ({"input": "x" * 40_000}, "characters; this server takes at most"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "cannot be compiled"),
    ({"model": "no-such-adapter"}, "does not exist"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"repetition_penalty": 1000}, "repetition_penalty"),
]


def test_requests_it_cannot_answer_get_their_4xx_and_an_honest_stream_beside_them_is_unchanged(
    client: openai.OpenAI, server: str
) -> None:
    # 16 tokens (seconds on the CPU) outlast the refusals, each answered before any token is computed
    params = {"model": MODEL, "input": QUESTION, "max_output_tokens": 16, "temperature": 0}
    alone = client.responses.create(**params, extra_body={"cache_salt": "honest-alone"}).output_text
    result: dict[str, str] = {}
    started = threading.Event()

    def honest() -> None:
        _, final = streamed(client, started, **params, extra_body={"cache_salt": "honest-beside"})
        result["text"] = final.output_text

    thread = threading.Thread(target=honest)
    thread.start()
    assert started.wait(60)  # the honest request runs while the hostile ones come
    with httpx.Client(base_url=server, timeout=60) as http:
        for fields, says in HOSTILE:
            response = http.post("/v1/responses", json={**params, **fields})
            assert 400 <= response.status_code < 500, (fields, response.text)
            assert says in response.json()["error"]["message"], (fields, response.text)
    thread.join(120)
    assert result["text"] == alone
