"""Every field a client sends, bounded: a guard over the request models of every route.

The routes' body models are walked recursively (nested models, unions, lists, dicts) and every field whose values a
client can make large (strings, numbers, lists, dicts) must be in BOUNDS, saying where it is bounded:

- Meta: pydantic bounds it; this test checks the constraint is there (strings, lists and dicts a max_length or a
  validator that counts them first, numbers a lower and an upper bound).
- Checked: a check after validation bounds it (against max_seq_len, the vocabulary, the grammar's bounds); its
  probe, an extreme value of the field, is sent to the app here, and must be answered as the entry says.
- Linear: only the body's size bounds it, which is fine for text or data whose cost follows its length (ignored
  fields, descriptions): never for counts, which multiply the work.

A field added without an entry fails here: bound it where it enters (a 4xx naming it), then add it with its reason."""

import inspect
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from annotated_types import Ge, Gt, Le, Lt, MaxLen
from api.test_boundary import app_settings, body, client, post  # noqa: F401 - fixtures
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from loraplex.settings import Settings
from server.api.responses_schemas import CHAT_EXTRAS, ResponsesRequest
from server.api.schemas import ChatCompletionRequest
from server.app import create_app

MAX_SEQ_LEN = 64  # test_boundary's app
LONG = "x" * 100_000  # past the prompt's character bound at MAX_SEQ_LEN (32 a token)
C, CHAT, RESP = "/v1/completions", "/v1/chat/completions", "/v1/responses"
HUGE = int("9" * 4000)  # within the JSON parser's bound on digits (sys.get_int_max_str_digits)
SHOWN = "9" * 24 + "... (4000 digits)"


@dataclass(frozen=True)
class Meta:
    why: str


@dataclass(frozen=True)
class Checked:
    why: str
    path: str  # the probe: sent to this route ...
    payload: dict  # ... with this body
    status: int  # answered with this status
    says: str = ""  # and, for a 4xx, this in its message


@dataclass(frozen=True)
class Linear:
    why: str


Bound = Meta | Checked | Linear


def chat(**fields: Any) -> dict:
    return {"model": "llama", "messages": [{"role": "user", "content": "hi"}], **fields}


def tools(parameters: Any) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def nested(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


DEEP = nested(40)  # past the grammar's 32 levels
CHARS = "characters"  # the prompt's character bound says so
PROMPT_TOO_LONG = dict(status=422, says=CHARS)
HISTORY = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]

BOUNDS: dict[str, Bound] = {
    # ---- TGI / LoRAX ----
    "TgiRequest.inputs": Checked("prompt characters (max_seq_len x 32), then tokens", "/generate",
                                 {"inputs": LONG}, **PROMPT_TOO_LONG),
    "TgiParameters.adapter_id": Meta("at most 256 characters"),
    "TgiParameters.max_new_tokens": Checked("with the prompt, within max_seq_len", "/generate",
                                            body("/generate", max_new_tokens=10**30), 422, "max_new_tokens"),
    "TgiParameters.temperature": Meta("0 to 100"),
    "TgiParameters.top_k": Checked("at or over the vocabulary: no top-k", "/generate",
                                   body("/generate", top_k=10**30, max_new_tokens=1), 200),
    "TgiParameters.top_p": Meta("(0, 1]"),
    "TgiParameters.repetition_penalty": Meta("0.01 to 100"),
    "TgiParameters.frequency_penalty": Meta("-2 to 2"),
    "TgiParameters.seed": Meta("0 to 2^64 - 1"),
    "TgiParameters.stop": Meta("16 strings of 256 characters, matched each token"),
    "TgiParameters.truncate": Checked("a slice of the prompt's tokens: any value keeps at most all of them",
                                      "/generate", body("/generate", truncate=10**30, max_new_tokens=1), 200),
    "TgiParameters.top_n_tokens": Meta("0 to 20"),
    "TgiParameters.best_of": Meta("1 to 8: each a request of its own"),
    "TgiGrammar.value": Checked("the grammar's bounds: 32768 characters, 32 levels, time and fuel", "/generate",
                                body("/generate", grammar={"type": "json", "value": DEEP}), 422, "nests"),
    "LoraxResponseFormat.schema_": Checked("the grammar's bounds", "/generate",
                                           body("/generate", response_format={"type": "json_object", "schema": DEEP}),
                                           422, "nests"),
    "MergedAdapters.ids": Meta("1 to 8 names of at most 256 characters"),
    "MergedAdapters.weights": Meta("1 to 8 weights, each -100 to 100"),
    "MergedAdapters.merge_strategy": Meta("at most 256 characters (a refused one is named in the error)"),
    "MergedAdapters.density": Linear("accepted, unused by linear; finite"),
    "MergedAdapters.majority_sign_method": Meta("at most 256 characters; unused by linear"),
    # ---- OpenAI: completions and chat ----
    "OpenAISampling.model": Meta("at most 256 characters"),
    "OpenAISampling.max_tokens": Checked("with the prompt, within max_seq_len", C,
                                         body(C, max_tokens=10**30), 422, "max_tokens"),
    "CompletionRequest.max_tokens": Checked("with the prompt, within max_seq_len", C,
                                            body(C, max_tokens=10**30), 422, "max_tokens"),
    "OpenAISampling.max_completion_tokens": Checked("with the prompt, within max_seq_len", CHAT,
                                                    chat(max_completion_tokens=10**30), 422, "max_completion_tokens"),
    "OpenAISampling.temperature": Meta("0 to 2"),
    "OpenAISampling.top_p": Meta("(0, 1]"),
    "OpenAISampling.frequency_penalty": Meta("-2 to 2"),
    "OpenAISampling.presence_penalty": Meta("-2 to 2"),
    "OpenAISampling.logit_bias": Checked("at most 1024 entries, counted first; keys token ids of at most 12 digits, "
                                         "in the vocabulary; each bias -100 to 100", C,
                                         body(C, logit_bias={str(i): 1 for i in range(1025)}), 422, "at most 1024"),
    "OpenAISampling.seed": Meta("0 to 2^64 - 1"),
    "OpenAISampling.stop": Meta("16 strings of 256 characters, matched each token"),
    "OpenAISampling.n": Meta("1 to 8, and prompts x n at most 8: each choice a request of its own"),
    "OpenAISampling.top_k": Checked("at or over the vocabulary: no top-k", C,
                                    body(C, top_k=10**30, max_tokens=1), 200),
    "OpenAISampling.min_p": Meta("0 to 1"),
    "OpenAISampling.repetition_penalty": Meta("0.01 to 100"),
    "OpenAISampling.min_tokens": Checked("at most the completion limit", C,
                                         body(C, min_tokens=10**30), 422, "min_tokens"),
    "OpenAISampling.stop_token_ids": Checked("at most 1024, counted; each in the vocabulary; not all of it under "
                                             "min_tokens", C, body(C, stop_token_ids=[10**30]), 422,
                                             "stop_token_ids"),
    "OpenAISampling.guided_json": Checked("the grammar's bounds", C, body(C, guided_json=DEEP), 422, "nests"),
    "OpenAISampling.guided_regex": Checked("the grammar's bounds", C, body(C, guided_regex="a" * 40_000), 422,
                                           "32768"),
    "OpenAISampling.guided_choice": Checked("at most 1024 strings, together within the grammar's characters", C,
                                            body(C, guided_choice=["a" * 40_000]), 422, "32768"),
    "OpenAISampling.cache_salt": Meta("1 to 256 characters"),
    "OpenAISampling.prompt_logprobs": Meta("0 to 20: objects per prompt token"),
    "StructuredOutputs.json_": Checked("the grammar's bounds", C, body(C, structured_outputs={"json": DEEP}), 422,
                                       "nests"),
    "StructuredOutputs.regex": Checked("the grammar's bounds", C,
                                       body(C, structured_outputs={"regex": "a" * 40_000}), 422, "32768"),
    "StructuredOutputs.choice": Checked("at most 1024 strings, together within the grammar's characters", C,
                                        body(C, structured_outputs={"choice": ["a" * 40_000]}), 422, "32768"),
    "JsonSchemaFormat.name": Meta("at most 256 characters"),
    "JsonSchemaFormat.description": Linear("unused by the grammar"),
    "JsonSchemaFormat.schema_": Checked("the grammar's bounds", CHAT,
                                        chat(response_format={"type": "json_schema", "json_schema": {"schema": DEEP}}),
                                        422, "nests"),
    "CompletionRequest.prompt": Checked("text: its characters; token ids: counted first (131,072), then each prompt "
                                        "within max_seq_len and the vocabulary; a batch: counted first, and prompts x "
                                        "n at most 8", C, {"model": "llama", "prompt": [5] * 100}, 422,
                                        "max_seq_len"),
    "CompletionRequest.logprobs": Meta("0 to 20 (vLLM's max_logprobs; OpenAI's 5)"),
    "CompletionRequest.best_of": Meta("1 to 8, and prompts x best_of at most 8"),
    "ChatCompletionRequest.messages": Meta("1 to 1024, counted first; their parts and calls 1024 in all"),
    "ChatCompletionRequest.top_logprobs": Meta("0 to 20"),
    "ChatCompletionRequest.tools": Meta("at most 128, counted first"),
    "ChatMessage.content": Checked("a string: the messages' characters; parts: at most 1024 in all", CHAT,
                                   chat(messages=[{"role": "user", "content": LONG}]), **PROMPT_TOO_LONG),
    "ChatMessage.tool_calls": Meta("at most 1024 in all the messages, counted first"),
    "ChatMessage.tool_call_id": Meta("at most 256 characters, counted with the messages' characters"),
    "ContentPart.text": Checked("the messages' characters", CHAT,
                                chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONG}]}]),
                                **PROMPT_TOO_LONG),
    "HistoryToolCall.id": Meta("at most 256 characters, counted with the messages' characters"),
    "HistoryFunctionCall.name": Meta("at most 64 characters"),
    "HistoryFunctionCall.arguments": Checked("the messages' characters (templates render them)", CHAT,
                                             chat(messages=[*HISTORY[:1], {**HISTORY[1], "tool_calls": [
                                                 {"id": "c", "function": {"name": "f", "arguments": LONG}}]}]),
                                             **PROMPT_TOO_LONG),
    "FunctionDefinition.name": Meta("1 to 64 of a-z A-Z 0-9 _ - (a validator)"),
    "FunctionDefinition.description": Meta("at most 8192 characters, counted with the messages' characters"),
    "FunctionDefinition.parameters": Checked("the grammar's bounds, planned under every tool_choice but none (which "
                                             "leaves them unused)", CHAT, chat(tools=tools(DEEP)), 422, "nests"),
    "NamedFunction.name": Meta("1 to 64 of a-z A-Z 0-9 _ - (a validator)"),
    # ---- OpenAI: responses (its chat extras are validated as the chat request's own fields) ----
    "ResponsesRequest.model": Meta("at most 256 characters"),
    "ResponsesRequest.input": Checked("text: its characters; items: 1 to 1024, counted first, parts 1024 in all",
                                      RESP, {"model": "llama", "input": LONG}, **PROMPT_TOO_LONG),
    "ResponsesRequest.instructions": Checked("the messages' characters", RESP,
                                             {"model": "llama", "input": "hi", "instructions": LONG},
                                             **PROMPT_TOO_LONG),
    "ResponsesRequest.max_output_tokens": Checked("with the prompt, within max_seq_len", RESP,
                                                  {"model": "llama", "input": "hi", "max_output_tokens": 10**30},
                                                  422, "max_output_tokens"),
    "ResponsesRequest.temperature": Meta("0 to 2"),
    "ResponsesRequest.top_p": Meta("(0, 1]"),
    "ResponsesRequest.tools": Meta("at most 128, counted first"),
    "ResponsesRequest.metadata": Checked("at most 16 keys of 64 characters, values of 512 (a validator, first)",
                                         RESP, {"model": "llama", "input": "hi", "metadata": {"k" * 65: "v"}}, 422,
                                         "metadata"),
    "MessageItem.content": Checked("a string: the messages' characters; parts: at most 1024 in all", RESP,
                                   {"model": "llama", "input": [{"role": "user", "content": LONG}]},
                                   **PROMPT_TOO_LONG),
    "TextPart.text": Checked("the messages' characters", RESP,
                             {"model": "llama", "input": [{"role": "user", "content": [
                                 {"type": "input_text", "text": LONG}]}]}, **PROMPT_TOO_LONG),
    "FunctionCallItem.call_id": Meta("at most 256 characters"),
    "FunctionCallItem.name": Meta("at most 64 characters"),
    "FunctionCallItem.arguments": Checked("the messages' characters", RESP,
                                          {"model": "llama", "input": [{"type": "function_call", "call_id": "c",
                                                                        "name": "f", "arguments": LONG}]},
                                          **PROMPT_TOO_LONG),
    "FunctionCallOutputItem.call_id": Meta("at most 256 characters"),
    "FunctionCallOutputItem.output": Checked("the messages' characters", RESP,
                                             {"model": "llama", "input": [{"type": "function_call_output",
                                                                           "call_id": "c", "output": LONG}]},
                                             **PROMPT_TOO_LONG),
    "FunctionTool.name": Meta("1 to 64 of a-z A-Z 0-9 _ - (a validator)"),
    "FunctionTool.description": Meta("at most 8192 characters"),
    "FunctionTool.parameters": Checked("the grammar's bounds", RESP,
                                       {"model": "llama", "input": "hi", "tools": [
                                           {"type": "function", "name": "f", "parameters": DEEP}]}, 422, "nests"),
    "FunctionChoice.name": Meta("1 to 64 of a-z A-Z 0-9 _ - (a validator)"),
    "TextFormat.name": Meta("at most 256 characters"),
    "TextFormat.description": Linear("unused by the grammar; the response repeats it, as OpenAI's does"),
    "TextFormat.schema_": Checked("the grammar's bounds", RESP,
                                  {"model": "llama", "input": "hi", "text": {"format": {"type": "json_schema",
                                                                                        "schema": DEEP}}},
                                  422, "nests"),
    # ---- tokenizer routes ----
    "TgiTokenize.inputs": Checked("the prompt's characters, then max_seq_len tokens", "/tokenize",
                                  {"inputs": LONG}, **PROMPT_TOO_LONG),
    "TgiTokenize.parameters": Linear("accepted and ignored, as TGI does"),
    "VllmTokenizeCompletion.model": Meta("at most 256 characters"),
    "VllmTokenizeCompletion.prompt": Checked("the prompt's characters, then max_seq_len tokens", "/tokenize",
                                             {"prompt": LONG}, **PROMPT_TOO_LONG),
    "VllmTokenizeChat.model": Meta("at most 256 characters"),
    "VllmTokenizeChat.messages": Meta("as chat's messages"),
    "DetokenizeRequest.model": Meta("at most 256 characters"),
    "DetokenizeRequest.tokens": Checked("counted first (131,072), then at most max_seq_len ids of the vocabulary",
                                        "/detokenize", {"tokens": [-1]}, 422, "token id -1"),
    # ---- admin routes' query and path parameters: in the URL, which the HTTP server bounds (its head) ----
    "GET /v1/adapters query limit": Meta("1 to 1000 a page"),
    "GET /v1/adapters query after": Linear("a cursor, compared with names"),
    "GET /v1/adapters query broken_limit": Meta("1 to 1000 a page"),
    "GET /v1/adapters query broken_after": Linear("a version's key, parsed by its rule"),
    "GET /v1/adapters/{ref} path ref": Linear("a name, parsed by its rule"),
    "GET /v1/adapters/{ref} query versions_limit": Meta("1 to 1000 a page"),
    "GET /v1/adapters/{ref} query versions_after": Linear("a version number, matched by its rule"),
    "DELETE /v1/adapters/{ref} path ref": Linear("a name, parsed by its rule"),
}  # fmt: skip

# Routes that read their body themselves, not into a model: what bounds it
RAW_BODIES = {
    "POST /v1/adapters": "multipart: at most 4 files and 4 fields, --max-adapter-mb, a least rate, upload slots",
}

Open = tuple[str, type, list[Any]]  # where in a field's type, its kind (str, int, float, list, dict), its metadata


def _flat(metadata: list[Any]) -> list[Any]:
    """Metadata with a Field(...) inside an Annotated replaced by its own constraints."""
    return [item for m in metadata for item in (_flat(m.metadata) if isinstance(m, FieldInfo) else [m])]


def _walk(tp: Any, metadata: list[Any], models: list[type[BaseModel]], where: str = "") -> Iterator[Open]:
    """The parts of type `tp` a client can make large, each with the metadata that applies to it; the models it
    holds go to `models`, to be walked as their own fields."""
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extra = get_args(tp)
        yield from _walk(inner, metadata + _flat(extra), models, where)
    elif origin in (Union, types.UnionType):  # a field's constraints apply to each member
        for member in get_args(tp):
            yield from _walk(member, metadata, models, where)
    elif origin is Literal or tp in (bool, type(None)):
        return
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        models.append(tp)
    elif origin in (list, dict):
        yield where, origin, metadata
        for i, arg in enumerate(get_args(tp)):
            yield from _walk(arg, [], models, where + ("[]" if origin is list else ("{key}", "{value}")[i]))
    elif tp in (str, int, float, list, dict):
        yield where, tp, metadata
    else:
        raise AssertionError(f"{where or 'a field'}: {tp!r} is a type this guard does not know: teach it")


def _routes(routes: list[Any]) -> Iterator[Any]:
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included router
        yield from _routes(inner.routes) if inner is not None else [route]


def _declarer(model: type[BaseModel], name: str) -> str:
    """The class that declares field `name` (an inherited field is one entry, under its declaring class)."""
    return next(c for c in model.__mro__ if name in inspect.get_annotations(c)).__name__


def client_fields() -> dict[str, list[Open]]:
    """Every field of every model a route parses a body into (nested ones too), and every query and path parameter,
    each with its open parts (those without one are left out: booleans, literals, nested models)."""
    app = create_app(Settings(device="cpu"))
    fields: dict[str, list[Open]] = {}
    todo: list[type[BaseModel]] = []
    for route in _routes(app.routes):
        if not isinstance(route, APIRoute):
            continue
        for method in route.methods:
            for param in route.dependant.body_params:
                assert not list(_walk(param.field_info.annotation, [], todo)), f"{route.path}: a body not a model"
            for kind, params in (("query", route.dependant.query_params), ("path", route.dependant.path_params)):
                for param in params:
                    parts = list(_walk(param.field_info.annotation, _flat(param.field_info.metadata), todo))
                    if parts:
                        fields[f"{method} {route.path} {kind} {param.name}"] = parts
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            parts = list(_walk(info.annotation, _flat(info.metadata), todo))
            if parts:
                fields[f"{_declarer(model, name)}.{name}"] = parts
    return fields


def raw_body_routes() -> set[str]:
    """Routes that take a body (POST, PUT, PATCH) without a model: they read it themselves."""
    app = create_app(Settings(device="cpu"))
    return {
        f"{method} {route.path}"
        for route in _routes(app.routes)
        if isinstance(route, APIRoute) and not route.dependant.body_params
        for method in route.methods & {"POST", "PUT", "PATCH"}
    }


def _counts_first(item: Any) -> bool:
    """A validator that bounds a list's or dict's length before its items are validated."""
    func = getattr(item, "func", None)
    return func is not None and func.__qualname__.startswith("counted_first.")


def _unbounded(kind: type, metadata: list[Any]) -> str | None:
    """What the metadata lacks to bound a value of `kind`; None where it bounds it."""
    if kind in (str, list, dict):
        lengths = [m.max_length for m in metadata if isinstance(m, MaxLen | StringConstraints)]
        named = [m for m in metadata if getattr(getattr(m, "func", None), "__name__", "") == "_tool_name"]
        if any(length is not None for length in lengths) or named or any(map(_counts_first, metadata)):
            return None
        return "max_length"
    upper = any(isinstance(m, Le | Lt) for m in metadata)
    lower = any(isinstance(m, Ge | Gt) for m in metadata)
    return None if upper and lower else "lower and upper bound (ge/gt and le/lt)"


FIELDS = client_fields()


def test_every_client_field_has_a_bound() -> None:
    missing = sorted(FIELDS.keys() - BOUNDS.keys())
    assert not missing, (
        f"{missing}: client fields with no entry in BOUNDS. Bound each where it enters (a pydantic constraint, or a "
        "check answering 4xx that names it), then add it to BOUNDS with the constraint or check and why it suffices"
    )
    stale = sorted(BOUNDS.keys() - FIELDS.keys())
    assert not stale, f"{stale}: in BOUNDS but no longer a client field: remove them"


@pytest.mark.parametrize("name", sorted(k for k, v in BOUNDS.items() if isinstance(v, Meta)))
def test_a_meta_bound_is_in_the_models_metadata(name: str) -> None:
    for where, kind, metadata in FIELDS.get(name, []):
        lacks = _unbounded(kind, metadata)
        assert lacks is None, (
            f"{name}{where} ({kind.__name__}): BOUNDS says pydantic bounds it, but it has no {lacks}: add one, or "
            "enter its real bound"
        )


@pytest.mark.parametrize("name", sorted(k for k, v in BOUNDS.items() if isinstance(v, Linear)))
def test_only_text_and_ignored_data_is_bounded_by_the_body_size_alone(name: str) -> None:
    # an int or a list bounded by nothing but the body size multiplies work (a count, a length of work): never Linear
    for where, kind, metadata in FIELDS.get(name, []):
        assert kind in (str, dict, float) or _unbounded(kind, metadata) is None, (
            f"{name}{where} ({kind.__name__}) is a count or a list: bound it, not only by the body's size"
        )


def test_routes_reading_their_own_body_are_listed() -> None:
    assert raw_body_routes() == RAW_BODIES.keys()


def test_the_responses_extras_are_chat_fields() -> None:
    # ResponsesRequest keeps unknown fields: CHAT_EXTRAS of them are validated as the chat request's, the rest dropped
    assert ResponsesRequest.model_config.get("extra") == "allow"
    assert set(CHAT_EXTRAS) <= ChatCompletionRequest.model_fields.keys()


@pytest.mark.parametrize("name", sorted(k for k, v in BOUNDS.items() if isinstance(v, Checked)))
def test_a_checked_bound_answers_its_probe(client: TestClient, name: str) -> None:  # noqa: F811 - the fixture
    bound = BOUNDS[name]
    assert isinstance(bound, Checked)
    status, answer = post(client, bound.path, bound.payload)
    assert status == bound.status, (name, status, str(answer)[:300])
    if status >= 400:
        assert bound.says in answer["error"]["message"], (name, answer)
        assert len(answer["error"]["message"]) < 1000, (name, answer)  # a probe's value is not echoed whole


# ---- bounds this audit added ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "says"),
    [
        ("/generate", body("/generate", merged_adapters={"ids": ["a"], "weights": [1], "merge_strategy": LONG}),
         "merge_strategy"),
        (CHAT, chat(messages=[{"role": "user", "content": [{"type": LONG}]}]), "text content parts"),
        (RESP, {"model": "llama", "input": [{"role": "user", "content": [{"type": LONG}]}]}, "text content"),
        # integers of thousands of digits (JSON sets them no bound): their first digits and how many there are
        (C, body(C, max_tokens=HUGE), f"max_tokens {SHOWN}"),
        (CHAT, chat(max_completion_tokens=HUGE), f"max_completion_tokens {SHOWN}"),
        (RESP, {"model": "llama", "input": "hi", "max_output_tokens": HUGE}, f"max_output_tokens {SHOWN}"),
        ("/generate", body("/generate", max_new_tokens=HUGE), f"max_new_tokens {SHOWN}"),
        (C, body(C, max_tokens=4, min_tokens=HUGE), f"min_tokens {SHOWN}"),
        (CHAT, chat(stop_token_ids=[HUGE]), f"stop_token_ids: token id {SHOWN}"),
        (C, {"model": "llama", "prompt": [HUGE]}, f"the prompt: token id {SHOWN}"),
        (C, {"model": "llama", "prompt": [[1], [HUGE]]}, f"prompt 1: token id {SHOWN}"),
        ("/detokenize", {"tokens": [-HUGE]}, f"token id -{SHOWN}"),
        (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "integer", "minimum": HUGE}}}), f"a minimum of {SHOWN}"),
    ],
)  # fmt: skip
def test_a_refused_value_is_not_echoed_whole(client: TestClient, path: str, payload: dict, says: str) -> None:  # noqa: F811
    status, answer = post(client, path, payload)
    assert status == 422 and says in answer["error"]["message"], (status, str(answer)[:300])
    assert len(answer["error"]["message"]) < 1000, str(answer)[:300]


def greedy(client: TestClient) -> str:  # noqa: F811 - the fixture's name
    status, answer = post(client, C, body(C, "The", max_tokens=24, temperature=0, seed=3))
    assert status == 200, answer
    return answer["choices"][0]["text"]


def test_stop_tokens_that_leave_nothing_to_draw_are_refused_beside_an_honest_request(client: TestClient) -> None:  # noqa: F811
    """stop_token_ids with EOS covering a small vocabulary (a byte-level model's: the test model has 259 tokens),
    under min_tokens, which holds them all back: the engine was left no token to draw, and the request failed
    mid-generation as a 500 blamed on overflowed activations. It is a 422 where it enters; an honest request
    running meanwhile gets the answer it gets alone."""
    vocabulary = client.app.state.runtime.base.model.config.vocab_size  # type: ignore[attr-defined]
    hostile = body(C, stop_token_ids=list(range(vocabulary)), min_tokens=2, max_tokens=4)
    alone = greedy(client)
    together: list[str] = []
    honest = threading.Thread(target=lambda: together.append(greedy(client)))
    honest.start()
    for _ in range(4):
        status, answer = post(client, C, hostile)
        assert status == 422, (status, answer)
        assert answer["error"]["code"] == "invalid_tokens" and "min_tokens" in answer["error"]["message"], answer
    honest.join()
    assert together == [alone]
    # without min_tokens the same stops are only ways to end: answered
    assert post(client, C, body(C, stop_token_ids=list(range(vocabulary)), max_tokens=4))[0] == 200
    assert client.get("/health").status_code == 200
