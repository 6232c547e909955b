"""Request and response bodies of the generation APIs: TGI/LoRAX and OpenAI. Fields clients send that we
do not use are accepted and ignored (extra="ignore"), so unchanged clients keep working; those whose value would
make the answer other than what was asked for (OpenAI's tools, suffix) are refused, saying what to send.

Every field a client sends is bounded here to what the engine can execute: floats are finite (pydantic
would otherwise take "NaN" and "Infinity"), seeds fit torch.Generator.manual_seed, lists and strings have a
length. What depends on the served model (prompt size, max_new_tokens, top_k) is checked by the routes.

Lists that a body may make long are validated fail_fast: pydantic otherwise reports every element that fails,
and a 4 MiB body of 2 million bad elements held the event loop (every client's requests) for 18 s while it built
an error of 180 MB."""

from collections.abc import Callable
from functools import cache, cached_property
from typing import Annotated, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StrictInt,
    StringConstraints,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticUndefined

from server.api.request_config import REQUEST
from server.api.tools import (
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    DeltaToolCall,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoiceMode,
    ToolPlan,
    check_tools,
    tool_choice_form,
    tool_plan,
)
from server.engine.sampling import MAX_LOGIT_BIAS, MAX_OPENAI_PENALTY
from server.grammar import JSON_OBJECT, MAX_GRAMMAR_CHARS, GrammarSpec, InvalidGrammar, not_unicode
from server.mixing import MAX_MIX_ADAPTERS, MAX_MIX_WEIGHT, AdapterMix
from server.tokenizer_pool import MAX_MESSAGES

# torch.Generator.manual_seed takes [-2**63, 2**64); negative seeds alias positive ones, so only these
MAX_SEED = 2**64 - 1
# OpenAI allows 4 stop sequences, TGI 4 by default: 16 is generous, and every one is matched per token
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
# in all of a request's messages: clients send one text part a message, or a few. Each part is a model validated
# on the event loop (~7 us): a 4 MiB body holds ~160,000 empty parts, most of a second for every other client
MAX_CONTENT_PARTS = 1024
# /detokenize's ids, counted before they are validated (max_seq_len bounds them after): 128K, the longest context of
# the common model families
MAX_TOKEN_IDS = 1 << 17
MAX_NAME_CHARS = 256  # adapter refs are at most 74 characters; served model names are operators' choice
MAX_TEMPERATURE = 100.0  # beyond it every distribution is uniform to float precision
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (and vLLM's default); TGI's top_n_tokens shares it
# JSON has no -inf: a token outside top-k/top-p reports this logprob instead, as vLLM does
LOGPROB_FLOOR = -9999.0

TopN = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
# OpenAI's frequency and presence penalties, over the generated tokens only (as vLLM)
OutputPenalty = Annotated[float, Field(ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)]
FREQUENCY_PENALTY = "A logit less this times its token's count in the output so far."
MAX_LOGIT_BIAS_ENTRIES = 1024  # each is a scatter in the sampler on every token of the request
LogitBias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
# choices of one request (n, best_of): each is a request of its own in the batch, so n x max_tokens is bounded
# by MAX_CHOICES x max_seq_len, and each takes a place in the queue
MAX_CHOICES = 8
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
StopSequence = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]


def _unicode(text: str) -> str:
    # constrained strings are refused by pydantic itself; this covers the others
    why = not_unicode(text)
    if why is not None:
        raise ValueError(why)
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # text that reaches the tokenizer


def counted_first(limit: int, what: str) -> BeforeValidator:
    """A list refused past `limit` items before any item is validated: pydantic checks a max_length only once it has
    validated every item, on the event loop (a 4 MiB body holds 1.2 million token ids, 0.16 s of validation, or
    100,000 messages, 0.1 s)."""

    def check(value: object) -> object:
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"{len(value)} {what}; at most {limit}")
        return value

    return BeforeValidator(check)


# ---- adapter mixing (LoRAX's merged_adapters; the OpenAI routes take it as an extra body field) -----------


class MergedAdapters(BaseModel):
    model_config = REQUEST

    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]] = Field(
        min_length=1, max_length=MAX_MIX_ADAPTERS, description="Adapters (`name` or `name@N`) to mix."
    )
    weights: list[Annotated[float, Field(ge=-MAX_MIX_WEIGHT, le=MAX_MIX_WEIGHT)]] = Field(
        min_length=1, max_length=MAX_MIX_ADAPTERS, description="One weight per adapter."
    )
    # bounded: a refused strategy is named in the error, which would otherwise repeat up to the whole body
    merge_strategy: str | None = Field(  # null: LoRAX's default, linear (lorax-client sends it so)
        "linear", max_length=MAX_NAME_CHARS, description='"linear": the weighted sum of the adapters\' deltas.'
    )
    density: float | None = None  # LoRAX's TIES/DARE knobs: accepted, unused by "linear"
    majority_sign_method: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @model_validator(mode="after")
    def _linear_and_paired(self) -> "MergedAdapters":
        if self.merge_strategy not in (None, "linear"):
            raise ValueError(f'merge_strategy {self.merge_strategy!r} is not supported: use "linear"')
        if len(self.ids) != len(self.weights):
            raise ValueError(f"{len(self.ids)} ids but {len(self.weights)} weights: send one weight per adapter")
        return self

    def mix(self) -> AdapterMix:
        return AdapterMix(tuple(self.ids), tuple(self.weights))


# ---- structured output: bounds and compilation live in server/grammar.py (a failure there is a 422) --------


class TgiGrammar(BaseModel):
    model_config = REQUEST

    type: Literal["json", "regex"]
    value: dict | str = Field(description="json: a JSON schema (an object, or its JSON text); regex: a pattern.")

    def spec(self) -> GrammarSpec:
        if self.type == "json":
            return GrammarSpec.json_schema(self.value)
        if not isinstance(self.value, str):
            raise InvalidGrammar("a regex grammar's value is the pattern, a string")
        return GrammarSpec.regex(self.value)


class LoraxResponseFormat(BaseModel):
    """LoRAX's parameters.response_format: {"type": "json_object", "schema": {...}} (no schema: any object)."""

    model_config = REQUEST | ConfigDict(populate_by_name=True)

    type: Literal["json_object"]
    schema_: dict | None = Field(None, alias="schema")

    def spec(self) -> GrammarSpec:
        return JSON_OBJECT if self.schema_ is None else GrammarSpec.json_schema(self.schema_)


# the characters with a meaning in a regex (llguidance reads Rust's regex syntax); the others stand for themselves
_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$#&-~")
MAX_STOP_TOKEN_IDS = 1024  # vLLM's stop_token_ids: a set the engine checks each token against
# A token id as JSON writes it: an integer. Lax mode read true as id 1 and 1.0 as id 1, letting a body that is
# wrong look right.
TokenId = Annotated[StrictInt, Field(ge=0)]
MAX_GUIDED_CHOICES = 1024  # guided_choice: answers one of these strings (its regex is bounded too, in characters)


def choice_spec(choices: list[str]) -> GrammarSpec:
    """vLLM's guided_choice: the answer is exactly one of `choices`, as a regex of their alternation."""
    # at least this long once escaped (counted in C), refused before the characters are escaped one by one on the
    # event loop: a 4 MiB body of choices took 0.2 s of it, where the body parses in 2 ms
    least = sum(map(len, choices)) + len(choices) - 1
    if least > MAX_GRAMMAR_CHARS:
        raise InvalidGrammar(
            f"the choices make a regex of at least {least} characters; at most {MAX_GRAMMAR_CHARS} are accepted"
        )
    return GrammarSpec.regex("|".join("".join("\\" + c if c in _REGEX_SPECIAL else c for c in s) for s in choices))


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs (its guided_json, guided_regex and guided_choice since v0.10): one of them."""

    model_config = REQUEST | ConfigDict(extra="forbid")  # vLLM's grammar, structural_tag, ...: not implemented, refused

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Annotated[str, StringConstraints(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_GUIDED_CHOICES
    )

    def spec(self) -> GrammarSpec | None:
        return guided_spec(self.json_, self.regex, self.choice)


def guided_spec(schema: dict | str | None, regex: str | None, choice: list[str] | None) -> GrammarSpec | None:
    """The grammar of vLLM's json, regex or choice constraint (None: none sent); two at once are a 422."""
    asked = [kind for kind, value in (("json", schema), ("regex", regex), ("choice", choice)) if value is not None]
    if len(asked) > 1:
        raise InvalidGrammar(f"{' and '.join(asked)} were both sent: send one constraint")
    if schema is not None:
        return GrammarSpec.json_schema(schema)
    if regex is not None:
        return GrammarSpec.regex(regex)
    return choice_spec(choice) if choice is not None else None


class JsonSchemaFormat(BaseModel):
    model_config = REQUEST | ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=MAX_NAME_CHARS)
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any object) or json_schema."""

    model_config = REQUEST

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema object')
        return self

    def spec(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return JSON_OBJECT
        assert self.json_schema is not None
        return GrammarSpec.json_schema(self.json_schema.schema_)


# ---- TGI / LoRAX ---------------------------------------------------------------------------------------

TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TgiParameters(BaseModel):
    model_config = REQUEST

    adapter_id: str | None = Field(
        None, max_length=MAX_NAME_CHARS, description="Adapter `name` or `name@N`; null or empty: the base model."
    )
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=0, description="Values at or over the vocabulary size mean no top-k.")
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    frequency_penalty: OutputPenalty | None = Field(None, description=FREQUENCY_PENALTY)
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = Field(
        False,
        description="The prompt's tokens in details.prefill, each with its logprob after the tokens before it (the "
        "first has none: null); the prompt is then computed whole, none of it taken from the prefix cache.",
    )
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    top_n_tokens: TopN | None = Field(None, description="The N most likely tokens at each position, in details.")
    best_of: Choices | None = Field(
        None,
        description="Sample this many sequences and answer the one of highest "
        "total logprob (the others in details.best_of_sequences); needs sampling.",
    )
    merged_adapters: MergedAdapters | None = Field(
        None, description="Run on a weighted mix of adapters (instead of adapter_id)."
    )
    grammar: TgiGrammar | None = Field(None, description="Constrain the output to a JSON schema or a regex.")
    response_format: LoraxResponseFormat | None = Field(None, description="LoRAX's form of a JSON constraint.")

    @field_validator("stop", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        # TGI's clients send these at their no-op values (null, 1.0, false), which are taken
        return refuse_unsupported(value, {
            "typical_p": (
                lambda p: p is not None and (isinstance(p, bool) or p != 1.0),
                "typical sampling is not implemented; send 1.0 or null, or leave it out (top_p or top_k bound "
                "the sampling instead)",
            ),
            "watermark": (not_off(False), "watermarking is not implemented; send false, or leave it out"),
        })  # fmt: skip

    @property
    def samples(self) -> bool:
        """TGI's rule: it samples when do_sample is set or any warper is (temperature != 1, top_k, top_p < 1)."""
        warped = self.temperature not in (None, 1.0) or bool(self.top_k) or self.top_p not in (None, 1.0)
        return self.do_sample or warped

    @model_validator(mode="after")
    def _one_adapter_choice(self) -> "TgiParameters":
        if self.merged_adapters is not None and self.adapter_id:
            raise ValueError("send adapter_id or merged_adapters, not both")
        return self

    @model_validator(mode="after")
    def _one_grammar(self) -> "TgiParameters":
        if self.grammar is not None and self.response_format is not None:
            raise ValueError("send grammar or response_format, not both")
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        constraint = self.grammar or self.response_format
        return constraint.spec() if constraint is not None else None

    @model_validator(mode="after")
    def _best_of_samples(self) -> "TgiParameters":
        if (self.best_of or 1) > 1 and not self.samples:
            raise ValueError("best_of > 1 needs sampling: set do_sample true (greedy sequences would all be equal)")
        return self


class TgiRequest(BaseModel):
    model_config = REQUEST

    inputs: str = Field(min_length=1)
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_default(cls, value: object) -> object:
        return {} if value is None else value


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class TgiInputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class TgiBestOfSequence(BaseModel):
    generated_text: str
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[TgiInputToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] = Field(default_factory=list)


class TgiDetails(BaseModel):
    finish_reason: TgiFinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    prefill: list[TgiInputToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] = Field(default_factory=list)
    best_of_sequences: list[TgiBestOfSequence] | None = None


class TgiResponse(BaseModel):
    generated_text: str
    details: TgiDetails | None = None


class TgiStreamDetails(BaseModel):
    finish_reason: TgiFinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class TgiStreamEvent(BaseModel):
    token: TgiToken
    top_tokens: list[TgiToken] = Field(default_factory=list)
    generated_text: str | None = None
    details: TgiStreamDetails | None = None


# ---- OpenAI --------------------------------------------------------------------------------------------

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


def _is_token_id(key: object) -> bool:
    """A logit_bias key: a token id written in ASCII digits (str.isdigit takes "²" too, which int() refuses)."""
    return isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12


class OpenAISampling(BaseModel):
    model_config = REQUEST
    # what the client calls max_completion_tokens, in errors (the Responses API's max_output_tokens)
    _completion_limit_name: str = PrivateAttr("max_completion_tokens")

    model: str = Field(
        max_length=MAX_NAME_CHARS, description="An adapter name (`name` or `name@N`) or the base model's served name."
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: OutputPenalty = Field(0.0, description=FREQUENCY_PENALTY)
    presence_penalty: OutputPenalty = Field(0.0, description="A logit less this once its token is in the output.")
    logit_bias: dict[str, LogitBias] | None = Field(
        None, description=f"Token id (a string) -> a bias added to its logit, at most {MAX_LOGIT_BIAS_ENTRIES} of them."
    )
    seed: Seed | None = None
    stop: StopSequence | StopList | None = None
    n: Choices = Field(
        1, description=f"Choices to generate (at most {MAX_CHOICES}); with a seed, choice i uses seed + i."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    merged_adapters: MergedAdapters | None = Field(
        None, description="Run on a weighted mix of adapters; `model` then names the base model."
    )
    response_format: ResponseFormat | None = None
    # vLLM's extensions of the OpenAI API, which its clients and benchmark tools send (ignore_eos: a fixed answer
    # length, whatever the model would say)
    top_k: int | None = Field(None, ge=-1, description="vLLM's: sample among the k most likely tokens; 0 or -1: off.")
    min_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="vLLM's: sample among the tokens of at least min_p x the top token's "
        "probability (after temperature); 0: off.",
    )
    repetition_penalty: float | None = Field(
        None, ge=0.01, le=100, description="vLLM's (transformers' rule over prompt and output); 1: off."
    )
    ignore_eos: bool = Field(False, description="vLLM's: generate past the end-of-sequence token, to max_tokens.")
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="vLLM's: no end of sequence, stop_token_ids token or stop string ends the answer before this "
        "many tokens (at most max_tokens).",
    )
    include_stop_str_in_output: bool = Field(
        False, description="vLLM's: the stop string (or stop_token_ids token's text) that ends the answer stays in it."
    )
    stop_token_ids: list[TokenId] | None = Field(
        None,
        max_length=MAX_STOP_TOKEN_IDS,
        description=f"vLLM's: tokens that end the answer as the end-of-sequence token does (at most "
        f"{MAX_STOP_TOKEN_IDS}).",
    )
    guided_json: dict | str | None = Field(None, description="vLLM's: the answer is JSON of this schema.")
    guided_regex: str | None = Field(None, description="vLLM's: the answer matches this regex.")
    guided_choice: list[Annotated[str, StringConstraints(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_GUIDED_CHOICES, description="vLLM's: the answer is one of these strings."
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's (since v0.10): one of json, regex or choice, as the guided_ fields."
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="Share cached prompt prefixes only with requests that send the same salt (as vLLM's): a "
        "cached prefix answers sooner, which would tell one user what another asked.",
    )
    prompt_logprobs: TopN | None = Field(
        None,
        description=f"vLLM's: each prompt token's logprob after the tokens before it (the first has none: null), "
        f"with its rank and the N (at most {MAX_TOP_LOGPROBS}) most likely tokens there; the prompt is then computed "
        "whole, none of it taken from the prefix cache.",
    )

    def grammar_spec(self) -> GrammarSpec | None:
        """The one constraint the body asks for: OpenAI's response_format or one of vLLM's fields."""
        specs = {
            "response_format": self.response_format.spec() if self.response_format is not None else None,
            "guided_json/guided_regex/guided_choice": guided_spec(
                self.guided_json, self.guided_regex, self.guided_choice
            ),
            "structured_outputs": self.structured_outputs.spec() if self.structured_outputs is not None else None,
        }
        asked = {name: spec for name, spec in specs.items() if spec is not None}
        if len(asked) > 1:
            raise InvalidGrammar(f"{' and '.join(asked)} each constrain the answer: send one")
        return next(iter(asked.values()), None)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, value: object) -> object:
        # OpenAI's spec lets n, stream, echo, the penalties, ... be null, meaning their default
        if isinstance(value, dict):
            defaulted = _defaulted(cls)
            return {key: item for key, item in value.items() if item is not None or key not in defaulted}
        return value

    @model_validator(mode="before")
    @classmethod
    def _vllm_unsupported(cls, value: object) -> object:
        return refuse_unsupported(value, {
            "use_beam_search": (not_off(False), "beam search is not implemented; use best_of (completions) or n"),
            "guided_grammar": (not_off(""), "grammars are JSON schemas or regexes here (guided_json, guided_regex)"),
        })  # fmt: skip

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_entries(cls, value: object) -> object:
        # before the values are checked one by one: a long map of bad values would be one error each
        if isinstance(value, dict):
            if len(value) > MAX_LOGIT_BIAS_ENTRIES:
                raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries: {len(value)} sent")
            bad = next((key for key in value if not _is_token_id(key)), None)
            if bad is not None:
                raise ValueError(
                    f'keys are token ids written as strings of at most 12 digits, e.g. "50256"; got {bad[:24]!r}'
                    + (f" ({len(bad)} characters)" if len(bad) > 24 else "")
                )
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def max_tokens_field(self) -> tuple[int | None, str]:
        """The completion limit the client sent, and the name it sent it under (for errors)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, self._completion_limit_name
        return self.max_tokens, "max_tokens"


@cache
def _defaulted(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` whose default is a value, not null."""
    return frozenset(
        name for name, field in model.model_fields.items() if field.default not in (None, PydanticUndefined)
    )


def not_off(off: object) -> Callable[[object], bool]:
    """Whether a value sent asks for the unsupported thing: anything but null or `off` itself (of its own type: 0 is
    not false, nor "" an empty list)."""
    return lambda value: value is not None and not (type(value) is type(off) and value == off)


def refuse_unsupported(value: object, refused: dict[str, tuple[Callable[[object], bool], str]]) -> object:
    """Fields of OpenAI's, vLLM's or TGI's that this server does not implement, refused where a client sends them in
    a form that changes the answer: ignored (extra="ignore"), the answer would silently not be what was asked for.
    `refused`: field -> (whether a sent value asks for it, why and what to send instead)."""
    if isinstance(value, dict):
        for name, (asks, why) in refused.items():
            if name in value and asks(value[name]):
                raise ValueError(f"{name} is not supported: {why}")
    return value


# A prompt as token ids (OpenAI's and vLLM's), run as given: no special token is added. Counted before any id is
# validated; max_seq_len bounds it after, as it bounds a text prompt's tokens
PromptIds = Annotated[
    list[TokenId], Field(min_length=1, fail_fast=True), counted_first(MAX_TOKEN_IDS, "token ids in a prompt")
]
# A batch of prompts: each of its choices is a request of its own, as n's are, so prompts x choices share n's bound
MAX_PROMPTS = MAX_CHOICES


def _batch(item: str) -> BeforeValidator:
    return counted_first(MAX_PROMPTS, f"prompts ({item})")


def _prompt_shape(value: object) -> str | None:
    """The prompt's form, read from its first element: a union tried member by member would report each member's
    errors, for each element of a long list. A batch's other elements are then held to the same form."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) else "ids"


Prompt = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Field(fail_fast=True), _batch("strings"), Tag("texts")]
    | Annotated[PromptIds, Tag("ids")]
    | Annotated[list[PromptIds], Field(fail_fast=True), _batch("lists of token ids"), Tag("batch")],
    Discriminator(
        _prompt_shape,
        custom_error_type="prompt_form",
        custom_error_message="send the prompt as a string, a list of strings, a list of token ids or a list of "
        "lists of token ids (a list of prompts holds at least one)",
    ),
]


class CompletionRequest(OpenAISampling):
    prompt: Prompt = Field(
        description=f"A string, or token ids (run as given: no special token is added); a list of strings or of "
        f"token-id lists is a batch: its prompts' choices are answered in order (choice prompt x n + i), at most "
        f"{MAX_CHOICES} choices in all (prompts x best_of, or n).",
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="At most this many new tokens; 0 (vLLM's, with echo only) generates none: the prompt is "
        "answered, scored with logprobs, as scoring scripts ask.",
    )
    logprobs: TopN | None = Field(None, description="Report each token's logprob and the N most likely tokens.")
    best_of: Choices | None = Field(
        None, description="Generate this many and answer the n of highest total logprob; not with stream."
    )
    echo: bool = Field(
        False,
        description="Each choice's text begins with the prompt's; with logprobs, so do its logprobs (the prompt's "
        "first token has none: null).",
    )

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        return refuse_unsupported(value, {
            "suffix": (not_off(""), "this server completes after the prompt, it does not insert; leave suffix out"),
        })  # fmt: skip

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.candidates > self.n:
            raise ValueError("best_of > n cannot be streamed: send stream false, or best_of equal to n")
        return self

    @model_validator(mode="after")
    def _nothing_generated_is_echoed(self) -> "CompletionRequest":
        if self.scores_only and not self.echo:
            raise ValueError(
                "max_tokens 0 generates nothing: send echo true to have the prompt back (with logprobs, scored), "
                "or max_tokens >= 1"
            )
        return self

    @property
    def scores_only(self) -> bool:
        """max_tokens 0: nothing generated, the prompt answered (scored, with logprobs)."""
        return self.max_tokens_field[0] == 0

    @property
    def candidates(self) -> int:
        return self.best_of or self.n

    @property
    def top_logprobs_asked(self) -> int:
        return self.logprobs or 0

    @property
    def prompt_logprobs_asked(self) -> int | None:
        """vLLM's rule: echo with logprobs scores the prompt with as many top tokens, unless prompt_logprobs says."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    @model_validator(mode="after")
    def _choices_within_bound(self) -> "CompletionRequest":
        texts, token_prompts = self.prompts
        prompts = len(texts) + len(token_prompts)
        if prompts * self.candidates > MAX_CHOICES:
            raise ValueError(
                f"{prompts} prompts x {self.candidates} choices each ({'best_of' if self.best_of else 'n'}) make "
                f"{prompts * self.candidates} requests; at most {MAX_CHOICES} a request: send fewer prompts at once"
            )
        return self

    @property
    def prompts(self) -> tuple[list[str], list[list[int]]]:
        """The batch's prompts in order (one prompt: a batch of one), as texts or as token ids: the other list is
        empty (a batch's prompts are of one form: Prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt], []
        if isinstance(prompt[0], str):
            return cast(list[str], prompt), []
        return [], [cast(list[int], prompt)] if isinstance(prompt[0], int) else cast(list[list[int]], prompt)


class ContentPart(BaseModel):
    """One part of a message's content. The served models read text only: other parts (images, audio) are
    refused, rather than dropped, so that no one gets an answer about an input the model never saw."""

    model_config = REQUEST

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("type") != "text":
            raise ValueError(
                f"only text content parts are supported (type 'text'), not {str(value.get('type'))[:64]!r}"
            )
        return value


def bounded_parts(messages: object) -> object:
    """`messages` as sent, refused where their content parts, or the tool calls of their history, together pass
    MAX_CONTENT_PARTS: counted before any message is validated."""
    if isinstance(messages, list):
        dicts = [m for m in messages if isinstance(m, dict)]
        for key, what, fix in (
            ("content", "content parts", "join a message's text parts into one string"),
            ("tool_calls", "tool calls", "send fewer turns of the conversation"),
        ):
            count = sum(len(m[key]) for m in dicts if isinstance(m.get(key), list))
            if count > MAX_CONTENT_PARTS:
                raise ValueError(f"the messages hold {count} {what}; at most {MAX_CONTENT_PARTS} in all: {fix}")
    return messages


# ---- the calls in a conversation's history (an assistant's tool_calls, answered by "tool" messages) -------


class HistoryFunctionCall(BaseModel):
    model_config = REQUEST

    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)
    # Text: templates render the arguments (an object where they are one), which the tokenizer then reads
    arguments: Text = Field("", description="The arguments as JSON text, as the call was answered.")


class HistoryToolCall(BaseModel):
    model_config = REQUEST

    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: HistoryFunctionCall

    def template(self) -> dict:
        """The call as chat templates take it (the arguments are read as an object in the tokenizer's process)."""
        return {"id": self.id, "type": "function", "function": self.function.model_dump()}


class ChatMessage(BaseModel):
    model_config = REQUEST

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = None
    tool_calls: Annotated[list[HistoryToolCall], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = Field(
        None, description="An assistant's calls, earlier in the conversation."
    )
    tool_call_id: str | None = Field(None, max_length=256, description="A tool message: the call it answers.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template(self) -> dict:
        """The message as chat templates take it."""
        out: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [call.template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


Messages = Annotated[
    list[ChatMessage],
    Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True),
    BeforeValidator(bounded_parts),
    counted_first(MAX_MESSAGES, "messages"),  # the last annotation's runs first: no part is counted past it
]


class ChatCompletionRequest(OpenAISampling):
    messages: Messages
    logprobs: bool | None = None
    top_logprobs: TopN | None = None
    tools: (
        Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True), counted_first(MAX_TOOLS, "tools")] | None
    ) = Field(
        None,
        description=f"Functions the answer may call (at most {MAX_TOOLS}): as tool_choice says.",
    )
    tool_choice: Annotated[ToolChoiceMode | NamedToolChoice | None, BeforeValidator(tool_choice_form)] = Field(
        None,
        description='"required": one or more calls of the tools; {"type": "function", "function": {"name": ...}}: a '
        'call of that function; "none": a text answer, the tools unused; "auto" (the default with tools): text or '
        "calls, as the model chooses, read by the server's --tool-call-parser (refused on a server without one).",
    )
    parallel_tool_calls: bool | None = Field(None, description='false: tool_choice "required" makes one call.')

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        return refuse_unsupported(value, {
            "functions": (not_off([]), 'the legacy functions are not supported; send them as tools, with tool_choice'),
        })  # fmt: skip

    @model_validator(mode="after")
    def _tools_answerable(self) -> "ChatCompletionRequest":
        check_tools(self.tools, self.tool_choice)
        return self

    @property
    def auto_tools(self) -> bool:
        """tool_choice "auto", sent or OpenAI's default where tools are sent: text or calls, as the model chooses."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @cached_property
    def tool_plan(self) -> ToolPlan | None:
        """What the tools ask for (None: no call, tool_choice "none" or no tools); InvalidGrammar where a tool's
        schema is past the grammar's bounds."""
        if not self.tools or self.tool_choice == "none":
            return None
        return tool_plan(self.tools, self.tool_choice or "auto", self.parallel_tool_calls is not False)

    def grammar_spec(self) -> GrammarSpec | None:
        """The answer's one constraint: a forced tool call's, or what OpenAISampling.grammar_spec reads."""
        other = super().grammar_spec()
        plan = self.tool_plan
        if plan is None:
            return other
        if plan.spec is None:  # "auto": the answer is free, so that it can be text or calls
            if other is not None:
                raise InvalidGrammar(
                    'tool_choice "auto" lets the model answer in text or call a tool, and response_format (or a '
                    "guided_ field, or structured_outputs) constrains the answer to its form, which leaves no way to "
                    'call: send tool_choice "none" for an answer of that form, or leave the constraint out'
                )
            return None
        if other is not None:
            raise InvalidGrammar(
                "tool_choice forces the answer to be tool calls, and response_format (or a guided_ field, or "
                "structured_outputs) constrains it too: send one"
            )
        return plan.spec

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_asked(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    @property
    def prompt_logprobs_asked(self) -> int | None:
        return self.prompt_logprobs


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens found in the KV cache, not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token (echo: the prompt's first, whose first
    token has no logprob and no top logprobs: null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: a token's logprob at a prompt position, its rank there (1: the most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: one entry per prompt token, the first null (nothing before it scores it), each other the
# token's own entry and the top N's, keyed by token id
PromptLogprobs = list[dict[str, PromptLogprob] | None]


# vLLM's stop_reason beside finish_reason "stop": the stop sequence or stop token id that ended the choice; null where
# the model's end of sequence did (or a complete grammar)
StopReason = int | str | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    stop_reason: StopReason = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def _without_null_calls(model: BaseModel, handler: SerializerFunctionWrapHandler) -> dict:
    """A message or delta without tool_calls when it has none: the shape of answers without tools is as before."""
    out = handler(model)
    if out.get("tool_calls", 0) is None:
        del out["tool_calls"]
    return out


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the fields'
        return _without_null_calls(self, handler)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    stop_reason: StopReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's: of the one prompt the choices share


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the fields'
        return _without_null_calls(self, handler)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: OpenAIFinishReason | None = None
    stop_reason: StopReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the first chunk with a token, where asked for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    parent: str | None = Field(None, description="For an adapter: the base model it runs on.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints: vLLM's shapes, and TGI's on /tokenize when the body is TGI's --------------------


class VllmTokenizeCompletion(BaseModel):
    model_config = REQUEST

    model: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Ignored: adapters share the tokenizer.")
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class VllmTokenizeChat(BaseModel):
    model_config = REQUEST

    model: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Ignored: adapters share the tokenizer.")
    messages: Messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TgiTokenize(BaseModel):
    model_config = REQUEST

    inputs: Text
    parameters: dict | None = None  # TGI accepts its generate parameters here and ignores them


_TOKENIZE_KINDS = {TgiTokenize: "tgi", VllmTokenizeChat: "chat", VllmTokenizeCompletion: "completion"}


def _tokenize_kind(value: object) -> str | None:
    # TGI sends `inputs`, vLLM `prompt` or `messages`: one route serves both protocols
    if isinstance(value, dict):
        return "tgi" if "inputs" in value else "chat" if "messages" in value else "completion"
    return _TOKENIZE_KINDS.get(type(value))  # None: the body is not an object, which has no kind


TokenizeRequest = Annotated[
    Annotated[TgiTokenize, Tag("tgi")]
    | Annotated[VllmTokenizeChat, Tag("chat")]
    | Annotated[VllmTokenizeCompletion, Tag("completion")],
    # A body that is not an object (an array, or one not read as JSON for want of its content-type) is refused at
    # the body itself, with pydantic's error for a model's input that is not an object: the error handler words
    # that one as about the whole body, as on every other route (tried as one kind, it was about a field of that kind)
    Discriminator(_tokenize_kind, custom_error_type="model_attributes_type"),
]


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TgiSimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class DetokenizeRequest(BaseModel):
    model_config = REQUEST

    model: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Ignored: adapters share the tokenizer.")
    tokens: Annotated[list[StrictInt], counted_first(MAX_TOKEN_IDS, "token ids")] = Field(
        description=f"At most max_seq_len ids of the vocabulary (and at most {MAX_TOKEN_IDS:,}).", fail_fast=True
    )


class DetokenizeResponse(BaseModel):
    prompt: str
