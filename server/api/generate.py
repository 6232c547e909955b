"""TGI / LoRAX generate protocol: POST /generate, POST /generate_stream (SSE), and POST / which dispatches
on `stream` and, when not streaming, answers a JSON array of one response (what their clients expect)."""

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from loraplex.errors import LoraplexError
from server.api.auth import require_inference
from server.api.deps import get_inference
from server.api.jsonbody import OffLoopJsonRoute, read_where_cheapest
from server.api.render import json_off_loop
from server.api.schemas import (
    LOGPROB_FLOOR,
    TgiBestOfSequence,
    TgiDetails,
    TgiFinishReason,
    TgiInputToken,
    TgiRequest,
    TgiResponse,
    TgiStreamDetails,
    TgiStreamEvent,
    TgiToken,
)
from server.api.sse import TGI, sse_response
from server.engine import SamplingParams, TokenEvent
from server.inference import Adapter, Generation, Inference, choice_samplings, until_disconnected

DEFAULT_MAX_NEW_TOKENS = 100


class StreamedBestOf(LoraplexError):
    http_status = 422
    code = "invalid_request"


router = APIRouter(
    route_class=OffLoopJsonRoute, tags=["generate (TGI / LoRAX)"], dependencies=[Depends(require_inference)]
)
InferenceDep = Annotated[Inference, Depends(get_inference)]


async def prompt_of(body: TgiRequest, inference: Inference) -> list[int]:
    ids = await inference.encode_prompt(body.inputs)
    truncate = body.parameters.truncate
    return ids[-truncate:] if truncate else ids  # TGI's `truncate`: the prompt's last tokens


def sampling_of(body: TgiRequest, prompt_ids: list[int], inference: Inference, prefill: bool = False) -> SamplingParams:
    """`prefill`: the answer shows details.prefill, whose tokens' logprobs the engine then computes."""
    p = body.parameters
    temperature = (1.0 if p.temperature is None else p.temperature) if p.samples else 0.0
    return SamplingParams(
        max_new_tokens=inference.max_new_tokens(
            len(prompt_ids), p.max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS
        ),
        temperature=inference.temperature(temperature),
        top_k=inference.top_k(p.top_k),
        top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        stop=tuple(p.stop),
        seed=p.seed,
        top_logprobs=p.top_n_tokens or 0,
        prompt_logprobs=0 if prefill else None,
    )


def adapter_of(body: TgiRequest, inference: Inference) -> Adapter:
    p = body.parameters
    return p.merged_adapters.mix() if p.merged_adapters is not None else inference.adapter_ref(p.adapter_id)


def finish_reason_of(event: TokenEvent) -> TgiFinishReason:
    """TGI's reason: a stop that is not a stop sequence is EOS, or a complete grammar, which TGI ends with EOS."""
    if event.finish_reason == "length":
        return "length"
    return "stop_sequence" if event.stop_reason is not None else "eos_token"


def token_of(event: TokenEvent, inference: Inference, text: str | None = None) -> TgiToken:
    """The event's token with `text`, by default the text the event adds."""
    assert event.token_id is not None
    return TgiToken(
        id=event.token_id,
        text=event.text if text is None else text,
        logprob=event.logprob,
        special=event.token_id in inference.special_ids,
    )


def top_tokens_of(event: TokenEvent, inference: Inference) -> list[TgiToken]:
    return [
        TgiToken(id=t, text=inference.token_text(t), logprob=max(v, LOGPROB_FLOOR), special=t in inference.special_ids)
        for t, v in event.top_logprobs
    ]


def _sequence(
    result: Generation, sampling: SamplingParams, prompt_ids: list[int], body: TgiRequest, inference: Inference
) -> TgiBestOfSequence:
    prefill = []
    if result.prompt_logprobs is not None:  # the first token has none (null), as TGI's
        prefill = [TgiInputToken(id=t.token_id, text=inference.token_text(t.token_id),
                                 logprob=None if t.logprob is None else max(t.logprob, LOGPROB_FLOOR))
                   for t in result.prompt_logprobs.tokens()]  # fmt: skip
    # each token's own text: an event's text is what the answer adds, which holds back text that may begin a stop
    # sequence (then "" for a token, its text with a later one)
    texts: list[str | None] = [None] * len(result.tokens)
    if sampling.stop and body.parameters.details:  # only details show the tokens
        texts = list(inference.stream_texts([e.token_id for e in result.tokens if e.token_id is not None]))
    return TgiBestOfSequence(
        generated_text=(body.inputs + result.text) if body.parameters.return_full_text else result.text,
        finish_reason=finish_reason_of(result.events[-1]),
        generated_tokens=len(result.tokens),
        seed=sampling.seed if not sampling.greedy else None,
        prefill=prefill,
        tokens=[token_of(e, inference, text) for e, text in zip(result.tokens, texts, strict=True)],
        top_tokens=[top_tokens_of(e, inference) for e in result.tokens] if sampling.top_logprobs else [],
    )


def _total_logprob(result: Generation) -> float:
    return sum(e.logprob for e in result.tokens if e.logprob is not None)


async def _generate(body: TgiRequest, request: Request, inference: Inference) -> Callable[[], TgiResponse]:
    """The request run to its end; what it returns builds the answer (off the event loop: see render.py)."""
    grammar = await inference.grammar(await read_where_cheapest(request, body.parameters.grammar_spec))
    prompt_ids = await prompt_of(body, inference)
    prefill = body.parameters.details and body.parameters.decoder_input_details  # TGI streams no prefill
    samplings = choice_samplings(sampling_of(body, prompt_ids, inference, prefill), body.parameters.best_of or 1)
    runs = [(prompt_ids, sampling) for sampling in samplings]
    results = await inference.generate_many(request, runs, adapter_of(body, inference), grammar)

    def answer() -> TgiResponse:
        # best_of: the sequence of highest total logprob answers; the others go to details.best_of_sequences
        ranked = sorted(zip(results, samplings, strict=True), key=lambda pair: _total_logprob(pair[0]), reverse=True)
        best, *others = [_sequence(r, s, prompt_ids, body, inference) for r, s in ranked]
        details = None
        if body.parameters.details:
            details = TgiDetails(
                **best.model_dump(exclude={"generated_text"}),
                prompt_tokens=len(prompt_ids),
                best_of_sequences=others or None,
            )
        return TgiResponse(generated_text=best.generated_text, details=details)

    return answer


async def _events(body: TgiRequest, request: Request, inference: Inference) -> AsyncIterator[TgiStreamEvent]:
    if (body.parameters.best_of or 1) > 1:
        raise StreamedBestOf("best_of > 1 cannot be streamed (TGI's rule): use /generate, or best_of 1")
    grammar = await inference.grammar(await read_where_cheapest(request, body.parameters.grammar_spec))
    prompt_ids = await prompt_of(body, inference)
    sampling = sampling_of(body, prompt_ids, inference)
    events = await inference.open_stream(prompt_ids, sampling, adapter_of(body, inference), grammar)

    async def rest() -> AsyncIterator[TgiStreamEvent]:
        text = body.inputs if body.parameters.return_full_text else ""
        count = 0
        async with aclosing(events):  # closing this stream closes `events`, which cancels the request
            async for event in events:
                if event.token_id is None:  # an end-only event carries no token for TGI's schema
                    continue
                text += event.text
                count += 1
                out = TgiStreamEvent(token=token_of(event, inference), top_tokens=top_tokens_of(event, inference))
                if event.finish_reason is not None:
                    out.generated_text = text
                    out.details = TgiStreamDetails(
                        finish_reason=finish_reason_of(event),
                        prompt_tokens=len(prompt_ids),
                        generated_tokens=count,
                        seed=sampling.seed if not sampling.greedy else None,
                    )
                yield out

    return rest()


async def _stream(body: TgiRequest, request: Request, inference: Inference) -> StreamingResponse:
    # Until its first event the stream has no response that could hear the client leave: a client gone while
    # its request waits in the queue must cancel it, not leave it to run to max_new_tokens for nobody.
    return sse_response(await until_disconnected(request, lambda: _events(body, request, inference)), TGI)


@router.post("/generate", response_model=TgiResponse)
async def generate(body: TgiRequest, request: Request, inference: InferenceDep) -> Response:
    return await json_off_loop(await _generate(body, request, inference))


@router.post(
    "/generate_stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "TgiStreamEvent per token"}},
)
async def generate_stream(body: TgiRequest, request: Request, inference: InferenceDep) -> StreamingResponse:
    return await _stream(body, request, inference)


@router.post(
    "/",
    response_model=list[TgiResponse],
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}},
)
async def compat(body: TgiRequest, request: Request, inference: InferenceDep) -> Response:
    if body.stream:
        return await _stream(body, request, inference)
    answer = await _generate(body, request, inference)
    return await json_off_loop(lambda: [answer()])
