"""What goes into the engine (GenerationRequest) and what comes out of it (TokenEvent)."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from adapters.lora import LoraWeights
from server.engine.constraints import TokenConstraint
from server.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
Top = tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely tokens, most likely first


class PromptToken(NamedTuple):
    """A prompt token scored after the tokens before it (SamplingParams.prompt_logprobs), under the model's own
    distribution there (log_softmax of its logits): the first prompt token has nothing before it, so no logprob."""

    token_id: int
    logprob: float | None
    rank: int | None  # 1 + how many tokens are more likely there (vLLM counts ties as ahead: tokens at least as likely)
    top: Top  # the prompt_logprobs most likely tokens there


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_key: str | None = None  # e.g. "support-bot@3"; None: the base model
    lora: LoraWeights | None = None  # CPU weights of adapter_key (ideally pinned); None for the base model
    # Called once, from the engine thread, when an accepted request has left the engine (finished,
    # cancelled or failed): where the registry drops its hold on the adapter. Must be thread-safe and quick.
    on_finish: Callable[[], None] | None = None
    # structured output: the tokens this request may emit, one matcher per request (it holds the parse state)
    grammar: TokenConstraint | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Requests reuse the prompt prefixes in the KV cache (prefix_cache.py) only under one salt: the API layer sets it
    # so that clients who must not learn each other's prompts (from how soon an answer starts) share nothing
    cache_salt: str | None = None
    # whose request it is (an API key's digest, or a peer address on a server without keys): the waiting queue is
    # shared fairly between clients (waiting.py); None is one client of its own
    client: str | None = None

    @property
    def cache_scope(self) -> tuple[str | None, str | None]:
        """What a prompt's keys and values depend on besides its tokens (the adapter), and the salt."""
        return self.adapter_key, self.cache_salt


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int  # 0-based number of this completion token (of the last token for end-only events)
    token_id: int | None  # None on an end-only event (cancelled, error)
    text: str  # text this event adds (stop sequences and their tail never appear)
    logprob: float | None  # log-probability of token_id under the final sampling distribution
    prompt_tokens: int
    finish_reason: FinishReason | None = None  # set on the last event of a request only
    error: BaseException | None = None  # with finish_reason "error"
    # the request's top_logprobs most likely tokens at this position, under the same distribution as logprob
    top_logprobs: Top = ()
    cached_tokens: int = 0  # prompt tokens found in the KV cache, not computed again
    # every prompt token, scored: on the request's first token event, where it asked for prompt_logprobs
    prompt_logprobs: tuple[PromptToken, ...] | None = None
    # vLLM's stop_reason, on a last event ended by "stop": the stop sequence or stop token id that ended it (None:
    # EOS, or a complete grammar)
    stop_reason: int | str | None = None
