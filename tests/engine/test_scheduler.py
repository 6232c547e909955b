"""The asyncio facade over a running engine thread."""

import asyncio

import pytest
from enginekit import greedy, make_engine, reference_generate, request

from server.engine import QueueFull
from server.scheduler import LatencyHooks, Scheduler


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
