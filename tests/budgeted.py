"""A server whose answers waiting for slow clients are bounded (--max-unsent-mb), for the tests of that budget."""

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from e2e.server import serve_app, wait_ready
from fastapi import FastAPI

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.api.connections import ConnectionCap, server_protocol
from server.app import create_app


@dataclass
class Budgeted:
    url: str
    port: int
    app: FastAPI
    cap: ConnectionCap


@contextlib.contextmanager
def serve_budgeted(model_dir: Path, tmp: Path, budget: int, connections: int, **settings: object) -> Iterator[Budgeted]:
    """The tiny model at `model_dir` served (fp32, CPU) with `budget` bytes for answers waiting for their clients,
    on a socket whose send buffer takes a few KiB (as a slow network's does): a client that reads slowly pauses the
    server's writes within kilobytes. The stall deadline is the default's (60 s): within a test only the budget
    ends a connection."""
    base = load_base_model(str(model_dir), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32)
    defaults: dict[str, object] = {"device": "cpu", "max_seq_len": 512, "max_batch_size": 8}
    app = create_app(Settings(adapter_dir=tmp / "store", cache_dir=tmp, **defaults | settings), base=base)
    protocol = server_protocol(connections, max_unsent=budget)
    assert protocol.cap is not None
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listening.bind(("127.0.0.1", 0))
    with serve_app(app, http=protocol, sock=listening) as url:
        wait_ready(url)
        yield Budgeted(url, listening.getsockname()[1], app, protocol.cap)


def settled(until: Callable[[], bool], seconds: float = 60) -> None:
    """Wait until `until()` holds: the server's own state after a client is done settles on the server's loop, as
    it handles the connection's last writes and its close, a moment after the client has read its answer."""
    deadline = time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, "the server did not settle"
        time.sleep(0.05)
