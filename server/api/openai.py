"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions. `model` names an adapter
(`name` or `name@N`) or the base model's served name; `stream: true` is SSE ending with `data: [DONE]`."""

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from adapters.errors import AdapterError, AdapterNotFound
from loraplex.errors import LoraplexError
from server.api.auth import require_inference
from server.api.deps import get_inference, get_runtime
from server.api.jsonbody import OffLoopJsonRoute
from server.api.render import json_off_loop
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
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.api.sse import OPENAI, sse_response
from server.client_share import prefix_salt
from server.engine import SamplingParams, TokenEvent
from server.grammar import CompiledGrammar
from server.inference import Adapter, Generation, Inference, choice_samplings, until_disconnected
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


def _sampling(
    body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], inference: Inference, default: int
) -> SamplingParams:
    limit, field = body.max_tokens_field
    max_new_tokens = inference.max_new_tokens(len(prompt_ids), limit, field, default)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_tokens=inference.min_tokens(body.min_tokens, max_new_tokens, field, limit is not None),
        temperature=inference.temperature(1.0 if body.temperature is None else body.temperature),
        top_p=body.top_p or 1.0,
        top_k=inference.top_k(None if body.top_k is None else max(body.top_k, 0)),  # vLLM's -1: off
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        ignore_eos=body.ignore_eos,
        stop_token_ids=inference.stop_token_ids(body.stop_token_ids),
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=inference.logit_bias(body.logit_bias),
        stop=tuple(body.stop_list),
        include_stop_str_in_output=body.include_stop_str_in_output,
        seed=body.seed,
        top_logprobs=body.top_logprobs_asked,
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
    """The legacy shape; each top_logprobs entry holds the N most likely tokens and the sampled one, as OpenAI's
    (so up to N + 1). `offset`: characters of this choice's text before these events (streaming)."""
    out = CompletionLogprobs()
    for e in events:
        if e.token_id is None or e.logprob is None:
            continue
        text = inference.token_text(e.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(max(e.logprob, LOGPROB_FLOOR))
        top = {inference.token_text(t): max(v, LOGPROB_FLOOR) for t, v in e.top_logprobs}
        top.setdefault(text, max(e.logprob, LOGPROB_FLOOR))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    """Usage as OpenAI's; `cached_tokens`: of the choices' prompts (one prompt, counted once), the fewest tokens one
    found in the KV cache (the first choice's prompt warms it for the others')."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def _results_usage(prompt_tokens: int, results: list[Generation]) -> Usage:
    cached = min(r.events[-1].cached_tokens for r in results)
    return _usage(prompt_tokens, sum(len(r.tokens) for r in results), cached)


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
    prompt_ids: list[int],
    samplings: list[SamplingParams],
    adapter: Adapter,
    grammar: CompiledGrammar | None,
    inference: Inference,
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The choices' streams, opened while listening for the client: choices open one after another, each once
    the one before has its first token, so with the batch full they wait for rows; until the response starts,
    nothing else would hear a client that left, and its choices would run to max_tokens for nobody."""
    return await until_disconnected(request, lambda: inference.open_streams(prompt_ids, samplings, adapter, grammar))


async def _choice_chunks(
    events: AsyncIterator[tuple[int, TokenEvent]], count: int, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[tuple[int, TokenEvent, OpenAIFinishReason | None, Usage | None]]:
    """Per event of `count` choices: its choice index, the event, its finish reason and, on the event that ends
    the last choice, the usage if asked for. Closing this cancels every choice still running."""
    async with aclosing(events):  # type: ignore[type-var]
        generated, running, cached = 0, count, prompt_tokens
        async for index, event in events:
            generated += event.token_id is not None
            finish = _finish(event) if event.finish_reason else None
            running -= finish is not None
            cached = min(cached, event.cached_tokens)
            usage = _usage(prompt_tokens, generated, cached) if include_usage and not running else None
            yield index, event, finish, usage


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def completions(body: CompletionRequest, request: Request, inference: InferenceDep) -> Response:
    _salted(body)
    adapter = await _adapter(body, inference)
    grammar = await inference.grammar(body.grammar_spec())
    prompt_ids = await inference.encode_prompt(body.text)
    samplings = choice_samplings(_sampling(body, prompt_ids, inference, COMPLETION_DEFAULT_MAX_TOKENS), body.candidates)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = body.text if body.echo else ""  # each choice's text begins with the prompt's
    if body.stream:
        events = await _open_streams(request, prompt_ids, samplings, adapter, grammar, inference)

        async def chunks() -> AsyncIterator[CompletionResponse]:
            offsets = [0] * body.n
            echoes = [echo] * body.n  # the prompt goes out with each choice's first chunk, as vLLM streams it
            async with aclosing(_choice_chunks(events, body.n, len(prompt_ids), body.include_usage)) as choices:
                async for index, event, finish, usage in choices:
                    text, echoes[index] = echoes[index] + event.text, ""
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = _completion_logprobs([event], inference, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs.tokens)
                    yield CompletionResponse(
                        id=rid,
                        created=created,
                        model=body.model,
                        usage=usage,
                        choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],
                    )

        return sse_response(chunks(), OPENAI)
    results = await inference.generate_many(request, prompt_ids, samplings, adapter, grammar)
    if len(results) > body.n:  # best_of: the n of highest total logprob, best first (as vLLM)
        results = sorted(results, key=_cumulative_logprob, reverse=True)[: body.n]
    return await json_off_loop(
        lambda: CompletionResponse(
            id=rid,
            created=created,
            model=body.model,
            usage=_results_usage(len(prompt_ids), results),
            choices=[
                CompletionChoice(
                    index=i,
                    text=echo + r.text,
                    finish_reason=_finish(r.events[-1]),
                    logprobs=None if body.logprobs is None else _completion_logprobs(r.events, inference),
                )
                for i, r in enumerate(results)
            ],
        )
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, inference: InferenceDep) -> Response:
    _salted(body)
    adapter = await _adapter(body, inference)
    grammar = await inference.grammar(body.grammar_spec())
    prompt_ids = await inference.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    samplings = choice_samplings(_sampling(body, prompt_ids, inference, CHAT_DEFAULT_MAX_TOKENS), body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        events = await _open_streams(request, prompt_ids, samplings, adapter, grammar, inference)

        async def chunks() -> AsyncIterator[ChatCompletionChunk]:
            async with aclosing(_choice_chunks(events, body.n, len(prompt_ids), body.include_usage)) as choices:
                for index in range(body.n):
                    yield ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=body.model,
                        choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))],
                    )
                async for index, event, finish, usage in choices:
                    logprobs = _chat_logprobs([event], inference) if body.logprobs else None
                    yield ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=body.model,
                        usage=usage,
                        choices=[
                            ChatChunkChoice(
                                index=index,
                                delta=ChatDelta(content=event.text),
                                finish_reason=finish,
                                logprobs=logprobs,
                            )
                        ],
                    )

        return sse_response(chunks(), OPENAI)
    results = await inference.generate_many(request, prompt_ids, samplings, adapter, grammar)
    return await json_off_loop(
        lambda: ChatCompletionResponse(
            id=rid,
            created=created,
            model=body.model,
            usage=_results_usage(len(prompt_ids), results),
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=r.text),
                    finish_reason=_finish(r.events[-1]),
                    logprobs=_chat_logprobs(r.events, inference) if body.logprobs else None,
                )
                for i, r in enumerate(results)
            ],
        )
    )
