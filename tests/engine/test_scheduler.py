"""The asyncio facade over a running engine thread."""

import asyncio
import threading

import pytest
import torch
from enginekit import greedy, make_engine, reference_generate, request, run_to_end

from server.engine import AdapterQueueFull, AdapterTooLarge, GenerationRequest, QueueFull, TokenEvent
from server.engine.errors import GrammarDeadEnd
from server.scheduler import GenerationFailed, LatencyHooks, Mailbox, Scheduler


@pytest.fixture
def engine(family_setup, tokenizer):
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=2)
    engine.start()
    yield engine
    engine.stop()


def test_stream_yields_tokens_and_reports_latencies(engine, family_setup) -> None:
    base, adapters = family_setup("llama")
    ttft: list[float] = []
    itl: list[float] = []
    finished: list[str] = []
    scheduler = Scheduler(engine, max_queue=4, hooks=LatencyHooks(ttft.append, itl.append))

    async def main() -> list[int]:
        req = request([5, 6, 7], greedy(6), adapters[2])
        req.on_finish = lambda: finished.append(req.request_id)
        return [e.token_id async for e in scheduler.generate(req)]

    assert asyncio.run(main()) == reference_generate(base, adapters[2], [5, 6, 7], 6)[0]
    assert len(ttft) == 1 and len(itl) == 5 and len(finished) == 1


class Stuck:
    """A grammar matcher whose second mask allows no token (a dead end), or raises (a broken matcher)."""

    family = None

    def __init__(self, broken: bool) -> None:
        self.broken, self.masks = broken, 0

    def fill_mask(self, row: torch.Tensor) -> None:
        self.masks += 1
        if self.masks == 2 and self.broken:
            raise RuntimeError("matcher broke")
        row.fill_(0 if self.masks == 2 else -1)

    def advance(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize(("broken", "error"), [(False, GrammarDeadEnd), (True, GenerationFailed)])
def test_a_grammar_dead_end_reaches_the_client_as_its_own_error(engine, broken, error) -> None:
    """A grammar that cannot go on is the request's fault: raised as itself (422 grammar_dead_end), not as a server
    error; a broken matcher stays one."""
    scheduler = Scheduler(engine, max_queue=4)
    req = request([5, 6], greedy(8))
    req.grammar = Stuck(broken)

    async def main() -> list[int | None]:
        return [e.token_id async for e in scheduler.generate(req)]

    with pytest.raises(error) as raised:
        asyncio.run(main())
    assert raised.value.http_status == (422 if error is GrammarDeadEnd else 500)


def test_leaving_early_cancels_and_full_queue_refuses(engine) -> None:
    scheduler = Scheduler(engine, max_queue=0)

    async def main() -> None:
        with pytest.raises(QueueFull):
            scheduler.submit(request([5], greedy(4)))
        scheduler.max_queue = 8
        stream = scheduler.submit(request([5, 6], greedy(50)))
        await anext(stream)
        await stream.aclose()
        for _ in range(200):
            if engine.num_running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the cancelled request kept its row")

    asyncio.run(main())


def test_mailbox_wakes_the_loop_once_a_burst_and_keeps_each_streams_order(monkeypatch) -> None:
    """What the engine thread posts while the loop is busy (a step's events) arrives in one wakeup, each queue's
    events in the order posted; a later burst wakes the loop again."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakeups = []
        original = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *args: wakeups.append(1) or original(*args))
        mailbox = Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]

        def engine_steps(first: int, steps: int) -> None:
            for step in range(first, first + steps):
                for i, queue in enumerate(queues):
                    mailbox.post(queue, TokenEvent(f"r{i}", step, step, "", None, 3))

        for first, bursts in ((0, 1), (3, 2)):
            thread = threading.Thread(target=engine_steps, args=(first, 3))
            thread.start()
            thread.join()  # the loop is blocked meanwhile: every post of the three steps is one burst
            got = [[(await asyncio.wait_for(queue.get(), 5)).index for _ in range(3)] for queue in queues]
            assert got == [[first, first + 1, first + 2]] * 4
            assert len(wakeups) == bursts
            assert all(queue.empty() for queue in queues)

    asyncio.run(main())


def test_an_adapter_past_its_share_of_the_queue_is_refused_while_others_are_queued(family_setup, tokenizer) -> None:
    """One adapter (the base model counts as one) may hold max_queue_per_adapter waiting requests: its next gets
    AdapterQueueFull while other adapters' requests still queue, up to max_queue in all. `check` (before the
    adapter's name resolves to a key) bounds the whole queue only; `submit` bounds the share."""
    base, adapters = family_setup("llama")
    a, b = adapters[0], adapters[1]
    engine = make_engine(base, tokenizer, max_batch_size=2)  # not started: whatever is submitted waits
    scheduler = Scheduler(engine, max_queue=5, max_queue_per_adapter=2)

    async def main() -> None:
        for i in range(2):
            scheduler.submit(request([5, 6], greedy(2), a, f"a{i}"))
        scheduler.check(request([5, 6], greedy(2)))  # the key is not known yet: only the whole queue counts
        with pytest.raises(AdapterQueueFull) as refused:
            scheduler.submit(request([5, 6], greedy(2), a, "a2"))
        assert refused.value.http_status == 429 and refused.value.headers == {"Retry-After": "1"}
        assert a.key in str(refused.value) and "--max-queue-per-adapter" in str(refused.value)
        scheduler.submit(request([5, 6], greedy(2), b, "b0"))
        for i in range(2):
            scheduler.submit(request([5, 6], greedy(2), None, f"base{i}"))
        with pytest.raises(QueueFull):  # five waiting: the whole queue's bound comes first
            scheduler.submit(request([5, 6], greedy(2), b, "b1"))
        assert engine.waiting_counts() == {a.key: 2, b.key: 1, None: 2}
        engine.cancel("base0")
        engine.step()  # applies the cancel; a0 and b0 take the two rows
        assert engine.waiting_counts() == {a.key: 1, None: 1}
        scheduler.submit(request([5, 6], greedy(2), None, "base2"))
        with pytest.raises(AdapterQueueFull, match="the base model"):
            scheduler.submit(request([5, 6], greedy(2), None, "base3"))
        scheduler.submit(request([5, 6], greedy(2), a, "a3"))

    asyncio.run(main())
    run_to_end(engine)
    assert engine.waiting_counts() == {} and engine.num_waiting == 0


def test_a_request_the_engine_refuses_takes_no_other_clients_place(family_setup, tokenizer) -> None:
    """A full queue of one client's requests, and another client's request that the engine refuses as it is submitted
    (its adapter's rank is past max_lora_rank: checked once the adapter is known): the refused request takes no place,
    every queued request stays and runs. Before, the place was taken first: the flood's newest ended with 429
    queue_full for a request that never waited."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=1, max_lora_rank=8)  # not started: the flood waits
    scheduler = Scheduler(engine, max_queue=3)

    def of(client: str, waiting: GenerationRequest) -> GenerationRequest:
        waiting.client = client
        return waiting

    async def main() -> list[str | None]:
        flood = [scheduler.submit(of("flood", request([5, 6], greedy(2), None, f"f{i}"))) for i in range(3)]
        with pytest.raises(AdapterTooLarge):
            scheduler.submit(of("other", request([5, 6], greedy(2), adapters[3], "too-large")))  # rank 16
        assert engine.num_waiting == 3
        run_to_end(engine)
        return [[event async for event in stream][-1].finish_reason for stream in flood]

    assert asyncio.run(main()) == ["length"] * 3
    assert engine.waiting_counts() == {} and engine.num_waiting == 0
