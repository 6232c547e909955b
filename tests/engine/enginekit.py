"""Helpers of the engine tests: PEFT-saved adapters, the PEFT oracle, a synchronous engine driver, NF4 layers."""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from bitsandbytes.functional import dequantize_blockwise, get_4bit_type
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LogitsProcessor, LogitsProcessorList

from adapters.lora import LoraWeights, lora_weights_from_state
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, TokenEvent
from server.engine.sampling import Seen, draw, final_logits

# Four adapters with different ranks, target sets and scaling rules (rsLoRA, rank/alpha patterns).
ADAPTER_CONFIGS = {
    "qv-r2": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "all-r8-rslora": LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "mlp-pattern": LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
        alpha_pattern={"down_proj": 3},
    ),
    "ko-r16": LoraConfig(r=16, lora_alpha=16, target_modules=["k_proj", "o_proj"]),
}


@dataclass
class SavedAdapter:
    key: str
    path: Path
    weights: LoraWeights


def final_logprobs(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: list[Seen | None],
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each row's log-distribution to draw from [B, V] fp32, as the engine draws (log_softmax of final_logits)."""
    return final_logits(logits, params, seen, allowed).float().log_softmax(-1)


def save_adapter(base: torch.nn.Module, config: LoraConfig, path: Path, seed: int) -> SavedAdapter:
    """Save a PEFT adapter with random non-zero B (so it changes the output) and parse it back."""
    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    config.init_lora_weights = False
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    state = load_file(path / "adapter_model.safetensors")
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    return SavedAdapter(f"{path.name}@1", path, lora_weights_from_state(state, adapter_config))


class OutputPenalty(LogitsProcessor):
    """OpenAI's frequency and presence penalties as a transformers logits processor, written from OpenAI's
    definition: each token's logit less frequency x its count among the generated tokens, less presence once it is
    among them."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for token in set(input_ids[0, self.prompt_len :].tolist()):
            count = int((input_ids[0, self.prompt_len :] == token).sum())
            scores[0, token] -= self.frequency * count + self.presence
        return scores


def greedy_log_softmax(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    output_penalty: tuple[float, float] = (0.0, 0.0),
    logit_bias: dict[int, float] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax [T, V] of every step (after the penalties; output_penalty: OpenAI's
    (frequency, presence); logit_bias: transformers' sequence_bias of one-token sequences), from `model.generate`
    (transformers/PEFT alone)."""
    processors = LogitsProcessorList([OutputPenalty(len(prompt), *output_penalty)] if any(output_penalty) else [])
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            logits_processor=processors,
            sequence_bias={(token,): bias for token, bias in logit_bias.items()} if logit_bias else None,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack([s[0].float() for s in out.scores]).log_softmax(-1)


def token_logprobs(tokens: list[int], log_softmax: torch.Tensor) -> list[float]:
    return log_softmax[torch.arange(len(tokens)), tokens].tolist()


def reference_generate(
    base: torch.nn.Module,
    adapter: SavedAdapter | None,
    prompt: list[int],
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    output_penalty: tuple[float, float] = (0.0, 0.0),
    logit_bias: dict[int, float] | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from transformers/PEFT alone (the oracle)."""
    tokens, log_softmax = greedy_log_softmax(
        reference_model(base, adapter), prompt, max_new_tokens, repetition_penalty, output_penalty, logit_bias
    )
    return tokens, token_logprobs(tokens, log_softmax)


def reference_model(base: torch.nn.Module, adapter: SavedAdapter | None) -> torch.nn.Module:
    """A copy of `base`, with `adapter` loaded by PEFT where given."""
    model = copy.deepcopy(base)
    return PeftModel.from_pretrained(model, adapter.path) if adapter is not None else model


def answer_logits(base: torch.nn.Module, adapter: SavedAdapter | None, prompt: list[int], answer: list[int]):
    """The model's logits [len(answer), V] fp32 (PEFT for an adapter) that each token of `answer` was drawn from,
    after `prompt` and the answer's tokens before it: one forward over both."""
    with torch.no_grad():
        logits = reference_model(base, adapter)(torch.tensor([prompt + answer])).logits[0].float()
    return logits[len(prompt) - 1 : -1]


def min_new_tokens_reference(
    base: torch.nn.Module,
    adapter: SavedAdapter | None,
    prompt: list[int],
    max_new_tokens: int,
    stop: int,
    min_tokens: int,
    **generate,
) -> list[int]:
    """Greedy tokens from transformers' generate ending at `stop` (biased +100 there), which its min_new_tokens
    masks for the first min_tokens tokens: the reference of vLLM's min_tokens (PEFT for an adapter)."""
    with torch.no_grad():
        out = reference_model(base, adapter).generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            min_new_tokens=min_tokens,
            eos_token_id=stop,
            sequence_bias={(stop,): 100.0},
            pad_token_id=0,
            **generate,
        )
    return out[0, len(prompt) :].tolist()


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: list[Seen | None],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] and their logprobs [B] as the engine's sampler picks them from logits [B, V]."""
    logprobs = final_logprobs(logits, params, seen)
    tokens = draw(logprobs, params, generators)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def make_engine(base: torch.nn.Module, tokenizer, **config) -> Engine:
    """An engine over a private copy of `base` (the engine wraps its model's layers in place)."""
    defaults = dict(max_batch_size=8, max_active_adapters=4, max_lora_rank=16, max_seq_len=64, max_prefill_tokens=8)
    defaults.update(config)
    return Engine(copy.deepcopy(base), tokenizer, EngineConfig(**defaults))


class Collector:
    """An event sink that records events per request id."""

    def __init__(self) -> None:
        self.events: dict[str, list[TokenEvent]] = {}

    def __call__(self, event: TokenEvent) -> None:
        self.events.setdefault(event.request_id, []).append(event)

    def tokens(self, request_id: str) -> list[int]:
        return [e.token_id for e in self.events[request_id] if e.token_id is not None]

    def logprobs(self, request_id: str) -> list[float]:
        return [e.logprob for e in self.events[request_id] if e.logprob is not None]

    def finish(self, request_id: str) -> str | None:
        return self.events[request_id][-1].finish_reason


def run_to_end(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.step():
            return
    raise AssertionError("the engine did not drain")


def greedy(max_new_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kwargs)


def request(
    prompt: list[int], params: SamplingParams, adapter: SavedAdapter | None = None, request_id: str | None = None
) -> GenerationRequest:
    extra = {"request_id": request_id} if request_id else {}
    return GenerationRequest(
        prompt, params, adapter.key if adapter else None, adapter.weights if adapter else None, **extra
    )


def nf4_layer(n: int, k: int, nested: bool, bias: bool, device: str) -> tuple[Linear4bit, torch.Tensor]:
    """An NF4 layer and its weight [n, k] as the kernels compute it: the codes through bf16-rounded NF4 values
    (the kernels' precision), times each block's absmax."""
    layer = Linear4bit(k, n, bias=bias, compress_statistics=nested, quant_type="nf4", compute_dtype=torch.float32)
    layer = layer.to(device)  # quantizes on CUDA; on the CPU the first forward does
    layer(torch.zeros(1, k, device=device))
    state = layer.weight.quant_state
    packed = layer.weight.view(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], -1).view(n, k)
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    values = get_4bit_type("nf4", device=device).to(torch.bfloat16).float()[codes]
    return layer, (values.view(-1, 64) * absmax.float()[:, None]).view(n, k)
