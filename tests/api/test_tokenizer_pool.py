"""The tokenizer's backlog: a flood of tokenizing is refused past its budget of characters, short prompts pass,
and every job, run or cancelled, gives its characters back."""

import asyncio
import threading

import pytest

from server.tokenizer_pool import BACKLOG_CHARS, TokenizerBusy, TokenizerPool


def test_text_past_the_budget_is_refused_and_comes_back_when_done() -> None:
    async def flood() -> None:
        pool = TokenizerPool(max_text_chars=BACKLOG_CHARS // 4, threads=1)
        gate = threading.Event()
        try:
            held = [asyncio.ensure_future(pool.run(BACKLOG_CHARS // 4, gate.wait)) for _ in range(4)]  # 1 runs
            await asyncio.sleep(0.05)
            assert pool.backlog_chars == BACKLOG_CHARS
            with pytest.raises(TokenizerBusy, match=f"{BACKLOG_CHARS} characters are waiting"):
                await pool.run(1, len, "x")  # even one character more
            held[3].cancel()  # its client left before its job started: the job is dropped, its text given back
            await asyncio.sleep(0.05)
            assert pool.backlog_chars == 3 * BACKLOG_CHARS // 4
            short = asyncio.ensure_future(pool.run(5, len, "short"))  # a short prompt fits beside the long ones
            await asyncio.sleep(0.05)
            assert not short.done() and pool.backlog_chars == 3 * BACKLOG_CHARS // 4 + 5
            gate.set()
            assert await asyncio.gather(*held[:3], short) == [True, True, True, 5]
            assert pool.backlog_chars == 0
        finally:
            gate.set()
            pool.close()

    asyncio.run(flood())


def test_as_many_of_the_longest_texts_as_threads_always_fit() -> None:
    pool = TokenizerPool(max_text_chars=BACKLOG_CHARS, threads=2)
    try:
        assert pool.budget_chars == 2 * BACKLOG_CHARS
    finally:
        pool.close()
