"""Sampling as pure functions on float logits [B, V], batched over rows with per-row parameters."""

import functools
import math
from dataclasses import dataclass, field

import torch

# OpenAI's bound on top_logprobs; every asked-for column costs a host copy per token
MAX_TOP_LOGPROBS = 20
MAX_OPENAI_PENALTY = 2.0  # OpenAI's range for frequency_penalty and presence_penalty
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # vLLM's: keep the tokens of at least min_p x the top token's probability; 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off; HF's rule over prompt + generated ids
    # OpenAI's (and vLLM's) over the generated ids only: each token's logit less frequency x its count so far and
    # presence once it has appeared; 0.0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop sequences, matched on decoded text
    seed: int | None = None  # per-request generator: same output whatever else is in the batch
    ignore_eos: bool = False
    # tokens that end the answer as the end-of-sequence token does (their text left out unless
    # include_stop_str_in_output), ignore_eos or not: vLLM's
    stop_token_ids: frozenset[int] = frozenset()
    # vLLM's: no stop token (EOS, stop_token_ids) may be drawn, and no stop sequence ends the text, before this many
    # tokens are generated
    min_tokens: int = 0
    # vLLM's: the stop string (or a stop token's text) that ends the answer stays at its end
    include_stop_str_in_output: bool = False
    top_logprobs: int = 0  # the N most likely tokens (and their logprobs) reported with each token; 0: off
    # vLLM's prompt_logprobs: each prompt token's logprob after the tokens before it (the first has none) and the N
    # most likely tokens there, under the model's own distribution (log_softmax of its logits, before any sampling
    # parameter); None: off
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError("min_tokens must lie in 0..max_new_tokens")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_logprobs must lie in 0..{MAX_TOP_LOGPROBS}")
        floats = (self.temperature, self.top_p, self.min_p, self.repetition_penalty, self.frequency_penalty,
                  self.presence_penalty)  # fmt: skip
        if not all(math.isfinite(x) for x in floats):  # NaN passes every comparison below
            raise ValueError("temperature, top_p, min_p and the penalties must be finite")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must lie in 0..1")
        if max(abs(self.frequency_penalty), abs(self.presence_penalty)) > MAX_OPENAI_PENALTY:
            raise ValueError(f"frequency_penalty and presence_penalty must lie in +-{MAX_OPENAI_PENALTY:g}")
        if not all(math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS for _, bias in self.logit_bias):
            raise ValueError(f"logit_bias values must lie in +-{MAX_LOGIT_BIAS:g}")

    @property
    def penalized(self) -> bool:
        """Whether drawing the next token reads the tokens seen so far (a repetition or an output penalty)."""
        return self.repetition_penalty != 1.0 or self.counts_output

    @property
    def counts_output(self) -> bool:
        """Whether drawing the next token reads how often each token was generated so far."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

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


def output_penalty(logits: torch.Tensor, output: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's frequency and presence penalties: logits less frequency x each token's count in `output` and less
    presence for each token in it. logits: [V]; output: [N] the ids generated so far."""
    counts = torch.bincount(output, minlength=logits.shape[-1]).to(logits.dtype)  # [V]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (and ties with the k-th); logits: [B, V], k: [B] in 1..V."""
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, k[:, None] - 1)  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of tokens whose mass reaches p (the top token always stays); p 1: off."""
    # logits: [B, V]; p: [B]
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass ahead of each token
    drop_sorted = (before >= p[:, None]) & (p[:, None] < 1.0)
    # the top token's mass ahead is 0, which a p that rounded to 0 as float32 (a client's 1e-46) would reach
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep each row's tokens whose probability is at least p times its top token's (the top token always stays);
    p 0: off. Compared as logits, log p_i - log p_max = l_i - l_max: no softmax over the vocabulary needed."""
    # logits: [B, V]; p: [B]
    floor = logits.amax(-1, keepdim=True) + p[:, None].log()  # log 0 = -inf: every token stays
    return logits.masked_fill(logits < floor, float("-inf"))


def device_tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` as a tensor on `device`, without waiting for it: a copy from pageable host memory waits until the
    device's queue (the step's forward) has drained, one from pinned memory does not, so the host goes on."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


# A row's tokens so far, for its penalties: ([N] ids, the prompt's then the output's; how many are the prompt's)
Seen = tuple[torch.Tensor, int]


def final_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: list[Seen | None],
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
    banned: list[frozenset[int]] | None = None,
) -> torch.Tensor:
    """Each row's logits to draw from [B, V]: the grammar mask (constrained rows only), the penalties, the logit
    bias and the banned tokens, then (sampled rows) temperature, min-p, top-k, top-p; in fp32 where any of them
    applies, else `logits` as they are (their dtype's values are exact in fp32: nothing to round)."""
    # logits: [B, V]; seen[i]: row i's tokens so far (read where a penalty is on); allowed: (rows [m], mask [m, V]
    # bool) of the constrained rows; banned[i]: tokens row i may not draw now (its stop tokens, short of min_tokens)
    banned = banned or [frozenset()] * len(params)
    adjusted = [i for i, p in enumerate(params) if p.logit_bias or (seen[i] is not None and p.penalized) or banned[i]]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if allowed is None and not adjusted and not sampled:
        return logits
    logits = logits.float()
    if allowed is not None:
        logits = mask_logits(logits, *allowed)
    if adjusted:  # out of place: fp32 logits are the forward's own tensor (an inference tensor, a graph's output)
        rows = device_tensor(adjusted, logits.device)
        stacked = torch.stack([_adjusted(logits[i], params[i], seen[i], banned[i]) for i in adjusted])
        logits = logits.index_copy(0, rows, stacked)
    if sampled:
        logits = _filtered(logits, params, sampled)
    return logits


def _adjusted(logits: torch.Tensor, params: SamplingParams, seen: Seen | None, banned: frozenset[int]) -> torch.Tensor:
    """One row's logits [V] after its penalties and its logit_bias, which OpenAI adds to the logits the model made:
    after the penalties, before temperature and the filters; then its banned tokens at -inf, which no bias or
    penalty brings back."""
    if seen is not None:
        ids, prompt_len = seen
        logits = repetition_penalty(logits, ids, params.repetition_penalty)
        if params.counts_output:
            logits = output_penalty(logits, ids[prompt_len:], params.frequency_penalty, params.presence_penalty)
    if params.logit_bias:
        logits = logits.index_add(0, *_bias_tensors(params.logit_bias, logits.device))
    if banned:
        logits = logits.index_fill(0, _id_tensor(banned, logits.device), float("-inf"))
    return logits


@functools.lru_cache(maxsize=256)
def _bias_tensors(bias: tuple[tuple[int, float], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A logit_bias's ids [n] and values [n] fp32 on `device`, copied there once per distinct bias, not once per
    token: a copy from the host waits for the step's forward, which the host otherwise overlaps."""
    ids, values = zip(*bias, strict=True)
    return device_tensor(list(ids), device), device_tensor(list(values), device, torch.float32)


@functools.lru_cache(maxsize=256)
def _id_tensor(ids: frozenset[int], device: torch.device) -> torch.Tensor:
    """A set of token ids [n] on `device`, copied there once per distinct set (a request bans the same set at each
    of its first min_tokens draws), as _bias_tensors."""
    return device_tensor(sorted(ids), device)


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Disallowed tokens of `rows` set to -inf (never multiplied: 0 x inf is NaN); other rows untouched."""
    # logits: [B, V]; rows: [m]; allowed: [m, V] bool
    return logits.index_copy(0, rows, logits[rows].masked_fill(~allowed, float("-inf")))


def draw(
    logprobs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Tokens [B]: argmax for greedy rows; sampled rows draw by an exponential race over their own noise
    (argmax of p / E, E ~ Exp(1)): it picks token i with probability p_i, and a seeded row's noise comes from
    its own generator alone, so its draws do not depend on the rest of the batch."""
    # logprobs: [B, V]
    tokens = logprobs.argmax(-1)  # [B]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    noise = torch.empty(len(sampled), logprobs.shape[-1], device=logprobs.device)  # [n, V]
    unseeded = [j for j, i in enumerate(sampled) if generators[i] is None]
    if unseeded:
        fresh = torch.rand(len(unseeded), logprobs.shape[-1], device=logprobs.device)  # [u, V]
        noise.index_copy_(0, device_tensor(unseeded, logprobs.device), fresh)
    for j, i in enumerate(sampled):
        if generators[i] is not None:
            noise[j].uniform_(generator=generators[i])
    index = device_tensor(sampled, logprobs.device)
    race = logprobs[index] - (-noise.clamp_min(1e-30).log()).log()  # log p - log E
    return tokens.index_copy(0, index, race.argmax(-1))


def top_logprobs(logprobs: torch.Tensor, params: list[SamplingParams]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(rows that ask, their top ids [m, N], top logprobs [m, N]) with N the largest count asked: one topk over
    the asking rows only, so the others pay nothing; each row keeps its own first top_logprobs columns."""
    # logprobs: [B, V]
    rows = [i for i, p in enumerate(params) if p.top_logprobs]
    if not rows:
        empty = logprobs.new_empty(0, 0)
        return rows, empty.long(), empty
    n = min(max(params[i].top_logprobs for i in rows), logprobs.shape[-1])
    values, ids = logprobs[device_tensor(rows, logprobs.device)].topk(n, dim=-1)  # [m, N] each
    return rows, ids, values


def _filtered(logits: torch.Tensor, params: list[SamplingParams], sampled: list[int]) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p on the sampled rows (greedy rows pass through unchanged): min-p
    before top-k and top-p as vLLM's sampler runs it (top-p then sums the mass min-p left)."""
    # logits: [B, V]
    index = device_tensor(sampled, logits.device)
    rows = logits[index]  # [n, V]
    temperature = device_tensor([params[i].temperature for i in sampled], logits.device)
    rows = rows / temperature[:, None]
    if any(params[i].min_p for i in sampled):
        rows = min_p_filter(rows, device_tensor([params[i].min_p for i in sampled], logits.device))
    if any(params[i].top_k for i in sampled):
        vocab = logits.shape[-1]
        k = [min(params[i].top_k, vocab) or vocab for i in sampled]  # a k beyond the vocabulary keeps all of it
        rows = top_k_filter(rows, device_tensor(k, logits.device))
    if any(params[i].top_p < 1.0 for i in sampled):
        rows = top_p_filter(rows, device_tensor([params[i].top_p for i in sampled], logits.device))
    return logits.index_copy(0, index, rows)
