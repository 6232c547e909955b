"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions. `model` names an adapter
(`name` or `name@N`) or the base model's served name; `stream: true` is SSE ending with `data: [DONE]`."""

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from adapters.errors import AdapterError, AdapterNotFound
from loraplex.errors import LoraplexError
from server.api.auth import require_inference
from server.api.deps import get_inference, get_runtime
from server.api.jsonbody import OffLoopJsonRoute, read_off_loop, read_where_cheapest
from server.api.render import json_off_loop, rendered_off_loop
from server.api.schemas import (
    LOGPROB_FLOOR,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
    OpenAISampling,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.api.sse import OPENAI, sse_response
from server.api.tool_parsers import TOOL_CALL_PARSERS, StreamedCalls, ToolCallParser, read_answer
from server.api.tools import CallScanner, ToolPlan, read_calls
from server.backlog import ScoreShapes, score_shapes
from server.client_share import prefix_salt
from server.engine import PromptScores, SamplingParams, TokenEvent
from server.engine.requests import Top
from server.grammar import CompiledGrammar, InvalidGrammar
from server.inference import (
    Adapter,
    EmptyPrompt,
    Generation,
    Inference,
    Run,
    choice_samplings,
    until_disconnected,
)
from server.runtime import Runtime

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512

router = APIRouter(
    route_class=OffLoopJsonRoute, prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_inference)]
)
InferenceDep = Annotated[Inference, Depends(get_inference)]


class ModelNotFound(AdapterNotFound):
    code = "model_not_found"


class MixOnAdapter(LoraplexError):
    http_status = 422
    code = "invalid_adapter_mix"


class AutoToolChoiceOff(LoraplexError):
    http_status = 422
    code = "invalid_request"


def _sampling(
    body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], inference: Inference, default: int
) -> SamplingParams:
    limit, field = body.max_tokens_field
    max_new_tokens = inference.max_new_tokens(len(prompt_ids), limit, field, default)
    min_tokens = inference.min_tokens(body.min_tokens, max_new_tokens, field, limit is not None)
    return SamplingParams(
        # max_tokens 0 (scores_only): the prompt is scored in a step, which draws a token; the stream drops it
        max_new_tokens=max(max_new_tokens, 1),
        min_tokens=min_tokens,
        temperature=inference.temperature(1.0 if body.temperature is None else body.temperature),
        top_p=body.top_p or 1.0,
        top_k=inference.top_k(None if body.top_k is None else max(body.top_k, 0)),  # vLLM's -1: off
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        ignore_eos=body.ignore_eos,
        stop_token_ids=inference.stop_token_ids(body.stop_token_ids, min_tokens, body.ignore_eos),
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=inference.logit_bias(body.logit_bias),
        stop=tuple(body.stop_list),
        include_stop_str_in_output=body.include_stop_str_in_output,
        seed=body.seed,
        top_logprobs=body.top_logprobs_asked,
        prompt_logprobs=body.prompt_logprobs_asked,
    )


async def _adapter(body: OpenAISampling, inference: Inference) -> Adapter:
    ref = inference.adapter_ref(body.model)
    if body.merged_adapters is not None:
        if ref is not None:
            raise MixOnAdapter(
                f"merged_adapters runs on the base model: send model {inference.base.served_name!r}, "
                f"not {body.model!r} (add that adapter to merged_adapters.ids instead)"
            )
        return body.merged_adapters.mix()
    if ref is not None:
        try:
            await inference.registry.resolve(ref)  # off the event loop where the store is remote
        except AdapterError as exc:  # an unknown or malformed name: OpenAI clients expect 404
            raise ModelNotFound(
                f"the model {body.model!r} does not exist: use {inference.base.served_name!r} or an adapter "
                "listed by GET /v1/models"
            ) from exc
    return ref


def _finish(event: TokenEvent) -> OpenAIFinishReason:
    return "length" if event.finish_reason == "length" else "stop"


def _top(token_id: int, logprob: float, inference: Inference) -> TopLogprob:
    text = inference.token_text(token_id)
    return TopLogprob(token=text, logprob=max(logprob, LOGPROB_FLOOR), bytes=list(text.encode()))


def _chat_logprobs(events: list[TokenEvent], inference: Inference) -> ChatLogprobs:
    content = []
    for e in events:
        if e.token_id is None or e.logprob is None:
            continue
        picked = _top(e.token_id, e.logprob, inference)
        content.append(
            TokenLogprob(**picked.model_dump(), top_logprobs=[_top(t, v, inference) for t, v in e.top_logprobs])
        )
    return ChatLogprobs(content=content)


def _completion_logprobs(events: list[TokenEvent], inference: Inference, offset: int = 0) -> CompletionLogprobs:
    """The legacy shape of the events' tokens. `offset`: characters of this choice's text before these events
    (streaming, echo)."""
    tokens = [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None]
    return _legacy_logprobs([(t, lp, top) for t, lp, top in tokens if lp is not None], inference, offset)


def _legacy_logprobs(
    tokens: Iterable[tuple[int, float | None, Top]], inference: Inference, offset: int
) -> CompletionLogprobs:
    """The legacy shape of (token, logprob, top) tokens; each top_logprobs entry holds the N most likely tokens and
    the token itself, as OpenAI's (so up to N + 1). A token with no logprob (an echoed prompt's first) has no top
    logprobs either: null, as vLLM echoes it. `offset`: characters of the choice's text before the first."""
    out = CompletionLogprobs()
    for token_id, logprob, top_n in tokens:
        text = inference.token_text(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if logprob is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(max(logprob, LOGPROB_FLOOR))
        top = {inference.token_text(t): max(v, LOGPROB_FLOOR) for t, v in top_n}
        top.setdefault(text, max(logprob, LOGPROB_FLOOR))
        out.top_logprobs.append(top)
    return out


def _echoed_logprobs(
    scored: PromptScores, events: list[TokenEvent], inference: Inference
) -> tuple[CompletionLogprobs, int]:
    """echo with logprobs: the prompt's tokens, then the events', in one legacy shape, and the characters of the
    prompt's tokens (where the answer's offsets go on)."""
    out = _legacy_logprobs([(t.token_id, t.logprob, t.top) for t in scored.tokens()], inference, 0)
    offset = sum(len(text) for text in out.tokens)
    answer = _completion_logprobs(events, inference, offset)
    out.tokens += answer.tokens
    out.token_logprobs += answer.token_logprobs
    out.top_logprobs += answer.top_logprobs
    out.text_offset += answer.text_offset
    return out, offset + sum(len(text) for text in answer.tokens)


def _prompt_logprobs(scored: PromptScores | None, inference: Inference) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs: null for the first token; for each other, its own entry (its rank among the
    vocabulary) then the N most likely tokens' (ranks 1..N), keyed by token id."""
    if scored is None:
        return None
    out: PromptLogprobs = [None]
    for token in scored.tokens()[1:]:
        assert token.logprob is not None and token.rank is not None  # every token past the first is scored
        entry = {str(token.token_id): _prompt_entry(token.token_id, token.logprob, token.rank, inference)}
        for rank, (t, v) in enumerate(token.top, 1):
            entry.setdefault(str(t), _prompt_entry(t, v, rank, inference))
        out.append(entry)
    return out


def _prompt_entry(token_id: int, logprob: float, rank: int, inference: Inference) -> PromptLogprob:
    return PromptLogprob(logprob=max(logprob, LOGPROB_FLOOR), rank=rank, decoded_token=inference.token_text(token_id))


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    """Usage as OpenAI's: each prompt counted once, however many choices it has; `cached_tokens`: of each prompt,
    the fewest tokens one of its choices found in the KV cache (the first choice's prompt warms it for the
    others'), summed over the prompts."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def _results_usage(prompt_tokens: list[int], groups: list[list[Generation]]) -> Usage:
    """The usage of each prompt's (of `prompt_tokens` tokens) choices answered (`groups`, one per prompt)."""
    cached = sum(min(r.events[-1].cached_tokens for r in group) for group in groups)
    return _usage(sum(prompt_tokens), sum(len(r.tokens) for group in groups for r in group), cached)


def _salted(body: OpenAISampling) -> None:
    """The request shares cached prompt prefixes only with requests of its cache_salt (and of its API key)."""
    if body.cache_salt is not None:
        prefix_salt.set(f"{prefix_salt.get()}/{body.cache_salt}")


@router.get("/models", response_model=ModelList)
async def models(runtime: Annotated[Runtime, Depends(get_runtime)]) -> ModelList:
    base = runtime.base.served_name
    cards = [ModelCard(id=base, created=runtime.started)]
    after: str | None = None
    while True:
        page, after = runtime.registry.store.page(limit=1000, after=after)
        cards += [ModelCard(id=m.name, created=int(m.created_at.timestamp()), parent=base) for m in page]
        if after is None:
            return ModelList(data=cards)


def _cumulative_logprob(result: Generation) -> float:
    return sum(e.logprob for e in result.tokens if e.logprob is not None)


async def _open_streams(
    request: Request,
    runs: list[Run],
    adapter: Adapter,
    grammar: CompiledGrammar | None,
    inference: Inference,
    scoring: bool = False,
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The choices' streams, opened while listening for the client: choices open one after another, each once
    the one before has its first token, so with the batch full they wait for rows; until the response starts,
    nothing else would hear a client that left, and its choices would run to max_tokens for nobody."""
    return await until_disconnected(request, lambda: inference.open_streams(runs, adapter, grammar, scoring))


async def _choice_chunks(
    events: AsyncIterator[tuple[int, TokenEvent]], prompt_tokens: list[int], per_prompt: int, include_usage: bool
) -> AsyncIterator[tuple[int, TokenEvent, OpenAIFinishReason | None, Usage | None]]:
    """Per event of the prompts' (of `prompt_tokens` tokens) `per_prompt` choices each (choice i of prompt p: index
    p x per_prompt + i): its choice index, the event, its finish reason and, on the event that ends the last
    choice, the usage if asked for. Closing this cancels every choice still running."""
    async with aclosing(events):  # type: ignore[type-var]
        generated, running, cached = 0, len(prompt_tokens) * per_prompt, list(prompt_tokens)
        async for index, event in events:
            generated += event.token_id is not None
            finish = _finish(event) if event.finish_reason else None
            running -= finish is not None
            prompt = index // per_prompt
            cached[prompt] = min(cached[prompt], event.cached_tokens)
            usage = _usage(sum(prompt_tokens), generated, sum(cached)) if include_usage and not running else None
            yield index, event, finish, usage


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def completions(body: CompletionRequest, request: Request, inference: InferenceDep) -> Response:
    _salted(body)
    adapter = await _adapter(body, inference)
    grammar = await inference.grammar(await read_where_cheapest(request, body.grammar_spec))
    texts, prompt_ids = body.prompts
    if texts:
        prompt_ids = await inference.encode_prompts(texts)
    else:
        inference.check_prompt_ids(prompt_ids)
    # every prompt's checks before any runs: one that cannot run refuses the batch
    runs = [
        (ids, sampling)
        for ids in prompt_ids
        for sampling in choice_samplings(
            _sampling(body, ids, inference, COMPLETION_DEFAULT_MAX_TOKENS), body.candidates
        )
    ]
    prompt_tokens = [len(ids) for ids in prompt_ids]
    echoes = await _echoes(body, texts, prompt_ids, inference)
    score_shapes.set(_score_shapes(body))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:  # best_of is not streamed: a run per choice, choice p x n + i of prompt p
        events = await _open_streams(request, runs, adapter, grammar, inference, body.scores_only)

        offsets = [0] * len(runs)
        # the prompt goes out with each choice's first chunk, as vLLM streams it
        pending = [echoes[index // body.n] for index in range(len(runs))]

        def chunk(
            index: int, event: TokenEvent, finish: OpenAIFinishReason | None, usage: Usage | None
        ) -> CompletionResponse:
            text, pending[index] = pending[index] + event.text, ""
            scored = event.prompt_logprobs  # on the choice's first token: its first chunk's, as vLLM's
            logprobs = None
            if body.logprobs is not None and body.echo and scored is not None:
                logprobs, offsets[index] = _echoed_logprobs(scored, [event], inference)
            elif body.logprobs is not None:
                logprobs = _completion_logprobs([event], inference, offsets[index])
                offsets[index] += sum(len(t) for t in logprobs.tokens)
            choice = CompletionChoice(index=index, text=text, finish_reason=finish, stop_reason=event.stop_reason,
                                      logprobs=logprobs,
                                      prompt_logprobs=_scored_field(body, scored, inference))  # fmt: skip
            return CompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=[choice])

        async def chunks() -> AsyncIterator[CompletionResponse | bytes]:
            async with aclosing(_choice_chunks(events, prompt_tokens, body.n, body.include_usage)) as choices:
                async for index, event, finish, usage in choices:
                    if event.prompt_logprobs is None:
                        yield chunk(index, event, finish, usage)
                    else:  # its prompt's scores, tens of objects a prompt token: built on the loop, they held it
                        yield await rendered_off_loop(partial(chunk, index, event, finish, usage))

        return sse_response(chunks(), OPENAI)
    results = await inference.generate_many(request, runs, adapter, grammar, body.scores_only)
    # each prompt's candidates; best_of: the n of highest total logprob, best first (as vLLM)
    groups = [results[p * body.candidates : (p + 1) * body.candidates] for p in range(len(prompt_ids))]
    if body.candidates > body.n:
        groups = [sorted(group, key=_cumulative_logprob, reverse=True)[: body.n] for group in groups]
    return await json_off_loop(
        lambda: CompletionResponse(
            id=rid,
            created=created,
            model=body.model,
            usage=_results_usage(prompt_tokens, groups),
            choices=[
                CompletionChoice(
                    index=p * body.n + i,
                    text=echoes[p] + r.text,
                    finish_reason=_finish(r.events[-1]),
                    stop_reason=r.events[-1].stop_reason,
                    logprobs=_choice_logprobs(body, r, inference),
                    prompt_logprobs=_scored_field(body, r.prompt_logprobs, inference),
                )
                for p, group in enumerate(groups)
                for i, r in enumerate(group)
            ],
        )
    )


async def _echoes(
    body: CompletionRequest, texts: list[str], prompt_ids: list[list[int]], inference: Inference
) -> list[str]:
    """What each prompt's choices' texts begin with: with echo, the prompt's text (token-id prompts' decoded, off
    the event loop, as /detokenize decodes), else ""."""
    if not body.echo:
        return [""] * len(prompt_ids)
    return texts or [await inference.detokenize(ids) for ids in prompt_ids]


def _score_shapes(body: CompletionRequest) -> ScoreShapes:
    """Where a choice's prompt scores go: its prompt_logprobs where sent, its legacy logprobs where echoed."""
    shapes = ScoreShapes(0)
    if body.prompt_logprobs is not None:
        shapes |= ScoreShapes.PROMPT_LOGPROBS
    if body.echo and body.logprobs is not None:
        shapes |= ScoreShapes.ECHOED
    return shapes


def _choice_logprobs(body: CompletionRequest, result: Generation, inference: Inference) -> CompletionLogprobs | None:
    """A choice's legacy logprobs, where asked for: with echo, the prompt's tokens' first."""
    if body.logprobs is None:
        return None
    scored = result.prompt_logprobs
    if body.echo and scored is not None:
        return _echoed_logprobs(scored, result.events, inference)[0]
    return _completion_logprobs(result.events, inference)


def _scored_field(body: CompletionRequest, scored: PromptScores | None, inference: Inference) -> PromptLogprobs | None:
    """vLLM's choice field prompt_logprobs: where prompt_logprobs was sent (echo with logprobs scores the prompt
    for the legacy logprobs alone)."""
    return _prompt_logprobs(scored, inference) if body.prompt_logprobs is not None else None


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, inference: InferenceDep) -> Response:
    answer = await chat_answer(body, request, inference)
    if isinstance(answer, AsyncIterator):
        return sse_response(answer, OPENAI)
    return await json_off_loop(answer)


ChatAnswer = AsyncIterator[ChatCompletionChunk | bytes] | Callable[[], ChatCompletionResponse]


async def chat_answer(body: ChatCompletionRequest, request: Request, inference: Inference) -> ChatAnswer:
    """A chat request's answer: with stream, its chunks (those carrying a prompt's scores as their JSON, rendered
    off the event loop), else the whole answer's builder (which json_off_loop runs off the loop). The Responses
    API answers through it too."""
    _salted(body)
    parser = _tool_call_parser(body, request)
    adapter = await _adapter(body, inference)
    # None: a text answer. Planned off the loop: the tools' schemas are walked and dumped, up to every item of the body
    tools = await read_off_loop(lambda: body.tool_plan) if body.tools else None
    forced = tools if tools is not None and tools.mode != "auto" else None  # calls forced by the grammar
    spec = await read_where_cheapest(request, body.grammar_spec)
    try:
        grammar = await inference.grammar(spec)
    except InvalidGrammar as exc:
        if tools is None:
            raise
        raise InvalidGrammar(f"the tools' parameters: {exc}") from None
    messages = [m.template() for m in body.messages]
    if tools is None:
        prompt_ids = await inference.encode_chat(messages)
    else:
        prompt_ids = await inference.encode_chat(messages, tools=tools.template_tools, tools_texts=tools.texts)
    if not prompt_ids:  # /tokenize counts such a chat as no tokens; the engine runs none
        raise EmptyPrompt("the model's chat template renders these messages to no tokens; send a user message")
    samplings = choice_samplings(_sampling(body, prompt_ids, inference, CHAT_DEFAULT_MAX_TOKENS), body.n)
    # the choices share their prompt, whose scores the answer carries once: the first choice's (the others' would be
    # computed whole, with no cached prefix, and held as unsent answers, for nothing)
    samplings[1:] = [replace(sampling, prompt_logprobs=None) for sampling in samplings[1:]]
    runs = [(prompt_ids, sampling) for sampling in samplings]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        events = await _open_streams(request, runs, adapter, grammar, inference)
        # each choice's calls, read as its text arrives: forced by the grammar, or told from its text by the parser
        scanners = [CallScanner(forced.name) for _ in range(body.n)] if forced is not None else None
        readers = [StreamedCalls(parser()) for _ in range(body.n)] if parser is not None else None

        async def chunks() -> AsyncIterator[ChatCompletionChunk | bytes]:
            async with aclosing(_choice_chunks(events, [len(prompt_ids)], body.n, body.include_usage)) as choices:
                for index in range(body.n):
                    first = ChatDelta(role="assistant", content="" if forced is None else None)
                    yield ChatCompletionChunk(
                        id=rid, created=created, model=body.model, choices=[ChatChunkChoice(index=index, delta=first)]
                    )
                async for index, event, finish, usage in choices:
                    scores = event.prompt_logprobs  # the first choice's first token's: the response's field
                    if scanners is not None:
                        calls = scanners[index].feed(event.text)
                        if not (calls or finish or usage or body.logprobs or scores):  # a call's head, unfinished
                            continue
                        delta = ChatDelta(tool_calls=calls or None)
                    elif readers is not None:
                        deltas = readers[index].deltas(event.text, finish is not None)
                        if not (deltas or finish or usage or body.logprobs or scores):  # held back
                            continue
                        for delta in deltas[:-1]:  # a chunk each; the event's last carries its logprobs and end
                            yield ChatCompletionChunk(
                                id=rid, created=created, model=body.model,
                                choices=[ChatChunkChoice(index=index, delta=delta)],
                            )  # fmt: skip
                        delta = deltas[-1] if deltas else ChatDelta()
                    else:
                        delta = ChatDelta(content=event.text)
                    finish = _tools_finish(finish, event, tools, readers is not None and readers[index].calls > 0)
                    if scores is None:
                        yield chat_chunk(index, event, delta, finish, usage, None)
                    else:  # the prompt's scores, tens of objects a prompt token: built on the loop, they held it
                        yield await rendered_off_loop(partial(chat_chunk, index, event, delta, finish, usage, scores))

        def chat_chunk(
            index: int,
            event: TokenEvent,
            delta: ChatDelta,
            finish: OpenAIFinishReason | None,
            usage: Usage | None,
            scores: PromptScores | None,
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid,
                created=created,
                model=body.model,
                usage=usage,
                prompt_logprobs=_prompt_logprobs(scores, inference),
                choices=[
                    ChatChunkChoice(
                        index=index,
                        delta=delta,
                        finish_reason=finish,
                        stop_reason=event.stop_reason,
                        logprobs=_chat_logprobs([event], inference) if body.logprobs else None,
                    )
                ],
            )

        return chunks()
    results = await inference.generate_many(request, runs, adapter, grammar)
    return lambda: ChatCompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        usage=_results_usage([len(prompt_ids)], [results]),
        prompt_logprobs=_prompt_logprobs(results[0].prompt_logprobs, inference),  # vLLM's: the response's
        choices=[
            ChatChoice(
                index=i,
                message=(message := _message(r.text, tools, parser)),
                finish_reason=_tools_finish(_finish(r.events[-1]), r.events[-1], tools, bool(message.tool_calls)),
                stop_reason=r.events[-1].stop_reason,
                logprobs=_chat_logprobs(r.events, inference) if body.logprobs else None,
            )
            for i, r in enumerate(results)
        ],
    )


def _tool_call_parser(body: ChatCompletionRequest, request: Request) -> Callable[[], ToolCallParser] | None:
    """A new parser of a tool_choice "auto" request's answers, each choice's own, that reads calls of its tools
    alone (None for any other request); a 422 saying what to send on a server without one."""
    if not body.auto_tools or body.tools is None:
        return None
    name = request.app.state.settings.tool_call_parser
    if name == "off":
        raise AutoToolChoiceOff(
            "tool_choice \"auto\" (OpenAI's default where tools are sent) needs a parser of the model's own call "
            "format, to tell its calls from its text, and this server runs without one: start it with "
            f"--tool-call-parser ({', '.join(TOOL_CALL_PARSERS)}) where the model writes calls in that format. Or "
            'send tool_choice "required" (the answer is one or more calls of the tools), {"type": "function", '
            '"function": {"name": ...}} (a call of that function), or "none" (a text answer, the tools unused)'
        )
    return partial(TOOL_CALL_PARSERS[name], [tool.function.name for tool in body.tools])


def _message(text: str, tools: ToolPlan | None, parser: Callable[[], ToolCallParser] | None) -> AssistantMessage:
    """A whole answer's message: its text; with forced calls, the calls (content null, as OpenAI answers them);
    with tool_choice "auto", what the parser reads: text, calls or both."""
    if parser is not None:
        content, calls = read_answer(parser(), text)
        return AssistantMessage(content=content, tool_calls=calls or None)
    if tools is None:
        return AssistantMessage(content=text)
    return AssistantMessage(content=None, tool_calls=read_calls(text, tools.name))


def _tools_finish(
    finish: OpenAIFinishReason | None, last: TokenEvent, tools: ToolPlan | None, called: bool
) -> OpenAIFinishReason | None:
    """OpenAI's (and vLLM's) finish reason of an answer of calls: "tool_calls" for tool_choice "required", and for
    "auto" where the answer `called` a tool; "stop" for a named function; one cut by max_tokens is "length" either
    way. A "required" answer that the client's own stop sequence or stop token cut (`last`'s stop_reason) stays
    "stop": its calls are unfinished JSON, which "tool_calls" would pass off as calls to make."""
    if finish != "stop" or tools is None:
        return finish
    if (tools.mode == "required" and last.stop_reason is None) or (tools.mode == "auto" and called):
        return "tool_calls"
    return finish
