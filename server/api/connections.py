"""Deadlines on connections that uvicorn does not keep: every request is served on h11 through this protocol.

uvicorn keeps forever a connection whose client sent part of a request head and then nothing more (slowloris),
and one whose client stopped reading its response (a stream nobody reads holds its whole answer in memory, and
its connection, after the request has ended). Each held connection is a file descriptor: hundreds of them and
the process cannot accept an honest client, nor open a file. Here a head must arrive whole within
--head-timeout-s (30 s: hyper's default, as TGI serves), on a new connection as on one kept alive (which replaces
uvicorn's keep-alive timeout), and a response the client accepts no byte of for --stall-timeout-s (60 s: nginx's
send_timeout) is reset: the route hears the client leave, which cancels its request.

Deadlines bound how long each connection is held, not how many are: clients that open connections faster than
the deadline closes them held every descriptor the process had. ConnectionCap bounds their number (nginx's
worker_connections): past it, a new connection closes the one that has waited longest for a request head (idle
between requests, or sending its head slowly), as nginx reuses its idle keep-alive connections when it runs out,
so that a flood of silent connections cannot lock out a client with a request; when every connection has a
request under way, the new one is closed. A share for each peer address (nginx's limit_conn) keeps one client
from holding every connection with requests it sends slowly.

Neither bounds the memory that answers waiting for their clients hold: each connection's unsent bytes wait in its
write buffer until the stall deadline, or for as long as its client takes a few bytes now and then, and an answer
with logprobs of 8 choices is ~30 MB. A stream's write buffer holds about one event: the rest of its answer waits as
events in its request's queue, its backlog (server/backlog.py), made at the engine's speed, and a client that takes a
few bytes before each stall deadline holds it for as long as it likes. The bytes of every connection behind its
answer, unsent and in its backlog, count against one budget (--max-unsent-mb); past it, the connections whose clients
took the fewest bytes a second since they fell behind are reset (their requests cancelled, as a client that leaves
cancels its own), a connection behind for less than UNSENT_GRACE_S last (its client has had no time to read). A
connection is behind from when its writes pause until they resume with its backlog empty.

A request that is not HTTP (a bad request line, header or framing) never reaches the app: h11 refuses it here,
and uvicorn would answer in plain text. It gets the app's JSON error body instead, as every other 4xx does."""

import asyncio
import contextlib
import fcntl
import json
import logging
import resource
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_body
from server.backlog import current_backlog
from server.client_share import peer_client

HEAD_TIMEOUT_S = 30.0  # the defaults of --head-timeout-s and --stall-timeout-s
STALL_TIMEOUT_S = 60.0
NR_OPEN = 1 << 20  # Linux's default ceiling on a process's descriptors, where the hard limit is unlimited
FILES_RESERVE = 256  # descriptors kept from connections for the process's own files (adapters, logs, the store)
CAP_LOG_EVERY_S = 10.0
UNSENT_GRACE_S = 1.0  # a connection behind for less than this is reset past the budget last

log = logging.getLogger("loraplex")


def raise_open_files_limit() -> int:
    """The process's soft limit on open descriptors raised to its hard limit (as nginx's worker_rlimit_nofile and
    systemd's services do), returning it. At the common soft limit of 1,024, clients re-opening connections as the
    head deadline closes them (a thousand every 30 s) held every descriptor: honest clients then timed out, and
    every accept failed. The deadlines bound each connection's time; this, how many the process can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a ceiling below the hard limit (a container's): keep what there is
            return soft
        return target
    return soft


def connections_allowed(max_connections: int, open_files_limit: int) -> int:
    """--max-connections, within the descriptors the process may open less those kept for its files."""
    if open_files_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, open_files_limit - FILES_RESERVE))


@dataclass(slots=True)
class Behind:
    """A connection behind its answer."""

    since: float  # when it fell behind
    taken: int  # bytes its client has taken since then, up to when `unsent` was read
    unsent: int  # bytes in its write buffer when last read: at least those there now (none are written while paused)
    paused: bool = True  # its writes paused; once they resume it is behind until its backlog is written


class ConnectionCap:
    """One server's open connections: how many there may be, in all and from one peer address, those waiting for a
    request head, the longest waiting first (a dict keeps the order its keys were set in), and those behind their
    answers, with the bytes they may hold unsent and in their streams' backlogs in all.

    Both totals are kept as they change, so that an event costs O(1): the backlogs' exactly (as estimated), the unsent
    bytes as a bound (each behind connection's when last read), read again only where the two are past the budget."""

    def __init__(self, max_connections: int, max_per_client: int | None = None, max_unsent: int | None = None) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.max_unsent = max_unsent
        self.waiting: dict[DeadlineH11Protocol, None] = {}
        self.behind: dict[DeadlineH11Protocol, Behind] = {}
        self.unsent_bound = 0  # the sum of behind connections' `unsent`: at least the bytes they hold unsent
        self.backlogs = 0  # bytes of streams' backlogs in every connection (as estimated)
        self._unsent_resets = 0
        self._unsent_logged_at = -CAP_LOG_EVERY_S
        self.per_client: Counter[str] = Counter()
        self.open = 0  # connections made and not yet lost, those closing included
        self.on_close: Callable[[], None] | None = None  # called for each connection the cap closes (a metric)
        self._closed = 0
        self._logged_at = -CAP_LOG_EVERY_S

    def admit(self, new: "DeadlineH11Protocol", open_connections: int) -> None:
        """Called as `new` opens, waiting for its head: past its peer's share, close `new`; past the cap, close the
        connection waiting longest, which is `new` itself when every other one has a request under way."""
        self.open += 1
        self.per_client[new.peer] += 1
        if self.max_per_client is not None and self.per_client[new.peer] > self.max_per_client:
            self._close(new)
        elif open_connections > self.max_connections:
            while True:  # `new` waits, so one that is not closing yet is found
                oldest = next(iter(self.waiting))
                if not oldest.transport.is_closing():
                    break
                del self.waiting[oldest]
            if oldest is new:  # every other connection has a request under way: one the server is already ending
                # (still sending to a client that reads slowly, or not at all) makes room before `new` is refused
                oldest = next((c for c in new.connections if c is not new and c.transport.is_closing()), new)
            self._close(oldest)

    def fell_behind(self, protocol: "DeadlineH11Protocol") -> None:
        """Called as `protocol` has bytes left unsent (its writes paused): past the budget, reset connections (see
        `_shed`)."""
        behind = self.behind.get(protocol)
        if behind is None:  # else behind still: its writes resumed, and paused again before its backlog was written
            behind = self.behind[protocol] = Behind(time.monotonic(), 0, 0)
        unsent = protocol.unsent()
        self.unsent_bound += unsent - behind.unsent
        behind.unsent, behind.paused = unsent, True
        self._check()

    def caught_up(self, protocol: "DeadlineH11Protocol") -> None:
        """Called as `protocol`'s writes resume, its write buffer empty: caught up, unless its backlog still waits."""
        behind = self.behind.get(protocol)
        if behind is None:
            return
        behind.taken += behind.unsent
        self.unsent_bound -= behind.unsent
        behind.unsent, behind.paused = 0, False
        if protocol.backlog <= 0:
            del self.behind[protocol]

    def backlog_changed(self, protocol: "DeadlineH11Protocol", nbytes: int) -> None:
        """Called as `nbytes` more (fewer where negative) of `protocol`'s stream wait in its backlog."""
        self.backlogs += nbytes
        if nbytes > 0:
            self._check()
        elif protocol.backlog <= 0 and (behind := self.behind.get(protocol)) is not None and not behind.paused:
            del self.behind[protocol]  # its backlog written, and its write buffer empty: caught up

    def _check(self) -> None:
        if self.max_unsent is not None and self.backlogs + self.unsent_bound > self.max_unsent:
            self._shed()

    def _shed(self) -> None:
        """Past the budget, reset the connections whose clients took the fewest bytes a second since they fell
        behind, those behind for less than UNSENT_GRACE_S last and the newest of them first, until the rest fit."""
        assert self.max_unsent is not None
        now = time.monotonic()
        for c, behind in self.behind.items():  # what each holds unsent now, and so what its client has taken
            if behind.unsent:
                unsent = c.unsent()
                behind.taken += behind.unsent - unsent
                self.unsent_bound -= behind.unsent - unsent
                behind.unsent = unsent
        held = self.backlogs + self.unsent_bound
        if held <= self.max_unsent:
            return

        def first_reset(c: DeadlineH11Protocol) -> tuple[bool, float, float]:
            behind = self.behind[c]
            if now - behind.since < UNSENT_GRACE_S:
                return True, 0.0, -behind.since
            return False, behind.taken / (now - behind.since), behind.since

        while held > self.max_unsent and self.behind:
            victim = min(self.behind, key=first_reset)
            held -= self.behind[victim].unsent + victim.backlog
            self._forget(victim)
            victim.reset()
            self._unsent_resets += 1
        if self._unsent_resets and now - self._unsent_logged_at >= CAP_LOG_EVERY_S:  # (none behind: none reset)
            log.warning(
                "reset %d connections whose clients read their answers slowest: past --max-unsent-mb (%d MiB) of "
                "answers waiting for their clients",
                self._unsent_resets,
                self.max_unsent >> 20,
            )
            self._unsent_logged_at, self._unsent_resets = now, 0

    def _forget(self, protocol: "DeadlineH11Protocol") -> None:
        """`protocol` holds nothing against the budget from now on (it is reset, or lost)."""
        behind = self.behind.pop(protocol, None)
        if behind is not None:
            self.unsent_bound -= behind.unsent
        self.backlogs -= protocol.backlog
        protocol.backlog = 0
        protocol.counted = False

    def release(self, protocol: "DeadlineH11Protocol") -> None:
        self.open -= 1
        self.waiting.pop(protocol, None)
        self._forget(protocol)
        self.per_client[protocol.peer] -= 1
        if not self.per_client[protocol.peer]:
            del self.per_client[protocol.peer]

    def _close(self, protocol: "DeadlineH11Protocol") -> None:
        self.waiting.pop(protocol, None)
        protocol.end()
        if self.on_close is not None:
            self.on_close()
        self._closed += 1
        if (now := time.monotonic()) - self._logged_at >= CAP_LOG_EVERY_S:  # a flood is one line every 10 s
            log.warning(
                "closed %d connections: past --max-connections (%d) the one waiting longest for a request head, or "
                "a new one while every other had a request under way; past --max-connections-per-client (%s) a "
                "new one",
                self._closed,
                self.max_connections,
                self.max_per_client,
            )
            self._logged_at, self._closed = now, 0


class DeadlineH11Protocol(H11Protocol):
    head_timeout_s = HEAD_TIMEOUT_S
    stall_timeout_s = STALL_TIMEOUT_S
    cap: ConnectionCap | None = None  # one server's: set on the class that server_protocol makes
    peer = ""  # the peer address; a Unix socket's has none
    backlog = 0  # bytes of its stream's events waiting to be written (server/backlog.py, as estimated)
    counted = True  # its backlog counts against the cap's budget: until it is reset or lost
    _head_timer: asyncio.TimerHandle | None = None
    _stall_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The app serves no websocket: an upgrade request is served as plain HTTP. uvicorn's websocket handover (with
        # a websocket library installed) took the connection out of its set without connection_lost, so the cap
        # kept counting it: 16 upgrades shut their address out.
        self.ws_protocol_class = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every byte the kernel does not take waits under the stall deadline. At asyncio's 64 KiB a client that
        # stopped reading with less than that unsent was never timed; a close then waits for those bytes forever
        # and the connection, never lost, held its place under the cap.
        transport.set_write_buffer_limits(high=0)
        if self.client:
            self.peer = peer_client(self.client[0])  # an IPv6 host's /64 is one client
        self._await_head()
        if self.cap is not None:
            self.cap.admit(self, len(self.connections))

    def handle_events(self) -> None:
        # a request's task starts here (uvicorn creates it with a copy of this context): its streams' backlogs
        # count on this connection
        token = current_backlog.set(self)
        try:
            super().handle_events()
        finally:
            current_backlog.reset(token)
        if self.cap is not None and self.cycle is not None and not self.cycle.response_complete:
            self.cap.waiting.pop(self, None)  # a whole head: a request under way

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next head has its own deadline
            # in place of uvicorn's keep-alive timeout (5 s): clients keep an idle connection about as long (httpx
            # 5 s, undici 4 s), so one that closed at 5 s crossed requests sent on it, each failed with a reset
            self._unset_keepalive_if_required()
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.cap is not None:
            self.cap.release(self)
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.stall_timeout_s, self._stalled, self.unsent())
        if self.cap is not None:
            self.cap.fell_behind(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self.cap is not None:
            self.cap.caught_up(self)

    def add(self, nbytes: int) -> None:
        """`nbytes` more (fewer where negative) of this connection's stream wait in its backlog (server/backlog.py)."""
        if self.counted:
            self.backlog += nbytes
            if self.cap is not None:
                self.cap.backlog_changed(self, nbytes)

    def unsent(self) -> int:
        """Bytes of the answer in this process's write buffer, not yet taken by the kernel."""
        return self.transport.get_write_buffer_size()

    def _stalled(self, unsent_before: int) -> None:
        # reset when the client accepted no byte since the deadline was set; a slow reader's deadline starts again
        if (unsent := self.unsent()) < unsent_before:
            self._stall_timer = self.loop.call_later(self.stall_timeout_s, self._stalled, unsent)
        else:
            self.reset()

    def end(self) -> None:
        """Close the connection; reset it when bytes for the client are still unsent (here or in the kernel), which
        a close would keep trying to deliver to a client that reads none: for minutes in the kernel, and here
        until the stall deadline."""
        sock = self.transport.get_extra_info("socket")
        try:
            in_kernel = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] if sock else 0
        except OSError:  # not a TCP socket on Linux: only asyncio's own buffer is known
            in_kernel = 0
        if self.unsent() or in_kernel:
            self.reset()
        else:
            self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn logged two warnings for every request with an Upgrade header: a log any client could flood

    def reset(self) -> None:
        # A reset, not a close (nginx's reset_timedout_connection): a closed socket outlives its descriptor in the
        # kernel, holding its unsent bytes and retrying a client that accepts none for minutes; a linger of 0 makes
        # the close discard them and send RST.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already: the abort has nothing left to discard
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        body = error_body(
            "malformed HTTP request: the request line, a header or the body's framing is not valid HTTP/1.1 "
            "(check the client's Content-Length or chunked encoding and the header names)",
            "invalid_request_error",
            "malformed_http",
        )
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):  # fmt: skip
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)
        if self.cap is not None and (self.cycle is None or self.cycle.response_complete):  # not a pipelined request
            self.cap.waiting.pop(self, None)
            self.cap.waiting[self] = None  # the newest wait

    def _head_overdue(self) -> None:
        # No request under way: no whole head since the deadline was set (a head starts a cycle, complete only once
        # its answer went out, which sets a new deadline), or the rest of a body whose answer went out (a 413).
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.end()


def server_protocol(
    max_connections: int,
    max_per_client: int | None = None,
    max_unsent: int | None = None,
    head_timeout_s: float = HEAD_TIMEOUT_S,
    stall_timeout_s: float = STALL_TIMEOUT_S,
) -> type[DeadlineH11Protocol]:
    """The protocol of one server, its connections capped at `max_connections`, `max_per_client` from one peer
    address, the bytes of answers waiting for their clients at `max_unsent` in all (None: no budget), a request
    head due within `head_timeout_s` and a response's client reset after `stall_timeout_s` without taking a byte."""
    cap = ConnectionCap(max_connections, max_per_client, max_unsent)
    attributes = {"cap": cap, "head_timeout_s": head_timeout_s, "stall_timeout_s": stall_timeout_s}
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), attributes)
