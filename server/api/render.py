"""Answers built and serialized in a worker thread, a model at a time. An answer with top logprobs is one object
per alternative of every token of every choice (8 choices x 470 tokens x 20: 75,000 objects, 5.8 MB of JSON);
built on the event loop it held every other stream for over a second. A thread alone is not enough: pydantic
serializes a whole model in one call that keeps the interpreter lock (0.6 s for that answer), while between
calls the interpreter hands the loop its turn every few milliseconds.

The threads are the answers' own. asyncio's default pool also stages uploads, looks adapters up in the store for
GET /v1/adapters/{ref} (network round trips on a shared store) and builds adapter mixes, each of which clients can
queue by the dozen; an answer queued behind them waited as long, its tokens long made."""

import asyncio
import contextvars
import functools
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import Response
from pydantic import BaseModel

# A render keeps the interpreter lock most of its time, so more threads add no throughput; four keep a small answer
# from waiting for one large one (the lock changes hands every few milliseconds).
RENDER_THREADS = 4
_threads = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render")


async def json_off_loop(build: Callable[[], BaseModel | Sequence[BaseModel]]) -> Response:
    """`build()`'s model (or list of models, as a JSON array), built and serialized off the event loop: the JSON
    FastAPI would write for it as the route's response model, its fields holding models last."""
    return Response(await rendered_off_loop(build), media_type="application/json")


async def rendered_off_loop(build: Callable[[], BaseModel | Sequence[BaseModel]]) -> bytes:
    """The JSON of json_off_loop's answer, for a stream's event (a streamed choice's first chunk may carry its
    prompt's scores: tens of objects a prompt token)."""

    def render() -> bytes:
        built = build()
        return _json(built) if isinstance(built, BaseModel) else _array(built)

    run = functools.partial(contextvars.copy_context().run, render)  # as asyncio.to_thread would run it
    return await asyncio.get_running_loop().run_in_executor(_threads, run)


def _holds_models(value: object) -> bool:
    return isinstance(value, BaseModel) or (isinstance(value, list) and bool(value) and isinstance(value[0], BaseModel))


def _json(model: BaseModel) -> bytes:
    fields = type(model).model_fields
    nested = [name for name in fields if _holds_models(getattr(model, name))]
    own = model.model_dump_json(by_alias=True, exclude=set(nested)).encode()
    if not nested:
        return own
    parts = []
    for name in nested:
        value = getattr(model, name)
        key = json.dumps(fields[name].serialization_alias or fields[name].alias or name).encode()
        parts.append(key + b":" + (_json(value) if isinstance(value, BaseModel) else _array(value)))
    return own[:-1] + (b"," if own != b"{}" else b"") + b",".join(parts) + b"}"


def _array(models: Sequence[BaseModel]) -> bytes:
    return b"[" + b",".join(_json(model) for model in models) + b"]"
