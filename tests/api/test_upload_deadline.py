"""The adapter upload's least rate on a real uvicorn server over real sockets (a tiny model, a window of a second):
uploads trickled a byte at a time, holding every upload slot, are ended with 408 and leave nothing in the store,
while an honest upload sent slowly but steadily for longer than the window is stored."""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app, wait_ready
from fastapi import FastAPI
from peft_dirs import make_peft_dir

from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.api import intake
from server.api.connections import DeadlineH11Protocol
from server.app import create_app

WINDOW_S = 1.0
WINDOW_BYTES = 1024
SLOTS = 2


@pytest.fixture
def served(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, FastAPI, Path]]:
    """The server's url, its app and its store's directory."""
    monkeypatch.setattr(intake, "UPLOAD_WINDOW_S", WINDOW_S)
    monkeypatch.setattr(intake, "UPLOAD_WINDOW_BYTES", WINDOW_BYTES)
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(
        adapter_dir=tmp_path / "store", cache_dir=tmp_path, device="cpu", max_seq_len=512, max_concurrent_uploads=SLOTS
    )
    app = create_app(settings, base=base)
    with serve_app(app, http=DeadlineH11Protocol) as url:
        wait_ready(url)
        yield url, app, tmp_path / "store"


def slow_upload(url: str, name: str) -> socket.socket:
    """An upload whose weights then come a byte at a time: its head and first part arrive at once."""
    head = (
        "POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    body = (
        f'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n--B\r\n'
        f'Content-Disposition: form-data; name="weights"; filename="{WEIGHTS_FILE}"\r\n\r\n'
    )
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall((head + body).encode())
    return sock


def trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    """Four bytes a second on each (the least rate is a KiB a second), until the server ends it."""
    while not stop.wait(0.25):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"x")


def answer_of(sock: socket.socket, seconds: float) -> tuple[bytes, str] | None:
    """The status and error code the server answered before it closed the connection; None if not closed in time."""
    sock.settimeout(0.2)
    received = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:  # a byte trickled after the server closed: it has answered already
            chunk = b""
        if not chunk:
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            return head.split()[1], json.loads(body)["error"]["code"]
        received += chunk
    return None


def steady(body: bytes) -> Iterator[bytes]:
    """Twice the least rate: slow, but never under it."""
    for start in range(0, len(body), WINDOW_BYTES):
        time.sleep(WINDOW_S / 2)
        yield body[start : start + WINDOW_BYTES]


def test_trickled_uploads_are_ended_and_free_their_slots(served: tuple[str, FastAPI, Path], tmp_path: Path) -> None:
    url, app, store = served
    peft = make_peft_dir(tmp_path / "honest")
    files = {
        field: (file, (peft / file).read_bytes())
        for field, file in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE))
    }
    honest = httpx.Request("POST", f"{url}/v1/adapters", data={"name": "honest"}, files=files)
    body = honest.read()
    assert len(body) > 3 * WINDOW_BYTES  # sent over longer than the window

    slow = [slow_upload(url, f"slow{i}") for i in range(SLOTS)]
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(slow, stop))
    trickler.start()
    try:
        deadline = time.monotonic() + 5
        while app.state.uploads.taken < SLOTS:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = httpx.post(f"{url}/v1/adapters", content=body, headers=honest.headers)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_uploads"
        assert [answer_of(sock, 5 * WINDOW_S) for sock in slow] == [(b"408", "request_timeout")] * SLOTS
    finally:
        stop.set()
        trickler.join()
        for sock in slow:  # a server that kept them would wait for them when it stops
            sock.close()
    assert app.state.uploads.taken == 0

    started = time.monotonic()
    stored = httpx.post(
        f"{url}/v1/adapters",
        content=steady(body),
        headers={"content-type": honest.headers["content-type"]},
        timeout=60,
    )
    assert stored.status_code == 201, stored.text
    assert time.monotonic() - started > 2 * WINDOW_S
    listed = httpx.get(f"{url}/v1/adapters").json()
    assert [entry["name"] for entry in listed["data"]] == ["honest"]
    assert not [path for path in store.rglob("*") if "slow" in path.name]
