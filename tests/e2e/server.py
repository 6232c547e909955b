"""A real `loraplex serve` process on a free loopback port, an app served by uvicorn in this process, and the
published clients, for end-to-end tests."""

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

REPO = Path(__file__).resolve().parents[2]
INFERENCE_KEY, ADMIN_KEY = "user-secret", "admin-secret"  # the keyed server's (conftest.py)
KEYED_CONNECTIONS = 384  # the keyed server's --max-connections: above its tokenizing flood's 300 requests
CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"  # made by `make test`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log: Path, *args: str, startup_timeout: float = 300) -> Iterator[str]:
    """Start `loraplex serve ARGS` and yield its base URL once /ready answers 200; stop it with Ctrl-C."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {startup_timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_app(
    app: FastAPI, http: type[asyncio.Protocol] | str = "auto", sock: socket.socket | None = None
) -> Iterator[str]:
    """`app` served by uvicorn in this process on a free local port: real connections, which a client can drop.
    Its log records reach the root logger (pytest's caplog), uvicorn's own included. `http`: uvicorn's protocol
    (the server's own, with its deadlines); `sock`: a bound socket to listen on (one with small buffers, say)."""
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None, http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join()


def wait_ready(url: str, seconds: float = 60) -> None:
    """Until the server's /ready says 200 (its model loaded and warmed up)."""
    deadline = time.monotonic() + seconds
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, f"{url} was not ready within {seconds:g} s"
        time.sleep(0.05)


def embedded_server(tmp: Path, cache_dir: Path, *flags: str) -> contextlib.AbstractContextManager[str]:
    """running_server on the embedded model on the CPU, its log (`server.log`) and adapter store under `tmp`."""
    return running_server(
        tmp / "server.log", "--cache-dir", str(cache_dir), "--adapter-dir", str(tmp / "adapters"), "--device", "cpu",
        *flags,
    )  # fmt: skip


def run_published_clients(url: str, prompt: str, max_new_tokens: int, adapter: str | None = None) -> dict:
    """What text-generation and lorax-client get from the server (see clients/tgi_clients.py)."""
    if not CLIENTS_PYTHON.exists():
        pytest.skip("the client venv is made by `make test`")
    script = Path(__file__).parent / "clients" / "tgi_clients.py"
    args = [str(CLIENTS_PYTHON), str(script), url, prompt, str(max_new_tokens), *([adapter] if adapter else [])]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)
