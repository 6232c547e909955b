"""Tokenizer endpoints: POST /tokenize and /detokenize in vLLM's shapes; /tokenize answers TGI's shape (a list
of tokens with their character offsets) when the body is TGI's (`inputs`). Tokenizing runs in a worker
thread, after the same character bound as the generation routes, and counts against the client's share of
requests (--max-requests-per-client) as theirs does."""

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Response

from server.api.auth import require_inference
from server.api.deps import get_inference
from server.api.jsonbody import OffLoopJsonRoute
from server.api.render import json_off_loop
from server.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TgiSimpleToken,
    TgiTokenize,
    TokenizeRequest,
    VllmTokenizeChat,
    VllmTokenizeResponse,
)
from server.inference import Inference

router = APIRouter(route_class=OffLoopJsonRoute, tags=["tokenizer"], dependencies=[Depends(require_inference)])
InferenceDep = Annotated[Inference, Depends(get_inference)]


@router.post("/tokenize", response_model=VllmTokenizeResponse | list[TgiSimpleToken])
async def tokenize(body: Annotated[TokenizeRequest, Body()], inference: InferenceDep) -> Response:
    # A text within the character bound can be ~250,000 tokens (an object each in TGI's shape, megabytes of JSON):
    # answers are bounded at max_seq_len tokens, and built off the event loop, which every other client's stream
    # shares
    if isinstance(body, TgiTokenize):
        text, spans = body.inputs, await inference.tokenize(body.inputs)
        inference.check_tokenized(len(spans))
        return await json_off_loop(
            lambda: [TgiSimpleToken(id=i, text=text[start:stop], start=start, stop=stop) for i, start, stop in spans]
        )
    if isinstance(body, VllmTokenizeChat):
        ids = await inference.encode_chat([m.template() for m in body.messages], body.add_generation_prompt)
    else:
        ids = [i for i, _, _ in await inference.tokenize(body.prompt, body.add_special_tokens)]
    inference.check_tokenized(len(ids))
    strings = await inference.token_strings(ids) if body.return_token_strs else None
    limit = inference.max_seq_len
    return await json_off_loop(
        lambda: VllmTokenizeResponse(count=len(ids), max_model_len=limit, tokens=ids, token_strs=strings)
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, inference: InferenceDep) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=await inference.detokenize(body.tokens))
