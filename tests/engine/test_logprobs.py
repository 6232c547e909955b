"""Log probabilities from the batched sampler equal the reference model's log-softmax (PEFT for adapters), and
the top-N tokens equal torch.topk of it, for rows asking different N beside rows asking none."""

import copy

import pytest
import torch
from enginekit import (
    Collector,
    SavedAdapter,
    final_logprobs,
    greedy,
    greedy_log_softmax,
    make_engine,
    request,
    run_to_end,
)
from peft import PeftModel

from server.engine.sampling import SamplingParams, top_logprobs

NEW_TOKENS = 6


def reference_log_softmax(
    base: torch.nn.Module, adapter: SavedAdapter | None, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax [T, V] of every step, from transformers/PEFT alone."""
    model = copy.deepcopy(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter.path)
    return greedy_log_softmax(model, prompt, max_new_tokens)


def test_logprobs_and_top_n_equal_the_reference(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    plan = [(adapters[0], 5), (None, 20), (adapters[1], 0), (None, 1), (adapters[3], 3)]
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("logprobs please")["input_ids"]
    for i, (adapter, n) in enumerate(plan):
        engine.submit(request(prompt, greedy(NEW_TOKENS, top_logprobs=n), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, (adapter, n) in enumerate(plan):
        tokens, reference = reference_log_softmax(base, adapter, prompt, NEW_TOKENS)
        events = [e for e in sink.events[f"r{i}"] if e.token_id is not None]
        assert [e.token_id for e in events] == tokens
        picked = reference.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert [e.logprob for e in events] == pytest.approx(picked.tolist(), abs=1e-4)
        for event, step in zip(events, reference, strict=True):
            assert len(event.top_logprobs) == n
            if n:
                values, ids = step.topk(n)
                assert [t for t, _ in event.top_logprobs] == ids.tolist()
                assert [v for _, v in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
                assert event.top_logprobs[0] == (event.token_id, pytest.approx(event.logprob))  # greedy: the top one


def test_top_logprobs_run_only_on_rows_that_ask() -> None:
    logits = torch.randn(4, 10)
    params = [SamplingParams(), SamplingParams(top_logprobs=3), SamplingParams(), SamplingParams(top_logprobs=1)]
    rows, ids, values = top_logprobs(final_logprobs(logits, params, [None] * 4), params)
    assert rows == [1, 3] and ids.shape == values.shape == (2, 3)
    assert torch.equal(ids, logits[[1, 3]].topk(3).indices)
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)
