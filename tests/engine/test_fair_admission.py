"""Admission is fair between clients and adapters: requests queued for one client or adapter do not hold back a
later request of another (each pass takes the waiting requests round-robin over their clients, and in a client's
turns over its adapters, the one admitted least recently first), a full queue gives a place to a client that holds
fewer of it, answers stay exactly what each request gives alone, and the per-adapter waiting counts the scheduler
bounds the queue by follow every way a request leaves the queue."""

import copy
import dataclasses

import pytest
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from server.engine import Engine, EngineConfig, GenerationRequest
from server.engine.errors import AdapterPlaceGiven, AdapterQueueFull, QueueFull, QueuePlaceGiven
from server.engine.waiting import WaitingQueue


def of(client: str, waiting: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(waiting, client=client)


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
    assert engine.waiting_counts() == {}


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


def test_one_row_goes_round_robin_over_clients_before_their_adapters(family_setup, tokenizer) -> None:
    """One row; a flooding client's three requests for adapter A wait before another client's one for the same
    adapter: the other client's is admitted second, not after the flood (adapter turns alone cannot tell them
    apart), and within the flood its requests keep their order. Answers are each request's alone."""
    base, adapters = family_setup("llama")
    a = adapters[0]
    engine = make_engine(base, tokenizer, max_batch_size=1)
    sink = Collector()
    for i in range(3):
        engine.submit(of("flood", request(PROMPT_A, greedy(2), a, f"f{i}")), sink)
    engine.submit(of("other", request(PROMPT_B, greedy(2), a, "o0")), sink)
    run_to_end(engine)
    assert first_events(sink) == ["f0", "o0", "f1", "f2"]
    assert sink.tokens("o0") == reference_generate(base, a, PROMPT_B, 2)[0]
    assert sink.tokens("f2") == reference_generate(base, a, PROMPT_A, 2)[0]


def test_a_full_queue_gives_the_heaviest_clients_newest_place_to_a_lighter_client(family_setup, tokenizer) -> None:
    """max_queue 3, filled by one client: another client's request has room, as the flood's newest gives its place
    (it ends with 429 queue_full at the next step, its client share and adapter released by its on_finish); once
    the two hold 2 and 1, neither has room. The counts follow, and the requests that stayed answer as alone."""
    base, adapters = family_setup("llama")
    a = adapters[0]
    engine = make_engine(base, tokenizer, max_batch_size=1)
    sink = Collector()
    engine.submit(request(PROMPT_A, greedy(3), None, "running"), sink)
    engine.step()
    finished: list[str] = []
    for i in range(3):
        flood = of("flood", request(PROMPT_A, greedy(2), a, f"f{i}"))
        flood.on_finish = lambda i=i: finished.append(f"f{i}")
        engine.submit(flood, sink)
    with pytest.raises(QueueFull):  # its own flood: no one to take a place from
        engine.submit(of("flood", request(PROMPT_A, greedy(2), a, "f3")), sink, max_queue=3)
    engine.check_room("other", None, 3)  # asked only: nothing given yet
    assert engine.num_waiting == 3
    engine.submit(of("other", request(PROMPT_B, greedy(2), None, "o0")), sink, max_queue=3)
    assert engine.num_waiting == 3 and engine.waiting_counts() == {a.key: 2, None: 1}
    for client in ("other", "flood"):
        with pytest.raises(QueueFull):
            engine.submit(of(client, request(PROMPT_B, greedy(2), None, f"{client}-late")), sink, max_queue=3)
    engine.check_room("third", None, 3)  # the flood's 2 against its 1: room, by a place the flood would give
    engine.step()
    assert sink.finish("f2") == "error" and isinstance(sink.events["f2"][-1].error, QueuePlaceGiven)
    assert sink.events["f2"][-1].error.http_status == 429 and finished == ["f2"]
    run_to_end(engine)
    assert [sink.finish(r) for r in ("running", "f0", "f1", "o0")] == ["length"] * 4
    assert sink.tokens("o0") == reference_generate(base, None, PROMPT_B, 2)[0]
    assert sink.tokens("f1") == reference_generate(base, a, PROMPT_A, 2)[0]
    assert engine.waiting_counts() == {} and engine.num_waiting == 0


def test_a_request_admitted_after_it_was_asked_to_give_its_place_leaves_the_counts_right() -> None:
    """The engine thread may admit a request between its snapshot of the queue and the mark that asks it to give
    its place: it runs, is not ended again, and every count stays true."""
    queue = WaitingQueue()
    for i in range(3):
        queue.add((GenerationRequest([1], client="flood", request_id=f"f{i}"), lambda event: None))
    queue.make_room("other", None, 3, None, take=True)
    assert len(queue) == 2
    assert queue.remove({"f2"})  # admitted meanwhile
    assert queue.take_leaving() == [] and len(queue) == 2 and queue.per_adapter == {None: 2}
    assert [waiting[0].request_id for waiting in queue.in_turn()] == ["f0", "f1"]
    queue.make_room("other", None, 2, None, take=False)  # room by taking a place; none taken
    assert len(queue) == 2
    queue.make_room("other", None, 2, None, take=True)
    assert [w[0].request_id for w in queue.take_leaving()] == ["f1"]
    assert len(queue) == 1 and queue.per_adapter == {None: 1} and queue.has_items


def test_an_adapters_full_share_gives_the_place_of_the_heaviest_clients_newest_request_for_it() -> None:
    """max_queue 3, max_queue_per_adapter 2, adapter A's two places held by one client (whose newest request is for
    B): another client's request for A takes the place of that client's newest request for A, which ends with 429
    adapter_queue_full saying why; one place is given for both bounds, and the counts follow. With the two holding
    one each, neither has room for A; a request of the flood for B then finds the queue full. Behind one client
    (the flood alone), the share refuses as it did before clients were told apart."""
    queue = WaitingQueue()

    def add(client: str, adapter: str, request_id: str) -> None:
        waiting = GenerationRequest([1], adapter_key=adapter, client=client, request_id=request_id)
        queue.add((waiting, lambda event: None))

    for request_id, adapter in (("f0", "a@1"), ("f1", "a@1"), ("f2", "b@1")):
        add("flood", adapter, request_id)
    with pytest.raises(AdapterQueueFull):
        queue.make_room("flood", "a@1", 3, 2, take=True)
    queue.make_room("other", "a@1", 3, 2, take=True)
    assert len(queue) == 2 and queue.per_adapter == {"a@1": 1, "b@1": 1}
    add("other", "a@1", "o0")
    for client in ("other", "flood"):
        with pytest.raises(AdapterQueueFull):
            queue.make_room(client, "a@1", 3, 2, take=True)
    with pytest.raises(QueueFull):
        queue.make_room("flood", "b@1", 3, 2, take=True)
    ((gave, _, error),) = queue.take_leaving()
    assert gave.request_id == "f1" and isinstance(error, AdapterPlaceGiven) and error.http_status == 429
    assert error.code == "adapter_queue_full" and "gave its place" in str(error)
    assert [waiting[0].request_id for waiting in queue.in_turn()] == ["f0", "o0", "f2"]
    assert queue.per_adapter == {"a@1": 2, "b@1": 1} and len(queue) == 3


def test_one_clients_long_prompts_do_not_hold_another_clients_prompts(family_setup, tokenizer) -> None:
    """One client's three long prompts take free rows first; another client's two prompts, admitted at the next
    step, go in turns with them: its first is filled once the burst's first is, its second once the burst's second
    is, before the burst's third (in admission order, both went after all three). Every answer is exactly the one
    its request gives alone."""
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=5, max_seq_len=256)
    sink = Collector()
    prompts = {f"x{i}": [3 + i, *(3 + (j * 7) % 250 for j in range(199))] for i in range(3)}  # no prefix in common
    guest = {f"g{i}": [9 + i, *(3 + (j * 5) % 250 for j in range(39))] for i in range(2)}
    for rid, prompt in prompts.items():
        engine.submit(of("burst", request(prompt, greedy(2), a, rid)), sink)
    engine.step()  # admits them; their prompts take 600 tokens, tens of steps of this budget
    for rid, prompt in guest.items():
        engine.submit(of("guest", request(prompt, greedy(3), b, rid)), sink)
    first: dict[str, int] = {}  # request -> the step its first token came at
    for step in range(300):
        engine.step()
        first |= {rid: step for rid in sink.events if rid not in first}
    assert first["x0"] <= first["g0"] < first["x1"] <= first["g1"] < first["x2"], first
    for rid, prompt in guest.items():
        assert sink.tokens(rid) == reference_generate(base, b, prompt, 3)[0], rid
    for rid, prompt in prompts.items():
        assert sink.tokens(rid) == reference_generate(base, a, prompt, 2)[0], rid
