"""OpenAI's Responses API: POST /v1/responses, answered through the Chat Completions route. A request is read into
the chat request it asks for (responses_schemas.py), which runs as that route runs it (the same bounds, checks,
grammar, tools and adapter); its answer is written back as a response: the text as a message item, each call as
a function_call item, and, streamed, as the Responses API's typed events (`response.created`, the items' `added`,
`delta`, `done`, then `response.completed`, or `response.incomplete` where max_output_tokens cut it)."""

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from server.api.auth import require_inference
from server.api.deps import get_inference
from server.api.jsonbody import OffLoopJsonRoute, read_where_cheapest
from server.api.openai import chat_answer
from server.api.render import json_off_loop, rendered_off_loop
from server.api.responses_schemas import (
    FunctionChoice,
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
)
from server.api.schemas import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Usage
from server.api.sse import RESPONSES, Rendered, sse_response
from server.inference import Inference

router = APIRouter(
    route_class=OffLoopJsonRoute, prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_inference)]
)
InferenceDep = Annotated[Inference, Depends(get_inference)]
# a chat field, in what a client's error names it by: the field of the Responses request it came from
_FIELDS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}

Shell = Callable[..., ResponseObject]  # the response's fields but its status, output and usage


@router.post(
    "/responses",
    response_model=ResponseObject,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def responses(body: ResponsesRequest, request: Request, inference: InferenceDep) -> Response:
    try:
        chat = await read_where_cheapest(request, body.chat_request)
    except ValidationError as exc:  # told as this request's fields
        raise RequestValidationError([_as_responses(error) for error in exc.errors()]) from None
    answer = await chat_answer(chat, request, inference)
    shell = _shell(body, chat)
    if isinstance(answer, AsyncIterator):
        return sse_response(_events(answer, shell), RESPONSES)
    return await json_off_loop(lambda: _whole(answer(), shell))


def _as_responses(error: Any) -> dict:
    """A chat field's error, located in this request's own fields (a message's index is not its input item's)."""
    field, *rest = error["loc"] or ("",)
    return {**error, "loc": ("body", _FIELDS.get(str(field), field), *([] if field == "messages" else rest))}


def _shell(body: ResponsesRequest, chat: ChatCompletionRequest) -> Shell:
    """The response's fields that the request sets, as OpenAI repeats them."""
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionChoice) else body.tool_choice
    text_format = {"type": "text"}
    if body.text and body.text.format and body.text.format.type != "text":
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def shell(**fields: Any) -> ResponseObject:
        return ResponseObject(
            id=rid,
            created_at=created,
            model=body.model,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            text={"format": text_format},
            tools=tools,
            tool_choice=choice or ("auto" if chat.tools else "none"),
            parallel_tool_calls=body.parallel_tool_calls is not False,
            metadata=body.metadata or {},
            **fields,
        )

    return shell


def _usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _ending(finish: str | None) -> dict[str, Any]:
    """A response's status fields for its answer's finish reason: one cut by max_output_tokens is incomplete."""
    if finish == "length":
        return {"status": "incomplete", "incomplete_details": IncompleteDetails(reason="max_output_tokens")}
    return {"status": "completed"}


def _item_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def _whole(chat: ChatCompletionResponse, shell: Shell) -> ResponseObject:
    choice = chat.choices[0]
    message, calls = choice.message, choice.message.tool_calls or []
    ending = _ending(choice.finish_reason)
    items: list[OutputItem] = []
    if message.content or not calls:
        text = [OutputText(text=message.content or "")]
        items.append(OutputMessage(id=_item_id("msg"), status=ending["status"], content=text))
    items += [
        OutputFunctionCall(
            id=_item_id("fc"),
            call_id=call.id,
            name=call.function.name,
            arguments=call.function.arguments,
            status="completed",
        )
        for call in calls
    ]
    return shell(output=items, usage=_usage(chat.usage), **ending)


class _Events:
    """A streamed response's events, numbered in order, and its output items as they grow."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[OutputItem] = []
        self.open: OutputMessage | OutputFunctionCall | None = None  # the item the answer is writing now
        self._written: list[str] = []  # the open item's text or arguments so far, joined as it closes

    def event(self, kind: str, **fields: Any) -> StreamEvent:
        event = StreamEvent(type=kind, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    async def carrying(self, kind: str, response: Callable[[], ResponseObject]) -> tuple[str, bytes]:
        """An event that carries the response, built and rendered off the event loop: it repeats the request's
        tools and instructions (up to the body's MiBs), and the first two and the last events of a stream carry it."""
        sequence = self.sequence
        self.sequence += 1
        return kind, await rendered_off_loop(
            lambda: StreamEvent(type=kind, sequence_number=sequence, response=response())
        )

    def open_message(self) -> list[StreamEvent]:
        item = OutputMessage(id=_item_id("msg"), status="in_progress", content=[])
        where = self._opened(item)
        added = self.event("response.output_item.added", item=item.model_copy(deep=True), **where)
        item.content.append(OutputText(text=""))
        part = self.event(
            "response.content_part.added", item_id=item.id, content_index=0, part=OutputText(text=""), **where
        )
        return [added, part]

    def open_call(self, call_id: str, name: str) -> list[StreamEvent]:
        item = OutputFunctionCall(id=_item_id("fc"), call_id=call_id, name=name, arguments="", status="in_progress")
        return [self.event("response.output_item.added", item=item.model_copy(deep=True), **self._opened(item))]

    def _opened(self, item: OutputMessage | OutputFunctionCall) -> dict[str, int]:
        self.items.append(item)
        self.open, self._written = item, []
        return {"output_index": len(self.items) - 1}

    def text(self, delta: str) -> list[StreamEvent]:
        events = self.open_message() if not isinstance(self.open, OutputMessage) else []
        assert isinstance(self.open, OutputMessage)
        self._written.append(delta)
        where = {"item_id": self.open.id, "output_index": len(self.items) - 1, "content_index": 0}
        return [*events, self.event("response.output_text.delta", delta=delta, logprobs=[], **where)]

    def arguments(self, delta: str) -> list[StreamEvent]:
        assert isinstance(self.open, OutputFunctionCall)
        self._written.append(delta)
        where = {"item_id": self.open.id, "output_index": len(self.items) - 1}
        return [self.event("response.function_call_arguments.delta", delta=delta, **where)]

    def close(self, status: str) -> list[StreamEvent]:
        """The open item's `done` events, `status` its own."""
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        where = {"item_id": item.id, "output_index": self.items.index(item)}
        written = "".join(self._written)
        if isinstance(item, OutputMessage):
            text = item.content[0].text = written
            events = [
                self.event("response.output_text.done", text=text, logprobs=[], content_index=0, **where),
                self.event("response.content_part.done", part=OutputText(text=text), content_index=0, **where),
            ]
        else:
            item.arguments = written
            events = [self.event("response.function_call_arguments.done", name=item.name, arguments=written, **where)]
        return [*events, self.event("response.output_item.done", item=item, output_index=where["output_index"])]


async def _events(
    chunks: AsyncIterator[ChatCompletionChunk | bytes], shell: Shell
) -> AsyncIterator[StreamEvent | Rendered]:
    """The chat answer's chunks (of one choice, the last with its usage) as the Responses API streams an answer.
    Closing this closes the chunks, which cancels the request."""
    events = _Events()
    for kind in ("response.created", "response.in_progress"):
        yield await events.carrying(kind, lambda: shell(status="in_progress", output=[]))
    finish: str | None = None
    usage: Usage | None = None
    async with aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            assert isinstance(chunk, ChatCompletionChunk)  # chunks as bytes carry a prompt's scores, never asked for
            usage = chunk.usage or usage
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    for event in events.text(delta.content):
                        yield event
                for call in delta.tool_calls or []:
                    if call.id is not None:  # a call's head: the item before it is complete
                        for event in [*events.close("completed"), *events.open_call(call.id, call.function.name or "")]:
                            yield event
                    if call.function.arguments:
                        for event in events.arguments(call.function.arguments):
                            yield event
                finish = choice.finish_reason or finish
    ending = _ending(finish)
    if not events.items:  # an empty answer is an empty message, as the whole answer's
        for event in events.open_message():
            yield event
    for event in events.close(ending["status"]):
        yield event
    assert usage is not None  # asked for: on the chunk that ends the answer
    counted = _usage(usage)
    yield await events.carrying(
        f"response.{ending['status']}", lambda: shell(output=events.items, usage=counted, **ending)
    )
