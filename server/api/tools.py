"""OpenAI tool calling, forced through the grammar engine, as vLLM does it without a parser of the model's own call
format: `tool_choice` naming a function generates that function's arguments under its `parameters` schema;
`"required"` generates a JSON array of calls, `[{"name": ..., "parameters": ...}, ...]`, under a schema that is an
anyOf over the tools (each branch fixing the name and its parameters' schema), and the array is read into
tool_calls. `"auto"` (OpenAI's default where tools are sent) lets the model choose between text and calls, which
only a parser of each model's own format can tell apart: its answer is generated freely and read by the parser
that --tool-call-parser names (tool_parsers.py), and refused, saying what to send instead, on a server without one.

The grammar generates compact JSON with the properties in the schema's order (llguidance's), so a "required"
answer is `[{"name":"N","parameters":V},...]` to the byte: CallScanner reads it as it streams, and the same scanner
reads a whole answer, so that a stream's deltas add up to what the answer would have held."""

import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from server.api.request_config import REQUEST
from server.grammar import MAX_GRAMMAR_CHARS, GrammarSpec, InvalidGrammar

MAX_TOOLS = 128  # OpenAI's bound on tools
MAX_TOOL_NAME_CHARS = 64
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's: the name also goes unescaped into the calls' JSON
MAX_DESCRIPTION_CHARS = 8192  # a tool's description, rendered into the prompt by templates that show tools
# A function without parameters (or with {}, as vLLM reads it) is called with an empty object
NO_PARAMETERS: dict = {"type": "object", "properties": {}, "additionalProperties": False}
# Levels of objects and arrays "required"'s schema puts around each tool's parameters (the array, its items, the
# anyOf list, a branch, its properties): each tool's schema is held to the depth bound on its own
CALLS_DEPTH = 5
_CALLS_WRAPPER_CHARS = 160  # a branch's characters besides its name and parameters, counted generously
# keys whose value maps names to schemas (the names are not keywords), and keys whose value is data, not a schema
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_DATA = frozenset({"enum", "const", "default", "examples"})

ToolChoiceMode = Literal["none", "auto", "required"]


def _tool_name(name: str) -> str:
    if len(name) > MAX_TOOL_NAME_CHARS or not _TOOL_NAME.fullmatch(name):
        shown = name if len(name) <= MAX_TOOL_NAME_CHARS else name[:MAX_TOOL_NAME_CHARS] + "..."
        raise ValueError(
            f"the function name {shown!r} is not 1 to {MAX_TOOL_NAME_CHARS} of the characters a-z, A-Z, 0-9, _ and "
            "- (OpenAI's rule): rename it"
        )
    return name


ToolName = Annotated[str, AfterValidator(_tool_name)]


class FunctionDefinition(BaseModel):
    model_config = REQUEST

    name: ToolName
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict | None = Field(None, description="A JSON schema of the arguments; none: no arguments.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class Tool(BaseModel):
    model_config = REQUEST

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = REQUEST

    name: ToolName


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: the answer is a call of that function."""

    model_config = REQUEST

    type: Literal["function"]
    function: NamedFunction


def tool_choice_form(value: object) -> object:
    """tool_choice as sent, refused with what to send where it is none of its forms (a union would report each
    form's error)."""
    if value is None or value in ("none", "auto", "required") or isinstance(value, dict):
        return value
    raise ValueError(
        f'tool_choice is "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, not '
        f"{str(value)[:64]!r}"
    )


# ---- the answer's calls ----------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _without_nulls(model: BaseModel, handler: SerializerFunctionWrapHandler) -> dict:
    return {key: value for key, value in handler(model).items() if value is not None}


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the fields'
        return _without_nulls(self, handler)


class DeltaToolCall(BaseModel):
    """A streamed fragment of call `index`, as OpenAI streams them: the first holds its id, type and name (and
    arguments ""), the others a fragment of its arguments; the fields a fragment does not carry are left out."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the fields'
        return _without_nulls(self, handler)


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# ---- the grammar ------------------------------------------------------------------------------------------


def parameters_of(function: FunctionDefinition) -> dict:
    return function.parameters or NO_PARAMETERS


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask for: `mode` "named" (a call of `name`), "required" (one or more calls) or "auto"
    (text or calls, as the model chooses), the grammar of the answer (none for "auto"), the tools as the chat
    template takes them and their texts (counted against the prompt's bound: templates render them)."""

    mode: Literal["named", "required", "auto"]
    spec: GrammarSpec | None
    template_tools: list[dict]
    texts: list[str]
    name: str | None = None


def tool_plan(tools: list[Tool], choice: NamedToolChoice | str, parallel: bool) -> ToolPlan:
    """The plan of validated `tools` under `choice` ("required", "auto" or a named function); InvalidGrammar (422)
    for a schema the grammar's bounds refuse, naming its tool (held to them under "auto" too, whose answer they do
    not constrain: the same tools are taken whatever the choice)."""
    compact = []
    for i, tool in enumerate(tools):
        try:
            compact.append(GrammarSpec.json_schema(parameters_of(tool.function)))
        except InvalidGrammar as exc:
            raise InvalidGrammar(f"tools[{i}] ({tool.function.name}): its parameters: {exc}") from None
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    texts = [
        text
        for s, t in zip(compact, tools, strict=True)
        for text in (s.text, t.function.name, t.function.description or "")
    ]
    if choice == "auto":
        return ToolPlan("auto", None, template_tools, texts)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        spec = next(s for s, t in zip(compact, tools, strict=True) if t.function.name == name)
        return ToolPlan("named", spec, template_tools, texts, name)
    return ToolPlan("required", calls_spec(tools, compact, parallel), template_tools, texts)


def calls_spec(tools: list[Tool], compact: list[GrammarSpec], parallel: bool) -> GrammarSpec:
    """The grammar of tool_choice "required": a JSON array of at least one call (at most one without
    parallel_tool_calls), each {"name": one of the tools' names, "parameters": that tool's arguments}."""
    least = sum(len(s.text) + len(t.function.name) + _CALLS_WRAPPER_CHARS for s, t in zip(compact, tools, strict=True))
    if least > MAX_GRAMMAR_CHARS:
        raise InvalidGrammar(
            f'tool_choice "required" compiles the {len(tools)} tools\' parameters into one schema of about {least} '
            f"characters; at most {MAX_GRAMMAR_CHARS} are accepted: send fewer or smaller tools, or name one "
            'function in tool_choice ({"type": "function", "function": {"name": ...}})'
        )
    branches = []
    for i, tool in enumerate(tools):
        at = f"#/items/anyOf/{i}/properties/parameters"
        parameters = rebased(parameters_of(tool.function), at)
        branches.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    return GrammarSpec.json_schema(schema, extra_depth=CALLS_DEPTH)


def rebased(schema: Any, at: str) -> Any:
    """`schema` moved to the JSON pointer `at` of a larger schema: its references to its own root ("#",
    "#/$defs/x") made references into it there. Data (enum, const, default, examples) is copied as it is.
    Recursive: the schema's depth was bounded before."""
    if isinstance(schema, list):
        return [rebased(item, at) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = at + value[1:]
        elif key in _DATA:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: rebased(sub, at) for name, sub in value.items()}
        else:
            out[key] = rebased(value, at)
    return out


def check_tools(tools: list[Tool] | None, choice: NamedToolChoice | str | None) -> None:
    """ValueError (a 422) saying what to send where the tools and tool_choice do not make a request this server
    answers as asked."""
    if not tools:
        if choice not in (None, "none"):
            shown = (
                f'{{"type": "function", "function": {{"name": "{choice.function.name}"}}}}'
                if isinstance(choice, NamedToolChoice)
                else f'"{choice}"'
            )
            raise ValueError(f"tool_choice {shown} needs tools: send the functions in tools, or leave tool_choice out")
        return
    names = [tool.function.name for tool in tools]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"tools name the function {name!r} twice: give each tool a name of its own")
        seen.add(name)
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        listed = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ValueError(
            f"tool_choice names the function {choice.function.name!r}, which is not among tools ({listed}): name one "
            "of them, or add it to tools"
        )


# ---- reading the answer ------------------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"parameters"\s*:\s*')


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class CallScanner:
    """Reads one choice's answer into calls as its text arrives: feed() returns the deltas that text adds (a new
    call's first, holding its id and name, then fragments of its arguments). `name`: the named function, whose
    answer is its arguments alone; None: a "required" answer, `[{"name":"N","parameters":V},...]`."""

    def __init__(self, name: str | None = None) -> None:
        self._named = name
        self._calls: list[_Call] = []
        self._pending = ""  # text not yet read into a call's head
        self._state = "head" if name is not None else "open"  # open, call, args, between, done
        self._depth = 0  # within a call's arguments: the brackets open
        self._in_string = self._escaped = False

    def feed(self, text: str) -> list[DeltaToolCall]:
        deltas: list[DeltaToolCall] = []
        if self._named is not None:
            if self._state == "head":
                self._state = "args"
                deltas.append(self._start(self._named))
            if text:
                self._calls[-1].arguments.append(text)
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text)))
            return deltas
        self._pending += text
        while self._pending and self._state != "done":
            if self._state == "open":
                stripped = self._pending.lstrip()
                if not stripped:
                    self._pending = ""
                    break
                if stripped[0] != "[":
                    self._state = "done"  # not the grammar's form: nothing more is read
                    break
                self._pending, self._state = stripped[1:], "call"
            elif self._state == "call":
                head = _HEAD.match(self._pending)
                if head is None:
                    break  # the head is incomplete: wait for more text
                self._pending, self._state = self._pending[head.end() :], "args"
                deltas.append(self._start(head.group(1)))
            elif self._state == "args":
                end = self._arguments_end(self._pending)
                fragment = self._pending if end is None else self._pending[:end]
                if fragment:
                    self._calls[-1].arguments.append(fragment)
                    index = len(self._calls) - 1
                    deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment)))
                if end is None:
                    self._pending = ""
                    break
                self._pending, self._state = self._pending[end + 1 :], "between"  # past the call's "}"
            else:  # between calls: "," then the next, or "]"
                stripped = self._pending.lstrip()
                if not stripped:
                    self._pending = ""
                    break
                self._pending, self._state = stripped[1:], "call" if stripped[0] == "," else "done"
        return deltas

    def _start(self, name: str) -> DeltaToolCall:
        self._calls.append(_Call(call_id(), name))
        self._depth, self._in_string, self._escaped = 0, False, False
        return DeltaToolCall(
            index=len(self._calls) - 1,
            id=self._calls[-1].id,
            type="function",
            function=DeltaFunctionCall(name=name, arguments=""),
        )

    def _arguments_end(self, text: str) -> int | None:
        """Where in `text` the call's closing brace is (its arguments end before it), None while they go on; the
        scan's state is kept between texts."""
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
            elif char in "]}":
                if self._depth == 0:
                    return i
                self._depth -= 1
        return None

    def calls(self) -> list[ToolCall]:
        """The calls read so far (the last one's arguments cut short where the answer was)."""
        return [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments="".join(c.arguments))) for c in self._calls
        ]


def read_calls(text: str, name: str | None) -> list[ToolCall]:
    """The calls of a whole answer (CallScanner's reading of it)."""
    scanner = CallScanner(name)
    scanner.feed(text)
    return scanner.calls()
