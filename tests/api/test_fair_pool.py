"""The clients' turns on shared worker threads: a client's job waits behind one job of each other client at most."""

import threading

import pytest

from server.fair_pool import FairPool


def test_clients_take_turns_and_a_cancelled_job_never_runs() -> None:
    pool = FairPool(1, "test-fair")
    gate, started, order = threading.Event(), threading.Event(), []
    first = pool.submit("a", lambda: started.set() or gate.wait())  # holds the only thread while the others queue
    assert started.wait(5)
    jobs = [pool.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(4)]
    jobs.append(pool.submit("b", lambda: order.append("b0")))
    jobs.append(pool.submit("b", lambda: order.append("b1")))
    jobs[1].cancel()  # a1: cancelled while it waits
    gate.set()
    first.result(5)
    for job in jobs:
        if not job.cancelled():
            job.result(5)
    assert order == ["a0", "b0", "b1", "a2", "a3"]  # a1's turn went with it
    pool.shutdown()


def test_a_jobs_error_reaches_its_future_and_shutdown_cancels_what_waits() -> None:
    pool = FairPool(1, "test-fair")
    with pytest.raises(ZeroDivisionError):
        pool.submit("b", lambda: 1 / 0).result(5)
    gate, started = threading.Event(), threading.Event()
    running = pool.submit("a", lambda: started.set() or gate.wait())
    assert started.wait(5)
    waiting = pool.submit("c", lambda: "never")
    pool.shutdown()
    assert waiting.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("a", lambda: None)
    gate.set()
    assert running.result(5) is True  # a job running ends on its own


def test_withdraw_takes_a_clients_newest_waiting_jobs_as_counted_and_nothing_running() -> None:
    pool = FairPool(1, "test-fair")
    gate, started, order, offered = threading.Event(), threading.Event(), [], []
    running = pool.submit("a", lambda: started.set() or gate.wait())
    assert started.wait(5)
    assert pool.withdraw("a", lambda waiting: 1) == []  # its one job runs: nothing waits to withdraw
    jobs = [pool.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(4)]
    other = pool.submit("b", lambda: order.append("b0"))
    assert pool.withdraw("a", lambda waiting: offered.append(waiting) or 0) == []  # counted none: none taken
    assert offered == [jobs[::-1]]  # newest first
    assert pool.withdraw("a", lambda waiting: 2) == [jobs[3], jobs[2]] and pool.withdraw("c", lambda w: 1) == []
    gate.set()
    running.result(5)
    for job in (*jobs[:2], other):
        job.result(5)
    assert order == ["a0", "b0", "a1"] and not jobs[2].done() and not jobs[3].done()  # the caller's to settle
    pool.shutdown()
