"""Sampling functions and incremental text with stop sequences."""

import torch

from server.engine.sampling import SamplingParams, greedy_batch, repetition_penalty, sample, top_k_filter, top_p_filter
from server.engine.text import TextStream


def test_top_k_keeps_the_k_largest() -> None:
    out = top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
    assert torch.isinf(out).tolist() == [True, False, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [True, False, False, False]


def test_repetition_penalty_follows_hf() -> None:
    out = repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs = greedy_batch(logits)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, logits.log_softmax(-1).max(-1).values)
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [
        int(sample(logits[0], params, torch.tensor([]).long(), torch.Generator().manual_seed(3))[0]) for _ in range(2)
    ]
    assert draws[0] == draws[1]


def test_text_stream_holds_back_and_cuts_stop_sequences(tokenizer) -> None:
    stream = TextStream(tokenizer, ("END",))
    pieces = [stream.push(t) for t in tokenizer("abcEN")["input_ids"]]
    assert "".join(p for p, _ in pieces) == "abc"  # "EN" may start "END": held back
    delta, stopped = stream.push(tokenizer("D")["input_ids"][0])
    assert stopped and delta == ""
    plain = TextStream(tokenizer, ())
    assert "".join(plain.push(t)[0] for t in tokenizer("héllo")["input_ids"]) == "héllo"  # multi-byte waits
