"""Connection deadlines on a real uvicorn server over real sockets (a tiny model, deadlines of a second): a
client that never finishes its request head, or stops reading its stream, loses its connection, while honest
streams on the same server run longer than either deadline and keep their answers."""

import asyncio
import contextlib
import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app, wait_ready
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.api import intake
from server.api.connections import (
    HEAD_TIMEOUT_S,
    NR_OPEN,
    STALL_TIMEOUT_S,
    DeadlineH11Protocol,
    connections_allowed,
    raise_open_files_limit,
    server_protocol,
)
from server.app import create_app
from server.client_share import peer_client
from server.metrics import Metrics

DEADLINE_S = 1.0
MIB = 1 << 20


@pytest.fixture(scope="module")
def url(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("connections")
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=512, max_batch_size=4)
    listening = socket.socket()
    # a send buffer of a few KiB (as a slow network has): a client that stops reading stalls the server's writes
    # within kilobytes, not the megabytes loopback would buffer
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listening.bind(("127.0.0.1", 0))
    # the deadlines as --head-timeout-s and --stall-timeout-s set them (server/cli.py)
    short = server_protocol(1024, head_timeout_s=DEADLINE_S, stall_timeout_s=DEADLINE_S)
    with serve_app(create_app(settings, base=base), http=short, sock=listening) as url:
        wait_ready(url)
        yield url


def connect(url: str, first_bytes: bytes, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(first_bytes)
    return sock


def read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, bool] | None:
    """What the server sent before it ended the connection and whether it ended it with a reset, or None if it has
    not ended it within `seconds`."""
    sock.settimeout(0.2)
    received = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not (chunk := sock.recv(1 << 16)):
                return bytes(received), False
            received += chunk
        except ConnectionResetError:
            return bytes(received), True
        except TimeoutError:
            pass
    return None


HONEST = {"inputs": "hello", "parameters": {"max_new_tokens": 200, "top_n_tokens": 5}}


async def honest_stream(url: str) -> tuple[list[str], float]:
    """A stream read slowly but steadily, for longer than the deadlines: its events, and how long it took."""
    start = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{url}/generate_stream", json=HONEST) as r,
    ):
        assert r.status_code == 200
        lines = []
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                lines.append(json.loads(line.removeprefix("data:"))["token"]["id"])
                await asyncio.sleep(0.01)
    return lines, time.monotonic() - start


def test_a_request_head_that_never_ends_loses_its_connection(url: str) -> None:
    alone, _ = asyncio.run(honest_stream(url))
    partial = [connect(url, b"POST /generate HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
    # a kept-alive connection whose second head stops halfway
    kept = connect(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")
    together, took = asyncio.run(honest_stream(url))
    assert together == alone and took > DEADLINE_S
    for sock in [*partial, kept]:
        with contextlib.closing(sock):
            assert read_until_closed(sock, 5 * DEADLINE_S) is not None


def test_a_stream_nobody_reads_loses_its_connection(url: str) -> None:
    alone, _ = asyncio.run(honest_stream(url))
    # no EOS (id 2, tests/tiny.py): 500 tokens, each with 20 alternatives
    never_ends = {"model": "", "prompt": "hello", "max_tokens": 500, "logprobs": 20, "logit_bias": {"2": -100}}
    body = json.dumps({**never_ends, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    unread = [connect(url, f"{head}\r\n\r\n".encode() + body, receive_buffer=4096) for _ in range(4)]
    together, took = asyncio.run(honest_stream(url))
    assert together == alone and took > DEADLINE_S
    time.sleep(2 * DEADLINE_S)  # unread for longer than the deadline: the server has dropped it, unfinished
    for sock in unread:
        with contextlib.closing(sock):
            ended = read_until_closed(sock, 5 * DEADLINE_S)
            assert ended is not None
            # a reset: the kernel dropped what the client never read, rather than resend it to a closed window
            received, reset = ended
            assert reset and received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received


def trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    """One byte of body at a time on each, each well within any wait between reads, until the server ends it."""
    while not stop.wait(DEADLINE_S / 4):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b" ")


def test_a_body_that_never_ends_loses_its_connection(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "BODY_TIMEOUT_S", DEADLINE_S)
    alone, _ = asyncio.run(honest_stream(url))
    head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    stalled = [
        connect(url, f"{head}Content-Length: 1000\r\n\r\n".encode() + b'{"inputs": "hi"}'),  # shorter than said
        connect(url, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b'10\r\n{"inputs": "hi"}\r\n'),  # no end
        connect(url, f"{head}Content-Length: 100000\r\n\r\n".encode() + b'{"inputs": "'),  # trickled
    ]
    # refused at once (413), then trickled: the rest of its body is never read
    refused = connect(url, f"{head}Content-Length: {100 << 20}\r\n\r\n".encode())
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=([stalled[-1], refused], stop))
    trickler.start()
    together, took = asyncio.run(honest_stream(url))
    assert together == alone and took > DEADLINE_S
    answers = []
    for sock in [*stalled, refused]:
        with contextlib.closing(sock):
            ended = read_until_closed(sock, 5 * DEADLINE_S)
            assert ended is not None
            head_bytes, _, body = ended[0].partition(b"\r\n\r\n")
            answers.append((head_bytes.split()[1], json.loads(body)["error"]["code"]))
    stop.set()
    trickler.join()
    assert answers == [(b"408", "request_timeout")] * len(stalled) + [(b"413", "request_too_large")]


class KeepAliveShorterThanHead(DeadlineH11Protocol):
    """uvicorn's keep-alive timeout shorter than the head deadline, as its 5 s is than HEAD_TIMEOUT_S."""

    head_timeout_s = 2 * DEADLINE_S

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.timeout_keep_alive = DEADLINE_S / 4


def test_an_idle_kept_alive_connection_waits_for_its_next_head_as_long_as_a_new_one() -> None:
    """uvicorn closed a connection idle for 5 s, as long as clients keep one (httpx's expiry): a request a client
    sent on it as it closed failed with a reset. An idle connection now waits the head deadline for its next request,
    and is closed past it."""
    with serve_app(small_app(), http=KeepAliveShorterThanHead) as url:
        client = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
        for _ in range(2):  # the second on the same connection, idle for four times uvicorn's keep-alive
            client.request("GET", "/ping")
            assert json.loads(client.getresponse().read()) == {"pong": True}
            time.sleep(DEADLINE_S)
        with contextlib.closing(client.sock):
            assert read_until_closed(client.sock, 2 * KeepAliveShorterThanHead.head_timeout_s) == (b"", False)


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", b"POST /generate HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n",
     b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"],
)  # fmt: skip
def test_a_request_that_is_not_http_gets_a_json_error(url: str, request_bytes: bytes) -> None:
    """h11 refuses the first three before the app sees them, the request guard the one whose length is both
    Content-Length and chunked (a proxy reading the other would see the request smuggled after it); the answer is
    the app's JSON error body, the connection is closed (nothing after it is served), and the server keeps serving."""
    with contextlib.closing(connect(url, request_bytes)) as sock:
        answer = read_until_closed(sock, 10)
    assert answer is not None, "the connection was not closed"
    head, _, body = answer[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "malformed_http"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """`loraplex serve` raises its soft limit on descriptors: each held connection is one, and at a soft limit of
    1,024 re-opened connections held them all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == (hard if hard != resource.RLIM_INFINITY else NR_OPEN)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def small_app() -> FastAPI:
    app = FastAPI()
    app.get("/ping")(lambda: {"pong": True})

    @app.get("/count")
    async def count() -> StreamingResponse:
        async def numbers():
            for i in range(20):
                await asyncio.sleep(0.05)
                yield f"{i}\n"

        return StreamingResponse(numbers())

    @app.post("/length")
    async def length(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    app.get("/big")(lambda: {"text": "x" * 40_000})  # under asyncio's 64 KiB write buffer limit
    app.get("/mib")(lambda: Response(b"x" * MIB))  # a large answer, as logprobs of many choices make
    return app


def test_past_the_cap_a_silent_connection_makes_room(caplog: pytest.LogCaptureFixture) -> None:
    """Connections that never send a request, far past --max-connections, beside a stream in flight: each new one
    closes the one silent longest, so a client with a request still gets in, the stream ends whole, and the log
    says so once, not once a connection."""
    with serve_app(small_app(), http=server_protocol(8)) as url:
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=10) as client, client.stream("GET", "/count") as stream:
            silent = [connect(url, b"") for _ in range(40)]
            time.sleep(0.2)
            answers = [httpx.get(f"{url}/ping", timeout=10).json() for _ in range(3)]
            lines = list(stream.iter_lines())
        assert answers == [{"pong": True}] * 3 and lines == [str(i) for i in range(20)]
        assert read_until_closed(silent[0], 5) == (b"", False)  # the longest silent
        assert read_until_closed(silent[-1], 0.5) is None  # the newest: still open
        assert http.client.HTTPConnection("127.0.0.1", port, timeout=10).request("GET", "/ping") is None
        for sock in silent:
            sock.close()
    capped = [r for r in caplog.records if "--max-connections" in r.getMessage()]
    assert len(capped) == 1 and capped[0].levelname == "WARNING"


def scraped(metrics: Metrics, name: str) -> float | None:
    """The value of sample `name` in the metrics as /metrics renders them."""
    families = text_string_to_metric_families(metrics.render().decode())
    samples = (sample for family in families for sample in family.samples)
    return next((sample.value for sample in samples if sample.name == name), None)


def test_the_metrics_count_open_connections_and_those_the_cap_closed() -> None:
    """Twenty silent connections against a cap of eight: eight stay open and twelve were closed by the cap, as the
    scrape says; once the clients close theirs, none is open."""
    metrics = Metrics()
    protocol = server_protocol(8)
    metrics.watch_connections(protocol.cap)
    with serve_app(small_app(), http=protocol) as url:
        silent = [connect(url, b"") for _ in range(20)]
        deadline = time.monotonic() + 10
        counts = ("loraplex_open_connections", "loraplex_connections_closed_by_cap_total")
        while [scraped(metrics, name) for name in counts] != [8, 12]:
            assert time.monotonic() < deadline, [scraped(metrics, name) for name in counts]
            time.sleep(0.05)
        for sock in silent:
            sock.close()
        while scraped(metrics, "loraplex_open_connections") != 0:
            assert time.monotonic() < deadline, scraped(metrics, "loraplex_open_connections")
            time.sleep(0.05)


def test_past_the_cap_with_every_connection_busy_the_new_one_is_closed() -> None:
    """Four connections of a cap of four each in the middle of a request (its body half sent): a fifth is closed
    unanswered, and the four requests, finished, get their answers."""
    with serve_app(small_app(), http=server_protocol(4)) as url:
        head = b"POST /length HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\n"
        busy = [connect(url, head + b"12345") for _ in range(4)]
        time.sleep(0.2)
        with contextlib.closing(connect(url, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")) as late:
            assert read_until_closed(late, 5) in {(b"", False), (b"", True)}
        for sock in busy:
            with contextlib.closing(sock):
                sock.sendall(b"67890")
                answer = read_until_closed(sock, 5)
                assert answer is not None and answer[0].startswith(b"HTTP/1.1 200")
                assert answer[0].endswith(b'{"length":10}')


def test_past_its_share_a_peers_new_connection_is_closed_and_others_get_in() -> None:
    """One peer address holding its share of connections, each in the middle of a request: its next connection is
    closed unanswered, another address's is answered, and the first peer's requests, finished, get theirs."""
    with serve_app(small_app(), http=server_protocol(64, max_per_client=4)) as url:
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /length HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\n"
        busy = [connect(url, head + b"12345") for _ in range(4)]
        time.sleep(0.2)
        ping = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with contextlib.closing(connect(url, ping)) as late:
            assert read_until_closed(late, 5) in {(b"", False), (b"", True)}
        other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        with contextlib.closing(other):
            other.sendall(ping)
            answer = read_until_closed(other, 5)
            assert answer is not None and answer[0].endswith(b'{"pong":true}')
        for sock in busy:
            with contextlib.closing(sock):
                sock.sendall(b"67890")
                answer = read_until_closed(sock, 5)
                assert answer is not None and answer[0].endswith(b'{"length":10}')
        with contextlib.closing(connect(url, ping)) as again:  # its connections closed: its share is free
            answer = read_until_closed(again, 5)
            assert answer is not None and answer[0].endswith(b'{"pong":true}')


def test_a_client_that_stops_reading_loses_its_connection_and_its_place() -> None:
    """Clients that stop reading with less than 64 KiB of their answer unsent: asyncio's own write buffer never
    paused, so no stall deadline ran, and the close that followed (the head deadline's, or uvicorn's after
    `Connection: close`) waited for those bytes forever: the connections were never lost and held the cap, so every
    new client was refused. They are reset, and a client with a request gets in."""

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes little of the answer
    listening.bind(("127.0.0.1", 0))
    with serve_app(small_app(), http=server_protocol(3, head_timeout_s=DEADLINE_S, stall_timeout_s=DEADLINE_S),
                   sock=listening) as url:  # fmt: skip
        big = b"GET /big HTTP/1.1\r\nHost: x\r\n"
        unread = [
            connect(url, big + b"\r\n", receive_buffer=4096),
            connect(url, big + b"Connection: close\r\n\r\n", receive_buffer=4096),
            connect(url, (big + b"\r\n") * 2, receive_buffer=4096),  # pipelined
        ]
        time.sleep(4 * DEADLINE_S)
        assert httpx.get(f"{url}/ping", timeout=10).json() == {"pong": True}
        for sock in unread:
            with contextlib.closing(sock):
                ended = read_until_closed(sock, 5 * DEADLINE_S)
                assert ended is not None and ended[1], "not reset"


def test_a_client_reading_slowly_but_steadily_gets_its_whole_answer() -> None:
    """The stall deadline resets a client that accepted no byte since it was set, not one whose answer takes longer
    than it to drain: 40 KB read 4 KiB at a time, over twice the deadline."""

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listening.bind(("127.0.0.1", 0))
    with serve_app(small_app(), http=server_protocol(3, stall_timeout_s=DEADLINE_S), sock=listening) as url:
        sock = connect(url, b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", receive_buffer=4096)
        with contextlib.closing(sock):
            received, start = bytearray(), time.monotonic()
            while chunk := sock.recv(4096):
                received += chunk
                time.sleep(DEADLINE_S / 4)
        assert time.monotonic() - start > 2 * DEADLINE_S and received.endswith(b'"}')
        assert json.loads(received.partition(b"\r\n\r\n")[2]) == {"text": "x" * 40_000}


def test_answers_nobody_reads_are_bounded_in_all() -> None:
    """Clients that read none of a large answer each held it whole in the server's memory until the stall deadline,
    and for as long as they liked taking a few bytes now and then: a flood of them (an answer with logprobs of 8
    choices is ~30 MB) held gigabytes. Past the budget the server resets the connections whose clients took the
    fewest bytes a second since they fell behind; a client that reads gets its whole answer meanwhile."""
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes little of the answer
    listening.bind(("127.0.0.1", 0))
    # the stall deadline's default (60 s): only the budget ends a connection within this test
    with serve_app(small_app(), http=server_protocol(64, max_unsent=3 * MIB), sock=listening) as url:
        unread = [connect(url, b"GET /mib HTTP/1.1\r\nHost: x\r\n\r\n", receive_buffer=4096) for _ in range(3)]
        time.sleep(1.5)  # fallen behind for longer than a fresh answer's grace
        later = [connect(url, b"GET /mib HTTP/1.1\r\nHost: x\r\n\r\n", receive_buffer=4096) for _ in range(2)]
        assert httpx.get(f"{url}/mib", timeout=10).content == b"x" * MIB
        ended = [read_until_closed(sock, 2) for sock in [*unread, *later]]
        for sock in [*unread, *later]:
            sock.close()
    resets = [e is not None and e[1] for e in ended]
    # 6 MiB asked for, 3 MiB held: the first three, behind longest at no rate, make room for the newer answers
    assert resets == [True, True, True, False, False]


def test_an_upgrade_request_is_served_as_plain_http_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn logged two warnings for every request naming an upgrade (a log anyone could flood) and, with a
    websocket library installed, handed the connection over without releasing its place under the cap."""
    with serve_app(small_app(), http=server_protocol(8, max_per_client=1)) as url:
        upgrade = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n"
        for _ in range(3):  # one connection at a time from this address, its share
            with contextlib.closing(connect(url, upgrade)) as sock:
                answer = read_until_closed(sock, 5)
                assert answer is not None and answer[0].endswith(b'{"pong":true}')
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_cap_leaves_descriptors_for_files() -> None:
    assert connections_allowed(4096, 1024) == 1024 - 256
    assert connections_allowed(100, 1024) == 100
    assert connections_allowed(4096, resource.RLIM_INFINITY) == 4096


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:abcd:1234:5678", True),  # one host's /64: any address in it
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),  # the next /64: another site's
        ("fe80::1%eth0", "fe80::2%eth1", True),  # link-local, with zones
        ("::ffff:192.0.2.7", "192.0.2.7", True),  # IPv4-mapped: the IPv4 address
        ("2002:c000:207:1::1", "2002:c000:207:ffff::1", True),  # 6to4: an IPv4 host's /48, 2**16 /64s
        ("2002:c000:207::1", "192.0.2.7", True),  # 6to4: the IPv4 address it embeds
        ("2002:c000:207::1", "2002:c000:208::1", False),
        ("192.0.2.7", "192.0.2.8", False),
        ("127.0.0.1", "127.0.0.1", True),
    ],
)
def test_a_peers_share_is_its_ipv4_address_or_its_ipv6_64(first: str, second: str, same: bool) -> None:
    """Both per-client shares (connections here, requests and uploads through auth.client_of) count a peer as one
    client: an IPv6 host, given a /64, could otherwise open each connection from a new address, endless clients."""
    assert (peer_client(first) == peer_client(second)) is same
    assert peer_client("") == "" and peer_client("not an address") == "not an address"


def test_the_settings_default_deadlines_are_the_protocols():
    """A protocol made without them (tools, tests) keeps a server's default deadlines."""
    fields = Settings.model_fields
    assert (fields["head_timeout_s"].default, fields["stall_timeout_s"].default) == (HEAD_TIMEOUT_S, STALL_TIMEOUT_S)
