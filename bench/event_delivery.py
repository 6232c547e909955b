"""The engine thread's cost of handing a step's events to the event loop: one `call_soon_threadsafe` per event
(before) against the scheduler's Mailbox (one per burst). CPU only; the figures are relative.

python bench/event_delivery.py --streams 32 --steps 2000
"""

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from server.engine import TokenEvent
from server.scheduler import Mailbox


async def engine_thread_us(per_event: bool, streams: int, steps: int) -> float:
    """Microseconds the posting thread spends a step while the loop consumes every stream's queue."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[TokenEvent]] = [asyncio.Queue() for _ in range(streams)]
    mailbox = Mailbox(loop)
    event = TokenEvent("r", 0, 1, "x", None, 3)
    spent = 0.0

    def engine() -> None:
        nonlocal spent
        for _ in range(steps):
            start = time.perf_counter()
            for queue in queues:
                if per_event:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                else:
                    mailbox.post(queue, event)
            spent += time.perf_counter() - start
            time.sleep(0.0005)  # the next step's forward

    thread = threading.Thread(target=engine)
    thread.start()
    for queue in queues:
        for _ in range(steps):
            await queue.get()
    thread.join()
    return spent / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    for name, per_event in (("per event", True), ("mailbox", False)) * 2:
        us = asyncio.run(engine_thread_us(per_event, args.streams, args.steps))
        print(f"{name:9s}: {us:6.0f} us of the engine thread a step of {args.streams} events", flush=True)


if __name__ == "__main__":
    main()
