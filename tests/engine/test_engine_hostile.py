"""Hostile requests beside honest ones: what a client may send within the API's bounds (or run on an adapter whose
weights pass them) neither stalls the engine, nor starves another client, nor changes an honest answer."""

import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end
from test_deferred_events import logged_steps

from adapters.lora import LoraModule, LoraWeights
from server.engine import GenerationRequest, SamplingParams
from server.engine.errors import NonFiniteOutput
from server.engine.text import TextStream


def decoded_ids(stream: TextStream) -> list[int]:
    """Count the token ids `stream` decodes, in a one-element list."""
    count, decode = [0], stream._decode

    def counting(ids: list[int]) -> str:
        count[0] += len(ids)
        return decode(ids)

    stream._decode = counting
    return count


def test_tokens_without_text_cost_each_token_the_same(tokenizer) -> None:
    """A run of undecodable bytes or of special tokens adds no text: each token used to decode the whole run, twice
    (2,000 forced 0xF0 bytes: 108 us a token on average, 210 us at 4,000, on the engine thread), and the run's text
    never came out. Now the run settles every few tokens, and its text is the whole output's decode."""
    f0, bos = tokenizer.convert_tokens_to_ids("ð"), tokenizer.bos_token_id  # 0xF0 starts a 4-byte character
    emoji, tail = tokenizer("😀")["input_ids"], tokenizer("ok")["input_ids"]
    for run in ([f0] * 3000, [bos] * 3000, [f0, bos] * 1500):
        for stop in ((), ("never",)):
            ids = [*run, *emoji, *run[:20], *emoji, *tail]
            stream = TextStream(tokenizer, stop)
            count = decoded_ids(stream)
            text = "".join(stream.push(token)[0] for token in ids) + stream.flush()
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            assert count[0] < 64 * len(ids)  # a bounded window, not one growing with the run


def test_a_request_forced_onto_undecodable_bytes_changes_no_honest_answer(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_seq_len=256)
    f0 = tokenizer.convert_tokens_to_ids("ð")
    sink = Collector()
    honest = [(adapters[0], [5, 6, 7, 8]), (None, [9, 10, 11])]
    engine.submit(request([12, 13], greedy(200, logit_bias=((f0, 100.0),)), adapters[1], "hostile"), sink)
    for i, (adapter, prompt) in enumerate(honest):
        engine.submit(request(prompt, greedy(12), adapter, f"honest{i}"), sink)
    run_to_end(engine)
    for i, (adapter, prompt) in enumerate(honest):
        assert sink.tokens(f"honest{i}") == reference_generate(base, adapter, prompt, 12)[0]
    assert sink.tokens("hostile") == [f0] * 200
    text = "".join(e.text for e in sink.events["hostile"])
    assert text.startswith("\ufffd" * 190) and set(text) == {"\ufffd"}  # what came out is what decoding shows


def test_a_flood_over_every_slot_cannot_starve_another_adapter(family_setup, tokenizer) -> None:
    """One client keeps requests for as many adapters as there are slots always queued: requests behind one that
    waits for a slot used to join the slots in use, so no slot ever drained and the other adapter's request waited
    as long as the flood lasted (2,000 steps, 1,451 flood requests served, none of its tokens). A slot now closes to
    new rows while a request waits for one, and the request runs once that slot has drained."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_active_adapters=2)
    sink = Collector()
    flood = 0

    def more(count: int) -> None:
        nonlocal flood
        for _ in range(count):  # staggered lengths: the rows of a slot never all end at once
            params = greedy(4 + flood * 7 % 13)
            engine.submit(request([5, 6, 7], params, adapters[flood % 2], f"flood{flood}"), sink)
            flood += 1

    more(6)
    engine.submit(request([9, 10, 11], greedy(6), adapters[2], "honest"), sink)
    for _ in range(200):
        if engine.num_waiting < 32:
            more(2)
        engine.step()
        if "honest" in sink.events and sink.finish("honest"):
            break
    assert "honest" in sink.events, "the flood starved the request for another adapter"
    assert sink.finish("honest") == "length"
    assert sink.tokens("honest") == reference_generate(base, adapters[2], [9, 10, 11], 6)[0]
    for i in range(2):  # the flood's first requests, in both slots, ran beside it
        assert sink.tokens(f"flood{i}") == reference_generate(base, adapters[i], [5, 6, 7], 4 + i * 7 % 13)[0]


def test_an_adapter_whose_activations_overflow_ends_its_request_alone_with_an_error(family_setup, tokenizer) -> None:
    """Weights finite once scaled and cast, whose activations are not: the request drew token 0 (the argmax of
    NaN) with logprob NaN at every step and finished by its length, garbage passed off as an answer (and NaN is
    no JSON). Now it ends at its first such step with a typed error; the request beside it keeps its answer."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    modules = adapters[1].weights.modules.items()
    huge = LoraWeights({name: LoraModule(m.a, m.b * 1e30, m.scaling) for name, m in modules})
    sink = Collector()
    for i, params in enumerate([greedy(5, top_logprobs=2), SamplingParams(max_new_tokens=5, temperature=1.0, seed=1)]):
        engine.submit(GenerationRequest([5, 6, 7], params, "huge@1", huge, request_id=f"huge{i}"), sink)
    engine.submit(request([5, 6, 7], greedy(5), adapters[0], "honest"), sink)
    run_to_end(engine)
    for request_id in ("huge0", "huge1"):
        (event,) = sink.events[request_id]
        assert event.token_id is None and event.finish_reason == "error"
        assert isinstance(event.error, NonFiniteOutput) and "huge@1" in str(event.error)
    assert sink.tokens("honest") == reference_generate(base, adapters[0], [5, 6, 7], 5)[0]


def ids_converted(engine, prompt_len: int, rows: int, monkeypatch) -> int:
    """How many ids the engine turned from Python lists into tensors while `rows` penalized requests of
    `prompt_len` tokens ran to their end (24 tokens each)."""
    converted = 0
    to_tensor = torch.tensor

    def counting(data, *args, **kwargs):
        nonlocal converted
        converted += len(data) if isinstance(data, list) else 0
        return to_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    sink = Collector()
    for i in range(rows):
        params = greedy(24, repetition_penalty=1.3, frequency_penalty=0.5)
        engine.submit(request([5 + i] * prompt_len, params, None, f"r{prompt_len}-{i}"), sink)
    run_to_end(engine)
    monkeypatch.undo()
    assert all(len(sink.tokens(f"r{prompt_len}-{i}")) == 24 for i in range(rows))
    return converted


def test_a_penalized_request_converts_its_context_once_not_every_step(family_setup, tokenizer, monkeypatch) -> None:
    """A penalty reads the row's ids each step: they went to the device as a Python list converted anew, ~150 ns
    an id (a 2,000-token context: 0.3 ms of the engine thread per row and step, not overlapped with the device,
    since such rows make the host read each step first). Now a row's ids are kept in a tensor as they come, so a
    longer prompt adds its extra ids to the conversions once, at admission, and not once a step."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_seq_len=3100, max_prefill_tokens=3100)
    short, long = ids_converted(engine, 8, 4, monkeypatch), ids_converted(engine, 3000, 4, monkeypatch)
    assert long - short <= 4 * (3000 - 8), (short, long)


def test_cancelling_queued_requests_leaves_the_next_step_launched_first(family_setup, tokenizer) -> None:
    """Any cancel made the host read the step on its way before launching the next, the cancel of a request still
    queued too: clients that queue requests and drop them, over and over, took every running stream's overlap of
    host and device away. Only a cancelled row with a token on the way needs that read now."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=1)
    log: list[str] = []
    logged_steps(engine, log)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(8), None, "running"), sink)
    engine.step()
    for i in range(3):
        engine.submit(request([9, 10], greedy(4), None, f"queued{i}"), sink)
        engine.cancel(f"queued{i}")
        log.clear()
        engine.step()
        assert log == ["forward", "take"]
        assert sink.finish(f"queued{i}") == "cancelled"
    run_to_end(engine)
    assert sink.tokens("running") == reference_generate(base, None, [5, 6, 7], 8)[0]
