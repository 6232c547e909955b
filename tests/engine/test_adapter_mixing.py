"""A weighted mix of adapters served as one derived LoRA equals PEFT's add_weighted_adapter "cat" (the exact
weighted sum of the deltas), in a batch beside its components and the base model."""

import copy

import pytest
from enginekit import (
    Collector,
    greedy,
    greedy_log_softmax,
    make_engine,
    reference_generate,
    request,
    run_to_end,
    token_logprobs,
)
from peft import PeftModel

from server.engine import GenerationRequest
from server.mixing import mix_key, mix_lora

NEW_TOKENS = 8
WEIGHTS = (0.7, -0.4)


def peft_mix_generate(base, adapters, weights, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[0].path, adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter.path, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], list(weights), "mix", combination_type="cat")
    model.set_adapter("mix")
    tokens, log_softmax = greedy_log_softmax(model, prompt, NEW_TOKENS)
    return tokens, token_logprobs(tokens, log_softmax)


def test_a_mix_equals_peft_weighted_adapter_cat(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    parts = [adapters[0], adapters[1]]  # q/v rank 2, and every projection rank 8 with rsLoRA: they overlap on q/v
    mixed = mix_lora([(a.weights, w) for a, w in zip(parts, WEIGHTS, strict=True)])
    assert mixed.rank == 10
    key = mix_key([a.key for a in parts], WEIGHTS)
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("mix these adapters")["input_ids"]
    engine.submit(GenerationRequest(prompt, greedy(NEW_TOKENS), key, mixed, request_id="mix"), sink)
    for i, adapter in enumerate([*parts, None]):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    run_to_end(engine)
    tokens, logprobs = peft_mix_generate(base, parts, WEIGHTS, prompt)
    assert sink.tokens("mix") == tokens
    assert sink.logprobs("mix") == pytest.approx(logprobs, abs=1e-4)
    alone = [reference_generate(base, adapter, prompt, NEW_TOKENS)[0] for adapter in [*parts, None]]
    assert [sink.tokens(f"r{i}") for i in range(3)] == alone  # the components beside it are unchanged
    assert tokens not in alone


def test_mix_keys_are_deterministic() -> None:
    assert mix_key(["a@1", "b@2"], (0.5, 0.5)) == "mix:a@1*0.5+b@2*0.5"
    assert mix_key(["a@1", "b@2"], (0.5, 0.5)) != mix_key(["b@2", "a@1"], (0.5, 0.5))
