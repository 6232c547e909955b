"""Worker threads that serve their clients in turn: each client's jobs wait in a queue of its own, and a free thread
takes the next job of the client after the one it served last. A client's job then waits behind at most one job of
each other client with work waiting, not behind the whole backlog of one client that sent a thousand."""

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
_Job = tuple[Future, Callable[[], object]]


class FairPool:
    def __init__(self, threads: int, name: str) -> None:
        # clients with jobs waiting, the one to serve next first; a served client goes to the back
        self._queues: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._cv = threading.Condition()
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, client: Hashable, fn: Callable[[], T]) -> "Future[T]":
        """`fn()` on a thread, in `client`'s turn; its future can be cancelled while it waits."""
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._queues.setdefault(client, deque()).append((future, fn))
            self._cv.notify()
        return future

    def withdraw(self, client: Hashable, count: Callable[[list[Future]], int]) -> list[Future]:
        """Take `client`'s newest waiting jobs out of the pool, as many as `count` says of their futures (newest first,
        none running), in one hold of the lock: none can start meanwhile. Their futures are the caller's to settle."""
        with self._cv:
            jobs = self._queues.get(client)
            if not jobs:
                return []
            taken = count([future for future, _ in reversed(jobs)])
            withdrawn = [jobs.pop()[0] for _ in range(taken)]
            if not jobs:
                del self._queues[client]
            return withdrawn

    def shutdown(self) -> None:
        """Cancel what waits; the jobs running end on their own."""
        with self._cv:
            self._closed = True
            waiting, self._queues = self._queues, OrderedDict()
            self._cv.notify_all()
        for jobs in waiting.values():
            for future, _ in jobs:
                future.cancel()

    def _next(self) -> _Job | None:
        with self._cv:
            while True:
                while not self._queues and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                client, jobs = self._queues.popitem(last=False)
                job = jobs.popleft()
                if jobs:
                    self._queues[client] = jobs  # behind every other client waiting
                if job[0].set_running_or_notify_cancel():  # False: cancelled while it waited
                    return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            future, fn = job
            try:
                result = fn()
            except BaseException as exc:  # the caller's to see, through its future
                future.set_exception(exc)
            else:
                future.set_result(result)
