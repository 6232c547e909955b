"""Each client's share of the server (--max-requests-per-client): its requests under way, counted from before
their prompts are tokenized until they leave the engine (their grammars compiling and adapters loading included),
and its /tokenize and /detokenize jobs, so that one client's flood can take neither the queue nor the tokenizer's
or the grammar compiler's threads that every client shares."""

import ipaddress
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from loraplex.errors import LoraplexError

# The client a request is made for (an API key's digest, or a peer address on a server without keys): the API layer
# sets it for each HTTP request (auth.require_inference, auth.require_admin); the tokenizer, the scheduler and the
# upload slots count its work against it
current_client: ContextVar[str | None] = ContextVar("current_client", default=None)
# Whose cached prompt prefixes a request may start from (the engine's prefix cache), and whose compiled grammars it
# may take (grammar.py): those of requests with the same salt. The API layer sets it to the API key's digest on a
# server with keys (what is cached answers sooner, which would tell one key's users what another's asked) and adds
# the request's own cache_salt; None: shared by all
prefix_salt: ContextVar[str | None] = ContextVar("prefix_salt", default=None)
# The HTTP request a unit of work is for (the API layer sets a new token for each): the runs of one request (its
# choices, its prompts) share what it holds, as one request (mixing.py's mix places); None: not known
current_request: ContextVar[object | None] = ContextVar("current_request", default=None)


# An IPv6 host is given a whole /64 by its network (RFC 6177's smallest end-site prefix, what SLAAC addresses live
# in): any of its 2**64 addresses is one client's, or a single host could be endless clients
IPV6_CLIENT_PREFIX = 64


def peer_client(host: str) -> str:
    """The client a peer address is: an IPv4 address (an IPv4-mapped or 6to4 IPv6 one as the IPv4 address it
    carries) as itself, an IPv6 address as its /64 network; anything else (a Unix socket's name) as given."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # a link-local address may carry its zone
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.sixtofour is not None:  # 2002::/16: one IPv4 host's /48, 2**16 /64s
            return str(address.sixtofour)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class ClientShareFull(LoraplexError):
    """The client (an API key, or a peer address on a server without keys) has max_requests_per_client requests
    under way already: one client's flood must not take what every client shares."""

    http_status = 429
    code = "client_share_full"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant

    def __init__(self, max_requests_per_client: int) -> None:
        super().__init__(
            f"this client (its API key, or its address on a server without keys) has {max_requests_per_client} "
            "requests being tokenized, compiling a grammar, loading an adapter, waiting or running, the most one "
            "client may have at once (--max-requests-per-client): retry when one finishes, or send fewer at once"
        )


class ClientShares:
    """At most `share` units of work under way for each client (current_client); None: no share. Past it,
    `refusal(share)` is raised. Held from any thread, released from any other (the engine's, the tokenizer's)."""

    def __init__(self, share: int | None, refusal: Callable[[int], LoraplexError] = ClientShareFull) -> None:
        self.share = share
        self._refusal = refusal
        self._held: dict[str, int] = {}  # client -> its units under way; a client with none has no entry
        self._lock = threading.Lock()

    def check(self) -> None:
        """The refusal where the current client's share is used up (read without the lock: `hold` counts under
        it)."""
        client = current_client.get()
        if self.share is not None and client is not None and self._held.get(client, 0) >= self.share:
            raise self._refusal(self.share)

    def hold(self) -> Callable[[], None]:
        """Count one unit against the current client (the refusal past its share); returns its release, which may
        be called more than once."""
        client = current_client.get()
        with self._lock:
            self.check()
            if self.share is None or client is None:
                return lambda: None
            self._held[client] = self._held.get(client, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._held[client] - 1
                if left:
                    self._held[client] = left
                else:
                    del self._held[client]

        return release

    @property
    def holders(self) -> int:
        """How many clients hold units now."""
        return len(self._held)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """One unit held for the block (`hold`), released however it ends."""
        release = self.hold()
        try:
            yield
        finally:
            release()
