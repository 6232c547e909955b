"""The oracle: rows of one batch mixing adapters give, row by row, what PEFT gives for that adapter alone."""

import pytest
from enginekit import (
    Collector,
    answer_logits,
    greedy,
    make_engine,
    min_new_tokens_reference,
    reference_generate,
    request,
    run_to_end,
)
from tiny import FAMILIES

from server.engine import GenerationRequest, SamplingParams

NEW_TOKENS = 8


def prompts(tokenizer, n: int) -> list[list[int]]:
    texts = ["hello world", "the quick brown fox", "a", "LoRA adapters", "mixed batch of rows", "zz top"]
    return [tokenizer(texts[i % len(texts)] + "!" * (i // len(texts)))["input_ids"] for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft_row_by_row(family, family_setup, tokenizer) -> None:
    base, adapters = family_setup(family)
    rows = [*adapters, None, *reversed(adapters), None]  # every adapter twice, plus base rows
    engine = make_engine(base, tokenizer)
    sink = Collector()
    for i, (adapter, prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    run_to_end(engine)
    outputs = set()
    for i, (adapter, prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        tokens, logprobs = reference_generate(base, adapter, prompt, NEW_TOKENS)
        assert sink.tokens(f"r{i}") == tokens, f"row {i} ({adapter.key if adapter else 'base'})"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)
        assert sink.finish(f"r{i}") == "length"
        outputs.add(tuple(tokens))
    assert len(outputs) > len(rows) // 2  # the adapters really change the output


def test_requests_joining_mid_flight_match_solo_runs(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    plan = list(zip([adapters[0], None, adapters[1], adapters[2]], prompts(tokenizer, 4), strict=True))
    long_prompt = tokenizer("a prompt long enough to need several prefill chunks")["input_ids"]
    plan.append((adapters[3], long_prompt))
    for i, (adapter, prompt) in enumerate(plan):  # each joins while the earlier ones are decoding
        engine.submit(request(prompt, greedy(NEW_TOKENS + i), adapter, f"r{i}"), sink)
        for _ in range(3):
            engine.step()
    run_to_end(engine)
    for i, (adapter, prompt) in enumerate(plan):
        tokens, _ = reference_generate(base, adapter, prompt, NEW_TOKENS + i)
        assert sink.tokens(f"r{i}") == tokens


def test_slots_are_reused_when_adapters_outnumber_them(family_setup, tokenizer) -> None:
    base, adapters = family_setup("qwen2")
    engine = make_engine(base, tokenizer, max_active_adapters=2)
    sink = Collector()
    prompt = prompts(tokenizer, 1)[0]
    order = [adapters[i % 4] for i in range(8)]  # round robin over four adapters, two slots
    for i, adapter in enumerate(order):
        engine.submit(request(prompt, greedy(4), adapter, f"r{i}"), sink)
    run_to_end(engine)
    assert len(engine.active_adapters()) == 2
    assert len(engine.activation_seconds) >= 4  # every adapter was copied in at least once
    for i, adapter in enumerate(order):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, 4)[0]


def test_prepared_adapters_are_views_of_one_pack_and_serve_alike(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    adapter = adapters[1]  # every projection, rsLoRA scaling (folded into the pack's B)
    kept = engine.prepare_adapter(adapter.weights)
    # what a CPU tier keeps instead of the loaded weights holds no memory besides the pack's two tensors
    assert len({m.a.untyped_storage().data_ptr() for m in kept.modules.values()}) == 1
    assert len({m.b.untyped_storage().data_ptr() for m in kept.modules.values()}) == 1
    assert kept.modules.keys() == adapter.weights.modules.keys() and kept.rank == adapter.weights.rank
    prompt = prompts(tokenizer, 1)[0]
    sink = Collector()
    engine.submit(GenerationRequest(prompt, greedy(NEW_TOKENS), adapter.key, kept, request_id="kept"), sink)
    run_to_end(engine)
    tokens, logprobs = reference_generate(base, adapter, prompt, NEW_TOKENS)
    assert sink.tokens("kept") == tokens
    assert sink.logprobs("kept") == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (None, [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        (("q_proj", "v_proj", "o_proj", "down_proj"), [["q_proj", "v_proj"], ["o_proj"], ["down_proj"]]),
    ],
)
def test_layers_sharing_an_input_share_one_shrink(targets, expected, family_setup, tokenizer) -> None:
    """q/k/v (and gate/up) take the same tensor: their A columns are adjacent and one decode shrink serves them."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, **({} if targets is None else {"target_modules": targets}))
    layer0 = [(name, layer) for name, layer in engine.lora_layers.items() if ".layers.0." in name]
    groups: dict[int, list[str]] = {}
    for name, layer in layer0:
        members = groups.setdefault(id(layer.group), [])
        assert layer.member == len(members)
        members.append(name.rsplit(".", 1)[-1])
        own = layer.group.a[:, :, layer.member * layer.in_features : (layer.member + 1) * layer.in_features]
        assert own.data_ptr() == layer.lora_a.data_ptr() and own.shape == layer.lora_a.shape  # its own columns
    assert list(groups.values()) == expected
    assert all(len(members) == layer.group.size for _, layer in layer0 for members in [groups[id(layer.group)]])


def test_repetition_penalties_match_hf_beside_rows_without_one(family_setup, tokenizer) -> None:
    """Rows with a repetition penalty (above and below 1, one with an adapter) in a batch with rows without one:
    each gives what transformers' generate gives with that penalty, the others what they give alone."""
    base, adapters = family_setup("llama")
    rows = [(adapters[0], 1.5), (None, 1.0), (None, 0.7), (adapters[1], 1.0)]
    engine = make_engine(base, tokenizer)
    sink = Collector()
    for i, ((adapter, penalty), prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        engine.submit(request(prompt, greedy(NEW_TOKENS, repetition_penalty=penalty), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, ((adapter, penalty), prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        tokens, logprobs = reference_generate(base, adapter, prompt, NEW_TOKENS, penalty)
        assert sink.tokens(f"r{i}") == tokens, f"row {i} (penalty {penalty})"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)


def test_frequency_and_presence_penalties_match_their_definition_beside_rows_without_them(
    family_setup, tokenizer
) -> None:
    """OpenAI's penalties (positive and negative, with and without an adapter) beside a row without them: each
    row gives what transformers' generate gives with a logits processor written from OpenAI's definition."""
    base, adapters = family_setup("llama")
    rows = [(adapters[0], (1.0, 0.5)), (None, (0.0, 0.0)), (None, (-0.5, 0.0)), (adapters[1], (0.0, 1.5))]
    engine = make_engine(base, tokenizer)
    sink = Collector()
    for i, ((adapter, (frequency, presence)), prompt) in enumerate(
        zip(rows, prompts(tokenizer, len(rows)), strict=True)
    ):
        params = greedy(NEW_TOKENS, frequency_penalty=frequency, presence_penalty=presence)
        engine.submit(request(prompt, params, adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, ((adapter, penalty), prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        tokens, logprobs = reference_generate(base, adapter, prompt, NEW_TOKENS, output_penalty=penalty)
        assert sink.tokens(f"r{i}") == tokens, f"row {i} (penalties {penalty})"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)


def test_logit_bias_matches_transformers_sequence_bias_beside_rows_without_one(family_setup, tokenizer) -> None:
    """OpenAI's logit_bias (large and small, positive and negative, with an adapter and with a frequency penalty)
    beside a row without one: each row gives what transformers' generate gives with that bias (its sequence_bias of
    one-token sequences) and that penalty."""
    base, adapters = family_setup("llama")
    rows = [
        (adapters[0], {7: 3.0, 11: -2.0}, 0.0),
        (None, {}, 0.0),
        (None, {5: 100.0}, 0.0),  # every token it draws
        (adapters[1], {3: 1.5, 9: 0.5}, 1.0),
    ]
    engine = make_engine(base, tokenizer)
    sink = Collector()
    for i, ((adapter, bias, frequency), prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        params = greedy(NEW_TOKENS, logit_bias=tuple(sorted(bias.items())), frequency_penalty=frequency)
        engine.submit(request(prompt, params, adapter, f"r{i}"), sink)
    run_to_end(engine)
    assert set(sink.tokens("r2")) == {5}
    for i, ((adapter, bias, frequency), prompt) in enumerate(zip(rows, prompts(tokenizer, len(rows)), strict=True)):
        tokens, logprobs = reference_generate(
            base, adapter, prompt, NEW_TOKENS, output_penalty=(frequency, 0.0), logit_bias=bias
        )
        assert sink.tokens(f"r{i}") == tokens, f"row {i} (bias {bias})"
        assert sink.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)


def test_min_p_draws_among_the_models_kept_tokens_beside_rows_without_it(family_setup, tokenizer) -> None:
    """A seeded row with min_p 0.5 in a batch with a seeded row and a greedy row without min_p: each row draws what
    it draws alone; every token of the min_p row has, under the model's own distribution there (PEFT) at its
    temperature, at least 0.5 x the top token's probability, and its logprob is its probability among those tokens.
    The same seed without min_p draws another answer (min_p decides draws here)."""
    base, adapters = family_setup("llama")
    sampled = {"max_new_tokens": NEW_TOKENS, "temperature": 0.5, "ignore_eos": True}
    rows = [
        (adapters[0], SamplingParams(**sampled, seed=5, min_p=0.5)),
        (None, SamplingParams(**sampled, seed=6)),
        (adapters[1], greedy(NEW_TOKENS)),
    ]
    texts = prompts(tokenizer, len(rows))

    def run(indices: list[int], params: SamplingParams | None = None) -> Collector:
        engine, sink = make_engine(base, tokenizer), Collector()
        for i in indices:
            adapter, own = rows[i]
            engine.submit(request(texts[i], params or own, adapter, f"r{i}"), sink)
        run_to_end(engine)
        return sink

    batch = run([0, 1, 2])
    for i in range(len(rows)):
        assert batch.tokens(f"r{i}") == run([i]).tokens(f"r{i}"), f"row {i}"
    tokens = batch.tokens("r0")
    probs = (answer_logits(base, adapters[0], texts[0], tokens) / 0.5).softmax(-1)  # [T, V]
    kept = probs >= 0.5 * probs.max(-1, keepdim=True).values
    assert kept[range(len(tokens)), tokens].all()
    expected = (probs[range(len(tokens)), tokens] / (probs * kept).sum(-1)).log()
    assert batch.logprobs("r0") == pytest.approx(expected.tolist(), abs=1e-4)
    assert run([0], SamplingParams(**sampled, seed=5)).tokens("r0") != tokens


def test_min_tokens_holds_back_the_stop_tokens_beside_rows_without_it(family_setup, tokenizer) -> None:
    """A stop token biased to be drawn at once (EOS, or a stop_token_ids one) ends the answer only after min_tokens
    tokens, greedy (as transformers' min_new_tokens: also with a repetition penalty, whose row the host reads before
    each draw) or sampled; ignore_eos leaves EOS drawable (it ends nothing), as vLLM. Beside them, a row biased the
    same way without min_tokens ends at once and a plain row answers as alone."""
    base, adapters = family_setup("llama")
    eos = 2
    texts = prompts(tokenizer, 6)
    stop = next(t for t in range(3, 259) if t not in texts[3])
    forced = {"logit_bias": ((eos, 100.0),)}
    stopped = SamplingParams(
        max_new_tokens=NEW_TOKENS,
        min_tokens=2,
        stop_token_ids=frozenset({stop}),
        logit_bias=((stop, 100.0),),
        repetition_penalty=1.3,
    )
    rows = [
        (adapters[0], SamplingParams(max_new_tokens=NEW_TOKENS, min_tokens=4, **forced)),
        (None, SamplingParams(max_new_tokens=NEW_TOKENS, **forced)),
        (adapters[1], SamplingParams(max_new_tokens=NEW_TOKENS)),
        (None, stopped),
        (adapters[2], SamplingParams(max_new_tokens=NEW_TOKENS, min_tokens=3, temperature=1.0, seed=4, **forced)),
        (None, SamplingParams(max_new_tokens=NEW_TOKENS, min_tokens=3, ignore_eos=True, **forced)),
    ]
    engine = make_engine(base, tokenizer)
    engine.eos_ids = frozenset({eos})
    sink = Collector()
    for i, (adapter, params) in enumerate(rows):
        engine.submit(request(texts[i], params, adapter, f"r{i}"), sink)
    run_to_end(engine)
    assert sink.tokens("r0") == min_new_tokens_reference(base, adapters[0], texts[0], NEW_TOKENS, eos, 4)
    assert len(sink.tokens("r0")) == 5 and sink.finish("r0") == "stop"
    assert sink.tokens("r1") == [eos] and sink.finish("r1") == "stop"
    assert sink.tokens("r2") == reference_generate(base, adapters[1], texts[2], NEW_TOKENS)[0]
    expected = min_new_tokens_reference(base, None, texts[3], NEW_TOKENS, stop, 2, repetition_penalty=1.3)
    assert sink.tokens("r3") == expected and len(expected) == 3 and sink.finish("r3") == "stop"
    sampled = sink.tokens("r4")
    assert eos not in sampled[:3] and sampled[3:] == [eos] and sink.finish("r4") == "stop"
    assert sink.tokens("r5") == [eos] * NEW_TOKENS and sink.finish("r5") == "length"
    assert "".join(e.text for e in sink.events["r0"]) == tokenizer.decode(sink.tokens("r0")[:4])
