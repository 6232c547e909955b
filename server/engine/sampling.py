"""Sampling as pure functions on logits (gpt-fast style). Each takes and returns float logits [V] or [B, V]."""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; HF's rule over prompt + generated ids
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop sequences, matched on decoded text
    seed: int | None = None  # per-request generator: same output whatever else is in the batch
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits: [V]; seen: [N] token ids already in the prompt or output
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(0, seen, picked)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (the top token always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def final_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """The distribution a token is drawn from: penalty, temperature, top-k, top-p, in HF's order."""
    # logits: [V] float32
    logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def sample(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token id, its logprob under the final distribution) as 0-d tensors; logits: [V]."""
    logits = final_logits(logits.float(), params, seen)
    logprobs = logits.log_softmax(-1)
    if params.greedy:
        token = logits.argmax(-1)
    else:
        token = torch.multinomial(logprobs.exp(), 1, generator=generator)[0]
    return token, logprobs[token]


def greedy_batch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and logprobs for many rows at once (rows without penalty or sampling)."""
    # logits: [B, V]
    logprobs = logits.float().log_softmax(-1)
    tokens = logprobs.argmax(-1)  # [B]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
