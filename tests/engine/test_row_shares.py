"""The KV rows are shared between clients: where every row runs and a client holding fewer than its share has a
request waiting, the client holding the most past its share pauses a decoding row (its keys and values to host
memory) and that request takes the row; the paused row resumes before its client's waiting requests and answers
exactly as it would have without the pause."""

import dataclasses

from enginekit import Collector, greedy, make_engine, reference_generate, request

from server.engine import Engine, GenerationRequest
from server.engine.waiting import WaitingQueue

PROMPT_H, PROMPT_G = [5, 6, 7, 8], [9, 10, 11]


def of(client: str, waiting: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(waiting, client=client)


def ended(sink: Collector, request_id: str) -> bool:
    events = sink.events.get(request_id)
    return bool(events) and events[-1].finish_reason is not None


def step_until(engine: Engine, done, limit: int = 500) -> int:
    """Steps until `done()`; returns how many it took."""
    for steps in range(1, limit + 1):
        engine.step()
        if done():
            return steps
    raise AssertionError("the engine did not get there")


def test_a_client_holding_every_row_gives_one_to_another_clients_request(family_setup, tokenizer) -> None:
    """Two rows, both decoding long answers of one client (adapter A): another client's request (adapter B) starts
    at the next step, not after them, as one of the first client's rows pauses. Every answer, the paused one's
    included, is exactly the one its request gives alone."""
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink = Collector()
    for i in range(2):
        engine.submit(of("hog", request(PROMPT_H, greedy(40 + i), a, f"h{i}")), sink)
    step_until(engine, lambda: all(len(sink.events.get(f"h{i}", ())) >= 3 for i in range(2)))
    engine.submit(of("guest", request(PROMPT_G, greedy(6), b, "g")), sink)
    assert step_until(engine, lambda: "g" in sink.events) <= 2  # its prompt's step: one row paused for it
    assert engine.num_running == 2 and engine.num_waiting == 1 and engine.num_paused == 1
    steps = step_until(engine, lambda: ended(sink, "g"))
    assert steps <= 6 and not ended(sink, "h0") and not ended(sink, "h1")
    step_until(engine, lambda: not engine.num_running and not engine.num_waiting)
    assert engine.num_paused == 0
    assert sink.tokens("g") == reference_generate(base, b, PROMPT_G, 6)[0]
    for i in range(2):
        assert sink.tokens(f"h{i}") == reference_generate(base, a, PROMPT_H, 40 + i)[0], f"h{i}"
        assert sink.finish(f"h{i}") == "length"
        assert [e.index for e in sink.events[f"h{i}"]] == list(range(40 + i))  # no token lost or repeated


def test_a_paused_row_resumes_before_its_clients_waiting_requests(family_setup, tokenizer) -> None:
    """One client holds both rows and has a third request waiting; another client's request pauses one of its rows.
    As that request ends, its row goes to the paused one, not to the waiting request, which starts last."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink = Collector()
    engine.submit(of("hog", request(PROMPT_H, greedy(30), None, "h0")), sink)
    engine.submit(of("hog", request(PROMPT_H, greedy(31), None, "h1")), sink)
    step_until(engine, lambda: all(len(sink.events.get(f"h{i}", ())) >= 2 for i in range(2)))
    engine.submit(of("hog", request(PROMPT_G, greedy(3), None, "h2")), sink)
    engine.submit(of("guest", request(PROMPT_G, greedy(3), None, "g")), sink)
    step_until(engine, lambda: ended(sink, "g"))
    assert "h2" not in sink.events and engine.num_waiting == 2  # the paused row and h2
    step_until(engine, lambda: "h2" in sink.events)
    assert ended(sink, "h0") or ended(sink, "h1"), "h2 took a row before the paused one"
    step_until(engine, lambda: not engine.num_running and not engine.num_waiting)
    for rid, prompt, n in (("h0", PROMPT_H, 30), ("h1", PROMPT_H, 31), ("h2", PROMPT_G, 3), ("g", PROMPT_G, 3)):
        assert sink.tokens(rid) == reference_generate(base, None, prompt, n)[0], rid


def test_a_paused_row_can_be_cancelled_and_lets_its_hold_go(family_setup, tokenizer) -> None:
    """A paused request that is cancelled ends with "cancelled" after the tokens it had, and its on_finish runs
    once (the scheduler's hold on its client's share); the other requests run on."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink, finished = Collector(), []
    hogs = [of("hog", request(PROMPT_H, greedy(30), None, f"h{i}")) for i in range(2)]
    for hog in hogs:
        hog.on_finish = lambda rid=hog.request_id: finished.append(rid)
        engine.submit(hog, sink)
    step_until(engine, lambda: all(len(sink.events.get(h.request_id, ())) >= 2 for h in hogs))
    engine.submit(of("guest", request(PROMPT_G, greedy(20), None, "g")), sink)
    step_until(engine, lambda: "g" in sink.events)
    counts = {h.request_id: len(sink.events[h.request_id]) for h in hogs}
    engine.step()
    engine.step()
    (paused,) = [rid for rid, count in counts.items() if len(sink.events[rid]) == count]  # the other one ran on
    before = len(sink.events[paused])
    engine.cancel(paused)
    engine.step()
    assert sink.finish(paused) == "cancelled" and finished == [paused]
    assert len(sink.tokens(paused)) == before and engine.num_waiting == 0
    step_until(engine, lambda: not engine.num_running)
    assert sorted(finished) == ["h0", "h1"]
    assert sink.tokens("g") == reference_generate(base, None, PROMPT_G, 20)[0]


def test_one_client_alone_keeps_every_row(family_setup, tokenizer) -> None:
    """With no other client asking, a client's waiting request waits for a row to free: nothing is paused."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink = Collector()
    for i, n in enumerate((8, 12, 3)):
        engine.submit(of("one", request(PROMPT_H, greedy(n), None, f"r{i}")), sink)
    step_until(engine, lambda: ended(sink, "r0"))
    assert "r2" not in sink.events or len(sink.events["r2"]) <= 1
    assert len(sink.events["r1"]) == len(sink.events["r0"])  # r1 ran every step r0 did: never paused
    step_until(engine, lambda: not engine.num_running and not engine.num_waiting)
    assert [len(sink.tokens(f"r{i}")) for i in range(3)] == [8, 12, 3]


def test_a_clients_items_ahead_go_before_its_waiting_requests_in_its_turns() -> None:
    """WaitingQueue.in_turn: each client's items ahead (the engine's paused rows) before its requests, the clients
    in turn as before, and a client with items ahead only has its turn too."""
    queue = WaitingQueue()
    for rid, client in (("a1", "a"), ("b1", "b"), ("a2", "a")):
        queue.add((GenerationRequest([1], greedy(1), request_id=rid, client=client), lambda event: None))
    queue.clients.served(["b"])  # b admitted last: a goes first
    order = [item if isinstance(item, str) else item[0].request_id
             for item in queue.in_turn({"b": ["pb"], "c": ["pc1", "pc2"]})]  # fmt: skip
    assert order == ["pc1", "a1", "pb", "pc2", "a2", "b1"]
    assert queue.clients_waiting == {"a", "b"}


def test_no_row_is_paused_for_a_request_whose_adapter_cannot_have_a_slot(family_setup, tokenizer) -> None:
    """Four rows, two adapter slots, both held (A's three rows on one adapter, C's row on another): B's request for a
    third adapter would be refused a slot, so no row is paused for it. Paused, A's row came back into the row it left
    at the next pass and was paused again at the one after, every other step. B runs once C's slot is free."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=4, max_active_adapters=2)
    sink = Collector()
    for i in range(3):
        engine.submit(of("A", request(PROMPT_H, greedy(30), adapters[0], f"a{i}")), sink)
    engine.submit(of("C", request(PROMPT_H, greedy(20), adapters[1], "c")), sink)
    step_until(engine, lambda: all(len(sink.events.get(rid, ())) >= 2 for rid in ("a0", "a1", "a2", "c")))
    engine.submit(of("B", request(PROMPT_G, greedy(5), adapters[2], "b")), sink)
    paused = step_until(engine, lambda: engine.num_paused > 0 or ended(sink, "c"))
    assert engine.num_paused == 0 and ended(sink, "c") and paused > 10, "a row was paused for nothing"
    step_until(engine, lambda: not engine.num_running and not engine.num_waiting)
    assert sink.tokens("b") == reference_generate(base, adapters[2], PROMPT_G, 5)[0]
    for i in range(3):
        assert sink.tokens(f"a{i}") == reference_generate(base, adapters[0], PROMPT_H, 30)[0]


def test_a_row_that_cannot_be_saved_runs_on_and_the_request_waits(family_setup, tokenizer, monkeypatch) -> None:
    """Host memory refusing the copy of a row's keys and values (raised by the save): nothing is paused, no request
    ends, and the other client's request runs once a row frees."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=2)

    def no_memory(row: int, length: int) -> list:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(engine.cache, "save", no_memory)
    sink = Collector()
    for i in range(2):
        engine.submit(of("hog", request(PROMPT_H, greedy(12 + i), None, f"h{i}")), sink)
    step_until(engine, lambda: all(len(sink.events.get(f"h{i}", ())) >= 2 for i in range(2)))
    engine.submit(of("guest", request(PROMPT_G, greedy(3), None, "g")), sink)
    engine.step()
    assert engine.num_paused == 0 and engine.num_running == 2 and "g" not in sink.events
    step_until(engine, lambda: not engine.num_running and not engine.num_waiting)
    for rid, prompt, n in (("h0", PROMPT_H, 12), ("h1", PROMPT_H, 13), ("g", PROMPT_G, 3)):
        assert sink.finish(rid) == "length" and sink.tokens(rid) == reference_generate(base, None, prompt, n)[0]
