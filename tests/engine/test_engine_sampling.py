"""Sampling functions and incremental text with stop sequences."""

import random

import pytest
import torch
from enginekit import final_logprobs, sample_batch

from loraplex.synthetic import BYTE_VOCAB, byte_tokenizer
from server.engine.sampling import SamplingParams, repetition_penalty, top_k_filter, top_p_filter
from server.engine.text import TextStream, window_decoder


def test_top_k_keeps_the_k_largest() -> None:
    out = top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]]), torch.tensor([2, 4]))
    assert torch.isinf(out).tolist() == [[True, False, False, True], [False] * 4]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(3, 4)
    kept = torch.isfinite(top_p_filter(logits, torch.tensor([0.7, 0.1, 1.0]))).tolist()
    assert kept == [[True, True, False, False], [True, False, False, False], [True] * 4]
    # a p that rounds to 0 (a client's 1e-46 as float32) keeps the top token, not none
    assert torch.isfinite(top_p_filter(logits[:1], torch.tensor([1e-46]))).tolist() == [[True, False, False, False]]


def test_repetition_penalty_follows_hf() -> None:
    out = repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    greedy = [SamplingParams()] * 2
    tokens, logprobs = sample_batch(logits, greedy, [None, None], [None, None])
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, logits.log_softmax(-1).max(-1).values)
    params = SamplingParams(temperature=1.0, seed=3)
    flat = torch.zeros(1, 64)
    draws = [sample_batch(flat, [params], [None], [torch.Generator().manual_seed(3)])[0].item() for _ in range(2)]
    assert draws[0] == draws[1]
    # beside other rows (greedy or drawing from the global generator), a seeded row draws the same token
    crowded = sample_batch(
        torch.zeros(3, 64),
        [SamplingParams(temperature=1.0), params, SamplingParams()],
        [None] * 3,
        [None, torch.Generator().manual_seed(3), None],
    )[0]
    assert crowded[1].item() == draws[0] and crowded[2].item() == 0


def test_exponential_race_draws_by_probability() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(4000, 4)
    generator = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens, logprobs = sample_batch(logits, params, [None] * 4000, [generator] * 4000)
    frequency = torch.bincount(tokens, minlength=4) / 4000
    assert torch.allclose(frequency, probs, atol=0.03)
    assert torch.allclose(logprobs, probs.log()[tokens])


def test_min_p_keeps_the_tokens_of_at_least_min_p_times_the_top_probability() -> None:
    """vLLM's min_p, after temperature: each row's distribution is its softmax over the tokens of probability at
    least min_p x the top one's, renormalized, as computed here from the definition; rows without min_p (sampled
    or greedy) keep their whole distribution."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    rows = [(0.7, 0.1), (1.0, 0.0), (1.3, 0.05), (1.0, 1.0), (0.0, 0.0)]  # (temperature, min_p)
    params = [SamplingParams(temperature=t, min_p=p) for t, p in rows]
    out = final_logprobs(logits, params, [None] * len(rows))
    for i, (temperature, min_p) in enumerate(rows):
        probs = (logits[i] / (temperature or 1.0)).softmax(-1)
        kept = probs >= min_p * probs.max()
        assert (out[i].isfinite() == kept).all(), f"row {i}"
        assert torch.allclose(out[i].exp(), probs * kept / (probs * kept).sum(), atol=1e-6), f"row {i}"
    assert out[3].isfinite().sum() == 1 and 1 < out[0].isfinite().sum() < 300  # min_p 1: the top token alone


def test_min_p_draws_by_the_renormalized_probabilities() -> None:
    """Seeded draws under min_p 0.25 from p = (0.5, 0.3, 0.15, 0.05): never the token below 0.25 x 0.5, the
    others at p / 0.95, beside greedy rows that still take the argmax."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    generator = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, min_p=0.25), SamplingParams()] * 2000
    tokens, logprobs = sample_batch(probs.log().expand(4000, 4), params, [None] * 4000, [generator, None] * 2000)
    assert (tokens[1::2] == 0).all()
    frequency = torch.bincount(tokens[::2], minlength=4) / 2000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert frequency[3] == 0 and torch.allclose(frequency, expected, atol=0.03)
    assert torch.allclose(logprobs[::2], expected.log()[tokens[::2]])


def test_text_stream_holds_back_and_cuts_stop_sequences(tokenizer) -> None:
    stream = TextStream(tokenizer, ("END",))
    pieces = [stream.push(t) for t in tokenizer("abcEN")["input_ids"]]
    assert "".join(p for p, _ in pieces) == "abc"  # "EN" may start "END": held back
    delta, stopped = stream.push(tokenizer("D")["input_ids"][0])
    assert stopped == "END" and delta == ""
    plain = TextStream(tokenizer, ())
    assert "".join(plain.push(t)[0] for t in tokenizer("héllo")["input_ids"]) == "héllo"  # multi-byte waits


def stream_until_stop(
    tokenizer, text: str | list[int], stop: tuple[str, ...], min_tokens: int = 0, include_stop: bool = False
) -> tuple[list[str], bool]:
    """The deltas a TextStream lets out of `text`'s tokens (or of these token ids) fed one by one (the flushed tail
    last, where no stop sequence ended it), and whether one did."""
    stream, deltas = TextStream(tokenizer, stop, min_tokens, include_stop), []
    for token in tokenizer(text)["input_ids"] if isinstance(text, str) else text:
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped is not None:
            assert stopped in stop
            return deltas, True
    return [*deltas, stream.flush()], False


@pytest.mark.parametrize(
    ("stop", "min_tokens", "expected"),
    [
        ("b", 0, ("a", True)),
        ("b", 2, ("abca", True)),  # the first "b" ends within the first two tokens' text: the next one stops it
        ("bc", 3, ("abca", True)),  # ends with the third token: the second "bc" stops it
        ("ca", 3, ("ab", True)),  # begins in the first three tokens' text, ends past it: it counts, as in vLLM
        ("ca", 4, ("abcabc", False)),  # ends with the fourth token, and never again
        ("abcabc", 5, ("", True)),
        ("abcabc", 6, ("abcabc", False)),
    ],
)
def test_a_stop_sequence_counts_only_where_it_ends_past_the_min_tokens(tokenizer, stop, min_tokens, expected) -> None:
    """vLLM's min_tokens: a stop sequence ends the answer only where it ends in text that the tokens after the first
    min_tokens added (a byte tokenizer: a character a token)."""
    deltas, stopped = stream_until_stop(tokenizer, "abcabc", (stop,), min_tokens)
    assert ("".join(deltas), stopped) == expected


def test_include_stop_keeps_the_stop_sequence_and_holds_no_text_back(tokenizer) -> None:
    """vLLM's include_stop_str_in_output: the text ends with the stop sequence that ended it, and every character
    goes out with its token (none can be taken back), also where the stop straddles tokens or min_tokens passes
    over an earlier one."""
    assert stream_until_stop(tokenizer, "abcENDxy", ("END", "x")) == (["", "", "a", "b", "c", ""], True)  # held back
    assert stream_until_stop(tokenizer, "abcENDxy", ("END", "x"), include_stop=True) == (list("abcEND"), True)
    assert stream_until_stop(tokenizer, "abcENDxy", ("cE",), include_stop=True) == (list("abcE"), True)
    assert stream_until_stop(tokenizer, "abcabc", ("b",), 2, include_stop=True) == (list("abcab"), True)
    assert stream_until_stop(tokenizer, "abc", ("x",), include_stop=True) == ([*"abc", ""], False)


@pytest.mark.parametrize(("min_tokens", "include_stop"), [(0, False), (20_000, False), (0, True)])
def test_a_long_answer_keeps_a_bounded_tail_of_its_text(tokenizer, min_tokens: int, include_stop: bool) -> None:
    """With stop sequences, each token appended its text to all the text so far, a copy of it: quadratic in the
    answer's length, on the engine thread. Only what a later search or delta reads is kept: at most the longest
    stop's length and the new text, however long the answer."""
    stop = ("never said", "x")
    ids = tokenizer("abc é€😀 " * 2000)["input_ids"]
    stream, text, kept = TextStream(tokenizer, stop, min_tokens, include_stop), "", 0
    for token in ids:
        delta, stopped = stream.push(token)
        assert not stopped
        text += delta
        kept = max(kept, len(stream._text))
    assert text + stream.flush() == tokenizer.decode(ids)
    assert kept <= len(stop[0]) + 1


def reference_stream(
    pieces: list[str], stop: tuple[str, ...], min_tokens: int, include_stop: bool
) -> tuple[list[str], bool]:
    """What stream_until_stop gives for tokens whose texts are `pieces`, by the rules stated over the whole text
    T(k) of the first k tokens: an occurrence of a stop sequence counts where it ends past T(min_tokens); the
    answer ends at the first token whose T(k) holds one that counts, before the one that begins first (the stop
    given first of two beginning there; include_stop: after it). Until then the output after token k is T(k) but
    its last (longest stop - 1) characters (include_stop: all of it), and the end flushes the rest."""
    stops = [s for s in stop if s]
    holdback = max(map(len, stops)) - 1 if stops and not include_stop else 0
    armed = len("".join(pieces[:min_tokens]))
    out, deltas = "", []
    for k in range(1, len(pieces) + 1):
        text = "".join(pieces[:k])
        counting = [(i, order, s) for order, s in enumerate(stops) for i in range(len(text))
                    if text.startswith(s, i) and i + len(s) > armed]  # fmt: skip
        if counting:
            i, _, s = min(counting)
            deltas.append(text[len(out) : i + len(s) if include_stop else i])
            return deltas, True
        now = text[: max(len(out), len(text) - holdback)]
        deltas.append(now[len(out) :])
        out = now
    return [*deltas, "".join(pieces)[len(out) :]], False


def test_text_stream_follows_the_stop_rules_on_random_streams() -> None:
    """Random token streams (multi-byte characters, their bytes alone, tokens without text, words of several
    characters a token, where two stops beginning at one character end in one token's text) against random stop
    sequences that overlap each other and the text, with random min_tokens and include_stop: the deltas and the
    stop are the reference's, the text each token adds being the stream's own without stop sequences."""
    tokenizer, rng = byte_tokenizer(BYTE_VOCAB + 3), random.Random(0)  # words " w259" to " w261"
    pieces = ["a", "b", "ab", "é", "€", "😀", " "]
    alone = [*tokenizer("é")["input_ids"], tokenizer("😀")["input_ids"][0], tokenizer.bos_token_id]
    words = list(range(BYTE_VOCAB, BYTE_VOCAB + 3))
    for case in range(1000):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 40):
            ids += tokenizer(rng.choice(pieces))["input_ids"] if rng.random() < 0.8 else [rng.choice(alone + words)]
        plain = TextStream(tokenizer, ())
        texts = [plain.push(token)[0] for token in ids]
        text = "".join(texts)
        stop: list[str] = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            stop.append(text[at : at + rng.randint(0, 5)] if rng.random() < 0.7 else rng.choice(["ab", "ba", "aba"]))
        if rng.random() < 0.5:  # a prefix of another, before or after it: two stops beginning at one character
            stop.insert(rng.randint(0, len(stop)), stop[0][: rng.randint(1, 4)])
        min_tokens, include_stop = rng.randint(0, len(ids)), rng.random() < 0.5
        expected = reference_stream(texts, tuple(stop), min_tokens, include_stop)
        assert stream_until_stop(tokenizer, ids, tuple(stop), min_tokens, include_stop) == expected, (case, stop)


class _OwnDecode(type(byte_tokenizer())):  # a tokenizer class with its own decoding rule
    def _decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()


def test_window_decoder_is_the_tokenizers_decode() -> None:
    """The Rust tokenizer is called directly only where the wrapper would run nothing else."""
    plain = byte_tokenizer(600)
    assert window_decoder(plain).func == plain.backend_tokenizer.decode
    cleaning = byte_tokenizer(600)
    cleaning.clean_up_tokenization_spaces = True
    own = _OwnDecode(tokenizer_object=plain.backend_tokenizer, eos_token="<|eos|>")
    ids = [*plain("héllo, world ?")["input_ids"], 2, 300, 0, 417, 1]  # specials are skipped
    for tokenizer in (plain, cleaning, own):
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        assert window_decoder(tokenizer)(ids) == expected
        for stop in ((), ("W417", "w417")):
            stream, text, stopped = TextStream(tokenizer, stop), "", None
            for t in ids:
                delta, stopped = stream.push(t)
                text += delta
                if stopped is not None:
                    break
            assert stopped in (stop or (None,))  # the stop sequence that ended it, None where none did
            assert text == (expected[: expected.lower().index("w417")] if stop else expected + stream.flush())
