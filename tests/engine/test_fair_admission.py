"""Admission is fair between adapters: requests queued for one adapter do not hold back a later request for
another (each pass takes the waiting requests round-robin over their adapters, the adapter admitted least
recently first), answers stay exactly what each request gives alone, and the per-adapter waiting counts the
scheduler bounds the queue by follow every way a request leaves the queue."""

import copy

from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from server.engine import Engine, EngineConfig

PROMPT_A, PROMPT_B = [5, 6, 7], [9, 10]


def first_events(sink: Collector) -> list[str]:
    """Request ids in the order their first event came: with one row, the order they were admitted in."""
    return list(sink.events)


def test_a_request_for_another_adapter_takes_the_next_free_row_before_a_flood(family_setup, tokenizer) -> None:
    """Every row runs adapter A and six more A requests wait before one for B: FIFO gave the next free row to A
    (and the five after it); B takes it now. A's requests keep their order, and every answer is the one the
    request gives alone."""
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink = Collector()
    engine.submit(request(PROMPT_A, greedy(4), a, "a0"), sink)
    engine.submit(request(PROMPT_A, greedy(12), a, "a1"), sink)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 0
    for i in range(2, 8):
        engine.submit(request(PROMPT_A, greedy(4), a, f"a{i}"), sink)
    engine.submit(request(PROMPT_B, greedy(6), b, "b"), sink)
    assert engine.waiting_counts() == {a.key: 6, b.key: 1}
    for _ in range(100):  # until a0 ends and its row is taken
        engine.step()
        if engine.num_waiting < 7:
            break
    assert engine.num_running == 2
    assert engine.waiting_counts() == {a.key: 6}, "the free row went to the flood, not to the other adapter"
    run_to_end(engine)
    order = first_events(sink)
    assert order.index("b") < order.index("a2")
    assert [r for r in order if r.startswith("a")] == [f"a{i}" for i in range(8)]  # FIFO within an adapter
    assert sink.tokens("b") == reference_generate(base, b, PROMPT_B, 6)[0]
    assert sink.tokens("a1") == reference_generate(base, a, PROMPT_A, 12)[0]
    short = reference_generate(base, a, PROMPT_A, 4)[0]
    for i in (0, *range(2, 8)):
        assert sink.tokens(f"a{i}") == short and sink.finish(f"a{i}") == "length"
    assert engine.waiting_counts() == {} and engine.waiting_for(a.key) == 0


def test_one_row_goes_round_robin_over_adapters_across_passes(family_setup, tokenizer) -> None:
    """One row, so each pass admits one request: the adapter admitted least recently goes first (one not admitted
    yet before any, in the order of its oldest request). A pass that only ordered the queue by its oldest requests
    would still admit A, A, A first: A's requests are the oldest every time."""
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=1)
    sink = Collector()
    for i in range(3):
        engine.submit(request(PROMPT_A, greedy(2), a, f"a{i}"), sink)
    engine.submit(request(PROMPT_B, greedy(2), b, "b0"), sink)
    engine.submit(request(PROMPT_B, greedy(2), None, "base0"), sink)
    engine.submit(request(PROMPT_B, greedy(2), b, "b1"), sink)
    run_to_end(engine)
    assert first_events(sink) == ["a0", "b0", "base0", "a1", "b1", "a2"]
    assert all(sink.finish(r) == "length" for r in sink.events)
    assert sink.tokens("base0") == reference_generate(base, None, PROMPT_B, 2)[0]
    assert sink.tokens("b1") == reference_generate(base, b, PROMPT_B, 2)[0]


def test_one_pass_with_several_free_rows_takes_one_request_of_each_adapter_in_turn(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=4, max_prefill_tokens=64)
    sink = Collector()
    for i in range(4):
        engine.submit(request(PROMPT_A, greedy(3), a, f"a{i}"), sink)
    engine.submit(request(PROMPT_B, greedy(3), b, "b0"), sink)
    engine.submit(request(PROMPT_B, greedy(3), b, "b1"), sink)
    engine.submit(request(PROMPT_B, greedy(3), None, "base"), sink)
    engine.step()
    assert engine.waiting_counts() == {a.key: 2, b.key: 1}
    engine.step()  # delivers the first step's tokens: one event for each admitted request
    assert set(sink.events) == {"a0", "b0", "base", "a1"}
    run_to_end(engine)
    assert engine.waiting_counts() == {}
    assert sink.tokens("a3") == reference_generate(base, a, PROMPT_A, 3)[0]


def test_waiting_counts_return_to_zero_after_cancels_failures_ends_and_stop(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    a, b, broken = adapters[0], adapters[1], adapters[2]

    def hook(key: str, slot: int, seconds: float) -> None:
        if key == broken.key:
            raise RuntimeError("activation failed")

    engine = Engine(
        copy.deepcopy(base),
        tokenizer,
        EngineConfig(max_batch_size=1, max_active_adapters=2, max_lora_rank=16, max_seq_len=64),
        on_activation=hook,
    )
    sink = Collector()
    engine.submit(request(PROMPT_A, greedy(6), None, "running"), sink)
    engine.step()
    for i in range(3):
        engine.submit(request(PROMPT_A, greedy(2), a, f"a{i}"), sink)
    engine.submit(request(PROMPT_B, greedy(2), b, "b0"), sink)
    engine.submit(request(PROMPT_B, greedy(2), None, "base0"), sink)
    engine.submit(request(PROMPT_B, greedy(2), broken, "broken"), sink)
    assert engine.waiting_counts() == {a.key: 3, b.key: 1, None: 1, broken.key: 1}
    assert engine.waiting_for(a.key) == 3 and engine.waiting_for(None) == 1 and engine.waiting_for("other@1") == 0
    engine.cancel("a1")
    engine.cancel("b0")
    engine.step()
    assert engine.waiting_counts() == {a.key: 2, None: 1, broken.key: 1}
    run_to_end(engine)
    assert engine.waiting_counts() == {} and engine.num_waiting == 0
    assert sink.finish("a1") == sink.finish("b0") == "cancelled"
    assert sink.finish("broken") == "error"
    assert sink.finish("a0") == sink.finish("a2") == sink.finish("base0") == sink.finish("running") == "length"
    engine.submit(request(PROMPT_A, greedy(2), a, "late-a"), sink)
    engine.submit(request(PROMPT_B, greedy(2), None, "late-base"), sink)
    assert engine.waiting_counts() == {a.key: 1, None: 1}
    engine.stop()
    assert engine.waiting_counts() == {} and sink.finish("late-a") == sink.finish("late-base") == "error"
