"""What goes into the engine (GenerationRequest) and what comes out of it (TokenEvent)."""

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

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


class StepScores:
    """A step's scored prompt positions (prompt_logprobs), launched on the device: each position's logprob of the
    prompt token after it and that token's rank, then every position's top ids and logprobs, flat in one float64
    host tensor (it holds token ids exactly), on its way from the device until `ready`."""

    def __init__(self, flat: torch.Tensor, ready: torch.cuda.Event | None, count: int, top_n: int) -> None:
        self.flat, self.ready, self.count, self.top_n = flat, ready, count, top_n

    def wait(self) -> None:
        """Until the copy has arrived (on the thread that launched it: no other touches the device)."""
        if self.ready is not None:
            self.ready.synchronize()

    def read(self, first: int, count: int, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions first .. first + count, once arrived: their logprobs [count], ranks [count], and their `keep`
        most likely tokens' ids [count, keep] and logprobs [count, keep] (views of the flat tensor)."""
        e, n, rows = self.count, self.top_n, slice(first, first + count)
        top = self.flat[2 * e :].view(2, e, n)  # [2, E, N]: the ids, then their logprobs
        return self.flat[:e][rows], self.flat[e : 2 * e][rows], top[0, rows, :keep], top[1, rows, :keep]


class PromptScores:
    """A request's prompt scored (SamplingParams.prompt_logprobs), as its steps' copies left it on the host: the
    engine thread hands the tensors over, and each prompt token's PromptToken is made where the event is consumed
    (tens of objects a token: ~10 ms for 2,047 tokens with 20 alternatives, which every other request's next token
    waited for on the engine thread). Built once, by the first thread to ask."""

    def __init__(self, prompt: list[int], keep: int, chunks: list[tuple[StepScores, int, int]]) -> None:
        """`keep`: the alternatives asked for; `chunks`: (a step's scores, their copy arrived; the chunk's first
        position among them; its positions), in prompt order, every prompt position but the last."""
        self.prompt, self.keep, self._chunks = prompt, keep, chunks
        self._lock = threading.Lock()
        self._tokens: tuple[PromptToken, ...] | None = None

    def tops(self) -> Iterator[torch.Tensor]:
        """The ids of each chunk's positions' `keep` most likely tokens, [count, keep] int64: at most SCORED_TOKENS x
        20 ids, under torch's grain for parallel work (it would wait for the intra-op threads, the engine's)."""
        for scores, first, count in self._chunks:
            yield scores.read(first, count, self.keep)[2].long()

    def tokens(self) -> tuple[PromptToken, ...]:
        """Every prompt token, in prompt order, scored by the tokens before it (the first by none)."""
        with self._lock:
            if self._tokens is None:
                self._tokens = self._build()
            return self._tokens

    def _build(self) -> tuple[PromptToken, ...]:
        prompt = self.prompt
        tokens = [PromptToken(prompt[0], None, None, ())]  # nothing before the first token to score it
        for scores, first, count in self._chunks:
            logprobs, ranks, ids, values = (part.tolist() for part in scores.read(first, count, self.keep))
            for logprob, rank, top_ids, top_values in zip(logprobs, ranks, ids, values, strict=True):
                top = tuple((int(t), v) for t, v in zip(top_ids, top_values, strict=True))
                tokens.append(PromptToken(prompt[len(tokens)], logprob, int(rank), top))
        return tuple(tokens)


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
    prompt_logprobs: PromptScores | None = None
    # vLLM's stop_reason, on a last event ended by "stop": the stop sequence or stop token id that ended it (None:
    # EOS, or a complete grammar)
    stop_reason: int | str | None = None
