"""tool_choice "auto"'s parsers, without a model: an answer is read into the same content and calls whether it
arrives whole or cut into pieces anywhere (a stream's tokens), and what is not a call stays text."""

import json
import typing

import pytest

from loraplex.settings import Settings
from server.api.schemas import AssistantMessage
from server.api.tool_parsers import TOOL_CALL_PARSERS, Hermes, ParsedCall, StreamedCalls, read_answer


def block(name: str, arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


WEATHER = block("get_weather", {"city": "Paris", "days": 3})
TIME = block("get_time", {"zone": "CET"})
TOOLS = ("get_weather", "get_time", "f")  # the request's tools: a call of another function is no call
# (answer, content, calls as (name, arguments))
ANSWERS: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
    ("", "", []),
    (WEATHER, None, [("get_weather", '{"city": "Paris", "days": 3}')]),
    (
        f"Let me look that up.\n{WEATHER}\n{TIME}\n",  # text before calls, the format's line breaks between them
        "Let me look that up.\n",
        [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"zone": "CET"}')],
    ),
    (
        f"First {WEATHER}  then {TIME} done.",  # text between and after calls, less the whitespace after each
        "First then done.",
        [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"zone": "CET"}')],
    ),
    (  # unicode kept as it is, in the text and in the arguments
        "Météo à Zürich 🌦 <tool_call>" + '{"name": "get_weather", "arguments": {"city": "Zürich 🌦", "note": "\\u00e9"}}'
        "</tool_call>",
        "Météo à Zürich 🌦 ",
        [("get_weather", '{"city": "Zürich 🌦", "note": "é"}')],
    ),
    ('<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),  # no arguments: none
    # a lone surrogate, which UTF-8 cannot hold: escaped in the arguments, and a name of it no name
    (
        '<tool_call>{"name": "f", "arguments": {"x": "\\ud800 é"}}</tool_call>',
        None,
        [("f", '{"x": "\\ud800 \\u00e9"}')],
    ),
    ('<tool_call>{"name": "f\\udc00"}</tool_call>', '<tool_call>{"name": "f\\udc00"}</tool_call>', []),
    # not a call: the block stays text, markers included, where it was
    ("a <tool_call>{not json}</tool_call> b", "a <tool_call>{not json}</tool_call> b", []),
    ('<tool_call>{"name": 5, "arguments": {}}</tool_call>', '<tool_call>{"name": 5, "arguments": {}}</tool_call>', []),
    (
        '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
        [],
    ),
    ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
    *[  # arguments no client could read as JSON
        (f'<tool_call>{{"name": "f", "arguments": {{"x": {n}}}}}</tool_call>',) * 2 + ([],)
        for n in ("NaN", "-Infinity", "1e999")
    ],
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "<tool_call>" + "[" * 100_000 + "</tool_call>", []),
    (  # a bad block beside a good one: each read on its own
        f"<tool_call>oops</tool_call>{TIME}",
        "<tool_call>oops</tool_call>",
        [("get_time", '{"zone": "CET"}')],
    ),
    # unterminated: read up to the answer's end, a call where it is one (a model may stop at its end of turn)
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', None, [("f", '{"a": 1}')]),
    ('Sure. <tool_call>{"name": "f", "argu', 'Sure. <tool_call>{"name": "f", "argu', []),
    ("text then <tool_c", "text then <tool_c", []),  # the beginning of a marker, never finished: text
    ("<<tool_call>{}</tool_call>", "<<tool_call>{}</tool_call>", []),
    ("</tool_call> <tool_call><tool_call>{}</tool_call>", "</tool_call> <tool_call><tool_call>{}</tool_call>", []),
    (
        '<tool_call>{"name": "a</tool_call>", "arguments": {}}',
        '<tool_call>{"name": "a</tool_call>", "arguments": {}}',
        [],
    ),  # the first end marker closes the block, wherever it is
    ("a < b and <tool> <tool_cal", "a < b and <tool> <tool_cal", []),
    # a call of a function that is not among the tools: text, as a block that is no call, beside those that are
    (block("rm_rf", {"path": "/"}), block("rm_rf", {"path": "/"}), []),
    (
        f"{block('get_weathers', {})}{TIME}",
        block("get_weathers", {}),
        [("get_time", '{"zone": "CET"}')],
    ),
    ('<tool_call>{"name": "F"}</tool_call>', '<tool_call>{"name": "F"}</tool_call>', []),  # names are exact
]


def read_whole(answer: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = read_answer(Hermes(TOOLS), answer)
    AssistantMessage(content=content, tool_calls=calls or None).model_dump_json()  # the answer's JSON holds it
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    return content, [(c.function.name, c.function.arguments) for c in calls]


def read_streamed(pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The pieces through StreamedCalls, checked to be OpenAI's form of a stream, added up as a client does."""
    streamed = StreamedCalls(Hermes(TOOLS))
    content: list[str] = []
    calls: dict[int, dict] = {}
    for i, piece in enumerate(pieces):
        for chunk in streamed.deltas(piece, ended=i == len(pieces) - 1):
            assert chunk.content != "" and (chunk.content is None) != (chunk.tool_calls is None)
            content.append(chunk.content or "")
            if chunk.tool_calls is None:
                continue
            (delta,) = chunk.tool_calls  # one call delta a chunk
            if delta.id is not None:
                assert delta.index == len(calls) and delta.type == "function" and delta.function.arguments == ""
                assert delta.id.startswith("call_") and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            else:
                assert delta.type is None and delta.function.name is None and delta.index == len(calls) - 1
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert streamed.calls == len(calls)
    joined = "".join(content)
    return (joined or None) if calls else joined, [(c["name"], c["arguments"]) for c in calls.values()]


@pytest.mark.parametrize(("answer", "content", "calls"), ANSWERS, ids=range(len(ANSWERS)))
def test_an_answer_is_read_into_its_content_and_calls_whole_or_cut_at_any_point(
    answer: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    assert read_whole(answer) == (content, calls)
    assert read_streamed([answer]) == (content, calls)
    if len(answer) > 400:  # the deep one: a few cuts
        cuts = [[answer[:i], answer[i:]] for i in (1, 11, 50_000, len(answer) - 5)]
    else:  # every cut into two, and one character at a time
        cuts = [[answer[:i], answer[i:]] for i in range(len(answer) + 1)] + [list(answer)]
    for pieces in cuts:
        assert read_streamed(pieces) == (content, calls), pieces
    assert read_streamed([*answer, ""]) == (content, calls)  # the end, in an event of no text


def test_text_that_may_begin_a_call_is_held_back_only_until_it_cannot() -> None:
    parser = Hermes(TOOLS)
    assert parser.feed("Hello <tool") == ["Hello "]
    assert parser.feed("box> there") == ["<toolbox> there"]
    assert parser.feed("<tool_call>") == []
    assert parser.feed('{"name": "f", "arguments": {}}</tool_call>\n\n') == [ParsedCall("f", "{}")]
    assert parser.feed("\n") == []  # the whitespace after a call
    assert parser.feed(" ok") == ["ok"]
    assert parser.finish() == []


def test_held_back_text_is_no_longer_than_the_marker_outside_a_call() -> None:
    parser = Hermes(TOOLS)
    for piece in ["<", "t", "o", "o", "l", "_", "c", "a", "l", "l"]:
        assert parser.feed(piece) == []
    assert len(parser._held) == len(Hermes.START) - 1
    assert parser.feed("s") == ["<tool_calls"]


def test_every_named_parser_is_a_choice_of_the_setting_and_the_default_is_off() -> None:
    (choices,) = [typing.get_args(f.annotation) for n, f in Settings.model_fields.items() if n == "tool_call_parser"]
    assert set(choices) == {"off", *TOOL_CALL_PARSERS}
    assert Settings().tool_call_parser == "off"
    assert Settings(tool_call_parser="hermes").tool_call_parser == "hermes"
