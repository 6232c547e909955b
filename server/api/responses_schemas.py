"""The bodies of OpenAI's Responses API (/v1/responses), as far as a text model answers them: text input (a string,
or messages with text parts, and the function calls of earlier turns with their outputs), instructions, sampling,
structured output (`text.format`) and function tools. A request is read into the Chat Completions request it asks
for (`chat_request`), so that every bound and check of that route applies to it as it is.

What the server cannot do is refused, saying what to send instead, rather than answered otherwise than asked:
input other than text (images, files), tools other than functions, `previous_response_id` (this server keeps no
responses: the conversation goes in `input`), and `background`. Fields it has no use for are ignored, as on the
other routes; `store` is answered false."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from server.api.request_config import REQUEST
from server.api.schemas import (
    MAX_CONTENT_PARTS,
    MAX_NAME_CHARS,
    ChatCompletionRequest,
    Text,
    bounded_parts,
    counted_first,
    not_off,
    refuse_unsupported,
)
from server.api.tools import MAX_DESCRIPTION_CHARS, MAX_TOOL_NAME_CHARS, MAX_TOOLS, ToolChoiceMode, ToolName
from server.tokenizer_pool import MAX_MESSAGES

MAX_METADATA_KEYS = 16  # OpenAI's bounds on metadata, which the response repeats
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# the Chat Completions fields (vLLM's sampling extras) a Responses body may carry too; the rest have a Responses
# form (max_output_tokens, text.format, tools) or no meaning for one answer (n, logprobs, echo)
CHAT_EXTRAS = (
    "seed", "stop", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias",
    "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "cache_salt", "merged_adapters",
)  # fmt: skip


class TextPart(BaseModel):
    """A message's text: what the client wrote (input_text), or an earlier answer's (output_text)."""

    model_config = REQUEST

    type: Literal["input_text", "output_text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("type") not in ("input_text", "output_text"):
            raise ValueError(
                f"only text content is supported (type 'input_text' or 'output_text'), not "
                f"{str(value.get('type'))[:64]!r}: "
                "the served models read text alone"
            )
        return value


class MessageItem(BaseModel):
    model_config = REQUEST

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)]

    def chat(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content}


class FunctionCallItem(BaseModel):
    """A call an earlier answer made, as the Responses API returned it."""

    model_config = REQUEST

    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)
    arguments: Text


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned for call `call_id`."""

    model_config = REQUEST

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: Text


INPUT_ITEMS = ("message", "function_call", "function_call_output")


def _item_type(value: object) -> str | None:
    """An input item's type (a message may leave it out: {"role": ..., "content": ...}); None for another type."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if kind in INPUT_ITEMS else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_input_item",
        custom_error_message="only messages of text, and the function_call and function_call_output items of earlier "
        "turns, are supported as input items",
    ),
]


class FunctionTool(BaseModel):
    model_config = REQUEST

    type: Literal["function"]
    name: ToolName
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(
                f"only function tools are supported, not {str(value.get('type'))[:64]!r}: this server runs no "
                "built-in tools (web search, file search, code)"
            )
        return value

    def chat(self) -> dict[str, Any]:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class FunctionChoice(BaseModel):
    model_config = REQUEST

    type: Literal["function"]
    name: ToolName


class TextFormat(BaseModel):
    """`text.format`: a free answer, any JSON object, or JSON of a schema."""

    model_config = REQUEST | ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", max_length=MAX_NAME_CHARS)
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('text.format of type "json_schema" needs its "schema"')
        return self

    def chat(self) -> dict[str, Any] | None:
        """Chat Completions' response_format."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        schema = {"name": self.name, "schema": self.schema_, "strict": self.strict, "description": self.description}
        return {"type": "json_schema", "json_schema": schema}


class TextConfig(BaseModel):
    model_config = REQUEST

    format: TextFormat | None = None


def _metadata(value: object) -> object:
    if isinstance(value, dict):
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"{len(value)} metadata keys; at most {MAX_METADATA_KEYS}")
        if any(
            len(str(key)) > MAX_METADATA_KEY_CHARS or len(str(item)) > MAX_METADATA_VALUE_CHARS
            for key, item in value.items()
        ):
            raise ValueError(
                f"metadata holds strings of at most {MAX_METADATA_VALUE_CHARS} characters under keys of at most "
                f"{MAX_METADATA_KEY_CHARS}"
            )
    return value


NO_LOGPROBS = "logprobs are not implemented on this route: leave it out, or ask /v1/chat/completions (logprobs)"


class ResponsesRequest(BaseModel):
    model_config = REQUEST | ConfigDict(extra="allow")  # the Chat Completions extras (CHAT_EXTRAS) are read from it

    model: str = Field(
        max_length=MAX_NAME_CHARS, description="An adapter name (`name` or `name@N`) or the base model's served name."
    )
    input: (
        Text
        | Annotated[
            list[InputItem],
            Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True),
            BeforeValidator(bounded_parts),
            counted_first(MAX_MESSAGES, "input items"),
        ]
    )
    instructions: Text | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    text: TextConfig | None = None
    tools: (
        Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS, fail_fast=True), counted_first(MAX_TOOLS, "tools")]
        | None
    ) = None
    tool_choice: ToolChoiceMode | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: Annotated[dict[str, str], BeforeValidator(_metadata)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        return refuse_unsupported(value, {
            "previous_response_id": (
                lambda value: value is not None,
                "this server keeps no responses: send the whole conversation in input (the earlier turns' messages, "
                "function_call and function_call_output items)",
            ),
            "background": (not_off(False), "background responses are not supported: send the request without it"),
            "truncation": (
                lambda value: value is not None and value != "disabled",
                'dropping input items to fit the model is not implemented: send "disabled" (a 422 names an input '
                "that does not fit), or leave it out",
            ),
            "top_logprobs": (not_off(0), NO_LOGPROBS),
            "logprobs": (not_off(False), NO_LOGPROBS),
            # Chat Completions' names, which this route would otherwise ignore (extra fields are read only as
            # CHAT_EXTRAS), answering other than asked
            "max_tokens": (lambda value: value is not None, "this route's name for it is max_output_tokens"),
            "max_completion_tokens": (lambda value: value is not None, "this route's name for it is max_output_tokens"),
            "response_format": (lambda value: value is not None, "this route's name for it is text.format"),
            "n": (not_off(1), "this route answers one response a request: send n to /v1/chat/completions"),
        })  # fmt: skip

    def chat_request(self) -> ChatCompletionRequest:
        """The Chat Completions request this one asks for, validated as that route validates its own (a
        pydantic ValidationError where it does not pass), streamed with usage where this one is streamed."""
        fields: dict[str, Any] = {key: value for key, value in (self.model_extra or {}).items() if key in CHAT_EXTRAS}
        fields |= {
            "model": self.model,
            "messages": self._messages(),
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "stream_options": {"include_usage": True} if self.stream else None,
            "response_format": self.text.format.chat() if self.text and self.text.format else None,
            "tools": [tool.chat() for tool in self.tools] if self.tools else None,
            "tool_choice": self._tool_choice(),
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        chat = ChatCompletionRequest.model_validate(fields)
        chat._completion_limit_name = "max_output_tokens"
        return chat

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, MessageItem):
                messages.append(item.chat())
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:  # the turn's next call
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def _tool_choice(self) -> str | dict[str, Any] | None:
        if isinstance(self.tool_choice, FunctionChoice):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice


# ---- the answer ---------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response, whole (the answer of a request without stream), or as it stands in a stream's events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any]
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    metadata: dict[str, str] = Field(default_factory=dict)
    previous_response_id: None = None
    store: bool = False  # this server keeps no responses
    truncation: Literal["disabled"] = "disabled"


class StreamEvent(BaseModel):
    """One event of a streamed response: its `type` names it (and the SSE `event:` line), `sequence_number`
    orders it; the other fields are the type's own."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
