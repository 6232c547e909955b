"""TGI / LoRAX generate protocol: POST /generate, POST /generate_stream (SSE), and POST / which dispatches
on `stream` and, when not streaming, answers a JSON array of one response (what their clients expect)."""

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import require_inference
from server.api.deps import get_inference
from server.api.schemas import (
    LOGPROB_FLOOR,
    TgiDetails,
    TgiFinishReason,
    TgiInputToken,
    TgiRequest,
    TgiResponse,
    TgiStreamDetails,
    TgiStreamEvent,
    TgiToken,
)
from server.api.sse import sse_response
from server.engine import SamplingParams, TokenEvent
from server.inference import Inference

DEFAULT_MAX_NEW_TOKENS = 100

router = APIRouter(tags=["generate (TGI / LoRAX)"], dependencies=[Depends(require_inference)])
InferenceDep = Annotated[Inference, Depends(get_inference)]


async def prompt_of(body: TgiRequest, inference: Inference) -> list[int]:
    ids = await inference.encode_prompt(body.inputs)
    truncate = body.parameters.truncate
    return ids[-truncate:] if truncate else ids  # TGI's `truncate`: the prompt's last tokens


def sampling_of(body: TgiRequest, prompt_ids: list[int], inference: Inference) -> SamplingParams:
    p = body.parameters
    # TGI's rule: it samples when do_sample is set or any warper is (temperature != 1, top_k, top_p < 1)
    warped = p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
    temperature = (1.0 if p.temperature is None else p.temperature) if p.do_sample or warped else 0.0
    return SamplingParams(
        max_new_tokens=inference.max_new_tokens(len(prompt_ids), p.max_new_tokens, "max_new_tokens",
                                                DEFAULT_MAX_NEW_TOKENS),
        temperature=inference.temperature(temperature),
        top_k=inference.top_k(p.top_k),
        top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        stop=tuple(p.stop),
        seed=p.seed,
        top_logprobs=p.top_n_tokens or 0,
    )


def finish_reason_of(event: TokenEvent, inference: Inference) -> TgiFinishReason:
    if event.finish_reason == "length":
        return "length"
    return "eos_token" if event.token_id in inference.eos_ids else "stop_sequence"


def token_of(event: TokenEvent, inference: Inference) -> TgiToken:
    assert event.token_id is not None
    return TgiToken(id=event.token_id, text=event.text, logprob=event.logprob,
                    special=event.token_id in inference.special_ids)


def top_tokens_of(event: TokenEvent, inference: Inference) -> list[TgiToken]:
    return [TgiToken(id=t, text=inference.token_text(t), logprob=max(v, LOGPROB_FLOOR),
                     special=t in inference.special_ids) for t, v in event.top_logprobs]


async def _generate(body: TgiRequest, request: Request, inference: Inference) -> TgiResponse:
    prompt_ids = await prompt_of(body, inference)
    sampling = sampling_of(body, prompt_ids, inference)
    result = await inference.generate(request, prompt_ids, sampling, inference.adapter_ref(body.parameters.adapter_id))
    text = (body.inputs + result.text) if body.parameters.return_full_text else result.text
    details = None
    if body.parameters.details:
        prefill = []
        if body.parameters.decoder_input_details:
            prefill = [TgiInputToken(id=i, text=inference.base.tokenizer.decode([i])) for i in prompt_ids]
        details = TgiDetails(
            finish_reason=finish_reason_of(result.events[-1], inference),
            prompt_tokens=result.prompt_tokens,
            generated_tokens=len(result.tokens),
            seed=sampling.seed if not sampling.greedy else None,
            prefill=prefill,
            tokens=[token_of(e, inference) for e in result.tokens],
            top_tokens=[top_tokens_of(e, inference) for e in result.tokens] if sampling.top_logprobs else [],
        )
    return TgiResponse(generated_text=text, details=details)


async def _events(body: TgiRequest, inference: Inference) -> AsyncIterator[TgiStreamEvent]:
    prompt_ids = await prompt_of(body, inference)
    sampling = sampling_of(body, prompt_ids, inference)
    events = await inference.open_stream(prompt_ids, sampling, inference.adapter_ref(body.parameters.adapter_id))
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
                        finish_reason=finish_reason_of(event, inference), prompt_tokens=len(prompt_ids),
                        generated_tokens=count, seed=sampling.seed if not sampling.greedy else None,
                    )
                yield out

    return rest()


@router.post("/generate", response_model=TgiResponse)
async def generate(body: TgiRequest, request: Request, inference: InferenceDep) -> TgiResponse:
    return await _generate(body, request, inference)


@router.post("/generate_stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "TgiStreamEvent per token"}})
async def generate_stream(body: TgiRequest, inference: InferenceDep) -> StreamingResponse:
    return sse_response(await _events(body, inference))


@router.post("/", response_model=list[TgiResponse],
             responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: true"}})
async def compat(body: TgiRequest, request: Request, inference: InferenceDep) -> list[TgiResponse] | StreamingResponse:
    if body.stream:
        return sse_response(await _events(body, inference))
    return [await _generate(body, request, inference)]
