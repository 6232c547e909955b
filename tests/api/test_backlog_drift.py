"""--max-unsent-mb's running totals (ConnectionCap: streams' backlogs, behind connections' unsent bytes) return to zero
once every request has ended, however it ended: a path that adds bytes and never takes them off creeps over days of
honest traffic until the budget looks full, and every connection that pauses for a moment is reset."""

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from budgeted import Budgeted as Served
from budgeted import serve_budgeted, settled

from server.engine.sampling import SamplingParams

BUDGET = 256 << 20  # never reached here: no connection is reset by it
SHARE = 2  # requests under way for one client (its address): a third choice of one request is refused


@pytest.fixture(scope="module")
def served(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("drift")
    with serve_budgeted(tiny_model_dirs["llama"], tmp, BUDGET, 256, max_requests_per_client=SHARE) as server:
        yield server


NO_EOS = {"2": -100}  # no EOS (id 2, tests/tiny.py): each choice runs to its max_tokens
COMPLETION = {"model": "", "prompt": "hello", "max_tokens": 24, "logit_bias": NO_EOS}
CHAT = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "logit_bias": NO_EOS}
TGI = {"inputs": "hello", "parameters": {"max_new_tokens": 24, "top_n_tokens": 3}}


def request_bytes(path: str, body: dict | bytes, *, close: bool = False) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + data
    )


def transport_from(address: str) -> httpx.HTTPTransport:
    """Connections from `address` (a client of its own), with a small window: the server's writes pause."""
    return httpx.HTTPTransport(local_address=address, socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])


def read_slowly(response: httpx.Response) -> None:
    """Read a little at a time: the server's writes pause, and its connection falls behind."""
    for _ in response.iter_bytes(1024):
        time.sleep(0.02)


def connect(served: Served, address: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes pause
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", served.port))
    sock.settimeout(30)
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 24) -> bytes:
    received = b""
    while marker not in received and len(received) < limit:
        if not (chunk := sock.recv(4096)):
            break
        received += chunk
    return received


def abandon(served: Served, address: str, path: str, body: dict, marker: bytes | None, pause: float = 0) -> None:
    """A stream whose client closes its socket: at once (marker None), or once `marker` came, after `pause`."""
    sock = connect(served, address)
    try:
        sock.sendall(request_bytes(path, {**body, "stream": True}))
        if marker is not None:
            read_until(sock, marker)
        time.sleep(pause)
    finally:
        sock.close()


def keep_alive(served: Served, address: str, rounds: int) -> None:
    """One connection carrying requests in sequence: streamed and not, n > 1 with logprobs, prompts scored, refused
    ones."""
    transport = transport_from(address)
    with httpx.Client(base_url=served.url, transport=transport, timeout=60) as client:
        for i in range(rounds):
            client.post("/generate", json=TGI)
            client.post("/v1/completions", json={**COMPLETION, "n": 2, "logprobs": 5})
            with client.stream(
                "POST", "/v1/completions", json={**COMPLETION, "n": 2, "logprobs": 5, "stream": True}
            ) as r:
                assert r.status_code == 200, r.read()
                assert b"[DONE]" in r.read()
            with client.stream("POST", "/generate_stream", json=TGI) as r:
                assert r.status_code == 200, r.read()
                for _ in r.iter_bytes(256):
                    time.sleep(0.002 * (i % 2))  # now and then a client that reads a little slowly
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True,
                                                                   "top_logprobs": 3}) as r:  # fmt: skip
                assert r.status_code == 200, r.read()
                read_slowly(r)
            # the prompt scored, in vLLM's shape and an echoed prompt's legacy logprobs
            scored = {**COMPLETION, "n": 2, "echo": True, "logprobs": 5, "prompt_logprobs": 5, "stream": True}
            with client.stream("POST", "/v1/completions", json=scored) as r:
                assert r.status_code == 200, r.read()
                read_slowly(r)
            # refused: a prompt past max_seq_len, max_tokens past it, a streamed best_of, a body that is no JSON
            assert client.post("/v1/completions", json={**COMPLETION, "prompt": "hello " * 2000}).status_code >= 400
            assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": 100_000}).status_code >= 400
            params = {**TGI["parameters"], "best_of": 2, "do_sample": True}
            assert client.post("/generate_stream", json={**TGI, "parameters": params}).status_code >= 400
            assert (
                client.post("/generate", content=b"{", headers={"content-type": "application/json"}).status_code >= 400
            )


def pipelined(served: Served, address: str) -> None:
    """Two requests sent at once on one connection, both answered; then a third whose client leaves mid-way."""
    sock = connect(served, address)
    try:
        sock.sendall(request_bytes("/generate", TGI) + request_bytes("/v1/completions", {**COMPLETION, "stream": True}))
        assert b"[DONE]" in read_until(sock, b"[DONE]")
        sock.sendall(request_bytes("/v1/completions", {**COMPLETION, "n": 2, "logprobs": 5, "stream": True}))
        read_until(sock, b"data:")
    finally:
        sock.close()


def aborted(served: Served, address: str) -> None:
    """Requests their clients never finish sending: half a head, half a body."""
    sock = connect(served, address)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    sock.close()
    sock = connect(served, address)
    whole = request_bytes("/v1/completions", COMPLETION)
    sock.sendall(whole[: len(whole) - 10])
    time.sleep(0.05)
    sock.close()


def more_choices_than_the_share(served: Served, address: str) -> None:
    """n = 3 past the client's share of 2: the first two choices open, the third is refused, on a connection kept
    alive afterwards (streamed and not)."""
    transport = transport_from(address)
    with httpx.Client(base_url=served.url, transport=transport, timeout=60) as client:
        for stream in (True, False, True):
            body = {**COMPLETION, "max_tokens": 480, "n": 3, "logprobs": 5, "stream": stream}
            assert client.post("/v1/completions", json=body).status_code == 429
        client.post("/generate", json=TGI)


def slow_stream(client: httpx.Client) -> None:
    body = {**COMPLETION, "max_tokens": 60, "n": 2, "logprobs": 5, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        read_slowly(r)


def test_totals_return_to_zero_however_requests_end(served: Served) -> None:
    """Many requests on several keep-alive connections, streams abandoned before their first event, mid-way and
    after their last event, n > 1 with logprobs, refused ones, non-streaming ones, pipelined and aborted ones: once
    all have ended, the backlogs and the unsent bytes counted are exactly zero, and no connection is behind, while
    the keep-alive connections are still open (closing a connection forgets what it held)."""
    cap, scheduler = served.cap, served.app.state.runtime.scheduler
    addresses = [f"127.0.0.{i}" for i in range(2, 40)]
    jobs: list[Callable[[], None]] = []
    for k in range(4):
        jobs.append(lambda a=addresses[k]: keep_alive(served, a, 3))
    for k in range(4, 16):
        address = addresses[k]
        path, body = [
            ("/generate_stream", {**TGI, "parameters": {**TGI["parameters"], "max_new_tokens": 200}}),
            ("/v1/completions", {**COMPLETION, "max_tokens": 200, "n": 2, "logprobs": 5}),
            ("/v1/chat/completions", {**CHAT, "max_tokens": 200}),
        ][k % 3]
        marker = [None, b"data:", b'"finish_reason":"length"', b"data:"][k % 4]
        pause = 0.05 * (k % 2)
        jobs.append(lambda a=address, p=path, b=body, m=marker, s=pause: abandon(served, a, p, b, m, s))
    for k in range(16, 20):
        jobs.append(lambda a=addresses[k]: pipelined(served, a))
    for k in range(20, 22):
        jobs.append(lambda a=addresses[k]: aborted(served, a))
    jobs.append(lambda: more_choices_than_the_share(served, addresses[22]))

    # keep-alive connections left open while the totals are read: they must hold nothing once idle
    transports = [transport_from(a) for a in addresses[30:33]]
    idle = [httpx.Client(base_url=served.url, transport=t, timeout=60) for t in transports]
    try:
        with ThreadPoolExecutor(len(idle)) as pool:  # read slowly, their writes pause: they fall behind
            list(pool.map(slow_stream, idle))
        with ThreadPoolExecutor(len(jobs)) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        for client in idle:  # and more each, after the rest: a third choice refused (the first two opened) among them
            client.post(
                "/v1/completions", json={**COMPLETION, "max_tokens": 480, "n": 3, "logprobs": 5, "stream": True}
            )
            client.post("/v1/completions", json={**COMPLETION, "n": 2, "logprobs": 5})
            with client.stream("POST", "/generate_stream", json=TGI) as r:
                read_slowly(r)

        settled(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
        # every connection but the idle ones lost (the aborted ones' heads time out only at 30 s: closed by their
        # clients, they are lost at once)
        settled(lambda: cap.open == len(idle))
        assert (cap.backlogs, cap.unsent_bound, dict(cap.behind)) == (0, 0, {})
        assert [c.backlog for c in cap.waiting] == [0] * len(idle)
    finally:
        for client in idle:
            client.close()
    settled(lambda: cap.open == 0)
    assert (cap.backlogs, cap.unsent_bound, dict(cap.behind), dict(cap.per_client)) == (0, 0, {}, {})


def trickle(served: Served, address: str, body: dict) -> bool:
    """A stream read 256 bytes every 0.1 s (never stalling): whether the server reset it."""
    sock = connect(served, address)
    try:
        sock.sendall(request_bytes("/v1/completions", {**body, "stream": True}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if not sock.recv(256):
                    return False
            except ConnectionResetError:
                return True
            time.sleep(0.1)
        return False
    finally:
        sock.close()


def test_totals_return_to_zero_after_the_cap_resets_connections(served: Served) -> None:
    """Past the budget the slowest readers are reset, their requests cancelled: what they held counts no more, and the
    totals are exactly zero once the rest have ended, a keep-alive connection still open."""
    cap, scheduler = served.cap, served.app.state.runtime.scheduler
    slow = {**COMPLETION, "max_tokens": 400, "n": 2, "logprobs": 20}  # ~3 MB of events estimated, past 1 MiB
    with httpx.Client(base_url=served.url, transport=transport_from("127.0.0.60"), timeout=60) as kept:
        slow_stream(kept)
        cap.max_unsent = 1 << 20
        try:
            with ThreadPoolExecutor(3) as pool:
                resets = list(pool.map(lambda a: trickle(served, a, slow), ["127.0.0.61", "127.0.0.62", "127.0.0.63"]))
        finally:
            cap.max_unsent = BUDGET
        assert any(resets)
        kept.post("/v1/completions", json={**COMPLETION, "n": 2, "logprobs": 5})
        settled(lambda: scheduler.running == 0 and scheduler.queue_depth == 0 and cap.open == 1)
        assert (cap.backlogs, cap.unsent_bound, dict(cap.behind)) == (0, 0, {})
    settled(lambda: cap.open == 0)
    assert (cap.backlogs, cap.unsent_bound, dict(cap.behind), dict(cap.per_client)) == (0, 0, {}, {})


def test_an_opened_stream_closed_unread_cancels_its_request(served: Served) -> None:
    """A stream opened (its first event come) and closed before it was read, as open_streams closes the choices it
    opened when a later one is refused: closing it cancels its request then, not once nothing refers to it (till
    then the request ran for nobody, its events counted on a connection kept alive)."""
    runtime = served.app.state.runtime
    httpx.post(f"{served.url}/generate", json=TGI, timeout=60)  # the scheduler's mailbox: on the server's loop
    loop = runtime.scheduler._mailbox.loop
    cancelled = runtime.metrics.requests.labels("-", "499")

    async def open_and_close() -> tuple[float, object]:
        before = cancelled._value.get()
        sampling = SamplingParams(max_new_tokens=480, ignore_eos=True)
        opened = await runtime.inference.open_stream(runtime.inference.encode("hello"), sampling, None)
        await opened.aclose()  # type: ignore[attr-defined]
        return cancelled._value.get() - before, opened  # held: only its closing may end the request

    count, _ = asyncio.run_coroutine_threadsafe(open_and_close(), loop).result(60)
    assert count == 1
