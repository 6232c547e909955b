"""A step is launched before the host takes the last step's tokens, and a step's text and events go out after the
next step's forward is launched: what that must not change."""

import asyncio
import threading

import pytest
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from loraplex.synthetic import BYTE_VOCAB
from server.engine import EngineStopped, SamplingParams, TokenEvent
from server.grammar import Grammars, GrammarSpec


def assert_well_formed(events: list[TokenEvent]) -> None:
    """Token events numbered 0, 1, ... and one final event, the last."""
    finals = [i for i, e in enumerate(events) if e.finish_reason is not None]
    assert finals == [len(events) - 1]
    indices = [e.index for e in events if e.token_id is not None]
    assert indices == list(range(len(indices)))


def test_events_go_out_after_the_next_forward_is_launched(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    log: list[str] = []
    forward = engine._forward

    def logged(*args, **kwargs):
        log.append("forward")
        return forward(*args, **kwargs)

    engine._forward = logged
    engine.submit(request([5, 6, 7], greedy(3), None, "a"), lambda event: log.append(f"event {event.index}"))
    run_to_end(engine)
    # the last step has no next one to wait for: its event goes out at once
    assert log == ["forward", "forward", "event 0", "forward", "event 1", "event 2"]


def logged_steps(engine, log: list[str], draws: bool = False) -> None:
    """Log each forward, each take of a step's tokens by the host and (`draws`) each launch of a step's draws, in
    order."""
    forward, take, launch = engine._forward, engine._take, engine._launch_sampling

    def logged_forward(*args, **kwargs):
        log.append("forward")
        return forward(*args, **kwargs)

    def logged_take(drawn):
        log.append("take")
        return take(drawn)

    def logged_launch(*args, **kwargs):
        log.append("draw")
        return launch(*args, **kwargs)

    engine._forward, engine._take = logged_forward, logged_take
    if draws:
        engine._launch_sampling = logged_launch


def test_the_next_step_runs_before_the_last_ones_tokens_are_taken(family_setup, tokenizer) -> None:
    """Decode tokens are fed from the device, so each step is launched before the host waits for the last one's
    tokens; the last token, known ahead to be the request's last by its length, gets no step of its own."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    log: list[str] = []
    logged_steps(engine, log)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(4), adapters[0], "a"), sink)
    run_to_end(engine)
    assert log == ["forward", "forward", "take", "forward", "take", "forward", "take", "take"]
    assert sink.tokens("a") == reference_generate(base, adapters[0], [5, 6, 7], 4)[0]
    assert sink.finish("a") == "length"


@pytest.mark.parametrize("reads_its_tokens", ["penalty", "grammar"])
def test_a_request_whose_draw_reads_its_tokens_is_taken_before_the_next_draw(
    family_setup, tokenizer, reads_its_tokens
) -> None:
    """A penalty counts the tokens so far on the host, a grammar's mask follows them: the host takes each step's
    tokens after the next forward is launched and before that forward's draws are (the device runs the forward
    meanwhile), for the row beside it too, which keeps its answer."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    log: list[str] = []
    logged_steps(engine, log, draws=True)
    sink = Collector()
    reads = request([5, 6, 7], greedy(4, repetition_penalty=1.3), None, "r")
    if reads_its_tokens == "grammar":
        grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
        grammar = asyncio.run(grammars.get(GrammarSpec.regex("[a-z]+")))
        reads = request([5, 6, 7], greedy(4), None, "r")
        reads.grammar = grammar.matcher()
    engine.submit(reads, sink)
    engine.submit(request([5, 6, 8], greedy(4), None, "plain"), sink)
    run_to_end(engine)
    assert log == ["forward", "draw", *["forward", "take", "draw"] * 3, "take"]
    assert len(sink.tokens("r")) == 4 and sink.finish("plain") == "length"
    assert sink.tokens("plain") == reference_generate(base, None, [5, 6, 8], 4)[0]


def test_a_token_drawn_after_eos_is_discarded_and_its_row_serves_the_next_request(family_setup, tokenizer) -> None:
    """The step after a request's EOS was launched before the host saw it: that step's token for the request is
    computed in vain (its K/V written into the row), never shown, and the next request in that row answers as if
    alone."""
    base, adapters = family_setup("llama")
    # a prompt whose third greedy token is new: as EOS it ends the request there
    prompt, tokens = next(
        (p, t) for p in ([5, 6, 7], [9, 8], [3, 1, 4, 1], [2, 7, 1, 8], [11, 12])
        if (t := reference_generate(base, None, p, 3)[0])[2] not in t[:2]
    )  # fmt: skip
    engine = make_engine(base, tokenizer, max_batch_size=1)
    engine.eos_ids = frozenset({tokens[2]})
    forwards: list[str] = []
    logged_steps(engine, forwards)
    sink = Collector()
    engine.submit(request(prompt, SamplingParams(max_new_tokens=8), None, "eos"), sink)
    engine.submit(request([9, 3, 4, 2], greedy(5), adapters[1], "next"), sink)
    run_to_end(engine)
    assert sink.finish("eos") == "stop" and sink.tokens("eos") == tokens
    assert sink.tokens("next") == reference_generate(base, adapters[1], [9, 3, 4, 2], 5)[0]
    # prefill + two decodes, the step in vain, then the next request's prefill and four decodes
    assert forwards.count("forward") == 4 + 5


def test_a_stop_sequence_found_late_discards_the_token_in_flight(family_setup, tokenizer) -> None:
    """The stopped row's token of the step launched before its text was read never shows; its row goes to the
    request waiting for one."""
    base, adapters = family_setup("qwen3")
    prompt = tokenizer("hello world")["input_ids"]
    tokens, logprobs = reference_generate(base, None, prompt, 12)
    # the stop: the first two tokens in a row that are printable ASCII bytes (ids 3 + 32 ... 3 + 126)
    pair = next(k for k in range(2, len(tokens)) if all(35 <= t <= 129 for t in tokens[k - 2 : k]))
    stop = tokenizer.decode(tokens[pair - 2 : pair])
    cut = next(k for k in range(1, len(tokens)) if stop in tokenizer.decode(tokens[:k]))
    text = tokenizer.decode(tokens[:cut])
    engine = make_engine(base, tokenizer, max_batch_size=2)
    sink = Collector()
    engine.submit(request(prompt, greedy(12, stop=(stop,)), None, "s"), sink)
    engine.submit(request([8, 9], greedy(16), None, "long"), sink)
    engine.submit(request([5, 6, 7], greedy(4), adapters[1], "next"), sink)
    run_to_end(engine)
    events = sink.events["s"]
    assert_well_formed(events)
    assert sink.finish("s") == "stop" and events[-1].index == cut - 1
    assert sink.tokens("s") == tokens[:cut]
    assert sink.logprobs("s") == pytest.approx(logprobs[:cut], abs=1e-4)
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert sink.tokens("long") == reference_generate(base, None, [8, 9], 16)[0]
    assert sink.tokens("next") == reference_generate(base, adapters[1], [5, 6, 7], 4)[0]
    assert engine.num_running == 0


def test_a_cancelled_row_ends_after_its_last_token_event(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(40), None, "c"), sink)
    for _ in range(4):
        engine.step()
    engine.cancel("c")
    run_to_end(engine)
    events = sink.events["c"]
    assert_well_formed(events)
    assert sink.finish("c") == "cancelled" and events[-1].token_id is None
    assert sink.tokens("c") == reference_generate(base, None, [5, 6, 7], 4)[0]  # every step's token, none more
    assert events[-1].index == 3


def test_a_failed_forward_delivers_the_events_of_the_step_before(family_setup, tokenizer, caplog) -> None:
    """The row that ended by length in the last step gets its final event; the one still running gets its last
    token's event, then the error, which the log tells the operator with its traceback; the engine serves the next
    request."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    forward, calls = engine._forward, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # prefill, one decode step, then this one
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    engine._forward = third_fails
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(2), None, "short"), sink)
    engine.submit(request([5, 6, 8], greedy(10), None, "long"), sink)
    run_to_end(engine)
    for rid, prompt in (("short", [5, 6, 7]), ("long", [5, 6, 8])):
        assert_well_formed(sink.events[rid])
        assert sink.tokens(rid) == reference_generate(base, None, prompt, 2)[0]
    assert sink.finish("short") == "length"
    assert sink.finish("long") == "error" and isinstance(sink.events["long"][-1].error, RuntimeError)
    (record,) = [r for r in caplog.records if "engine step failed" in r.getMessage()]
    assert record.exc_info is not None and "out of memory" in str(record.exc_info[1])
    engine.submit(request([1, 2], greedy(2), None, "later"), sink)
    run_to_end(engine)
    assert sink.finish("later") == "length" and len(sink.tokens("later")) == 2


def test_a_text_fault_ends_that_request_alone(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(6), None, "bad"), sink)
    engine.submit(request([5, 6, 8], greedy(6), None, "good"), sink)
    engine.step()  # both admitted and prefilled: their first tokens wait for their text

    def broken(token: int) -> tuple[str, bool]:
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "broken tokenizer")

    engine._rows["bad"].text.push = broken
    run_to_end(engine)
    assert_well_formed(sink.events["bad"])
    assert sink.finish("bad") == "error" and isinstance(sink.events["bad"][-1].error, UnicodeDecodeError)
    assert sink.tokens("bad") == []
    assert sink.finish("good") == "length"
    assert sink.tokens("good") == reference_generate(base, None, [5, 6, 8], 6)[0]


def test_stopping_the_engine_delivers_the_last_steps_events(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(10), None, "r"), sink)
    engine.step()
    engine.step()
    engine.stop()
    assert_well_formed(sink.events["r"])
    assert sink.tokens("r") == reference_generate(base, None, [5, 6, 7], 2)[0]
    assert sink.finish("r") == "error" and isinstance(sink.events["r"][-1].error, EngineStopped)


def test_a_fault_outside_a_forward_delivers_the_last_steps_events(family_setup, tokenizer) -> None:
    """The engine thread's own guard: every token taken before the fault reaches its request, then the error."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    forward, forwards, snapshots = engine._forward, [], []
    active = engine.slots.active

    def counted(*args, **kwargs):
        forwards.append(1)
        return forward(*args, **kwargs)

    def third_fails() -> dict[str, int]:  # read between steps, outside any request's guard
        snapshots.append(1)
        if len(snapshots) == 3:
            raise RuntimeError("bookkeeping broke")
        return active()

    engine._forward, engine.slots.active = counted, third_fails
    sink, finished = Collector(), threading.Event()

    def record(event: TokenEvent) -> None:
        sink(event)
        if event.finish_reason is not None:
            finished.set()

    engine.submit(request([5, 6, 7], greedy(10), None, "r"), record)
    engine.start()
    try:
        assert finished.wait(timeout=30), "the request was left hanging"
        assert_well_formed(sink.events["r"])
        assert sink.finish("r") == "error" and isinstance(sink.events["r"][-1].error, RuntimeError)
        assert sink.tokens("r") == reference_generate(base, None, [5, 6, 7], len(forwards))[0]
    finally:
        engine.stop()
