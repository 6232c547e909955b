"""The KV cache's rows and the prompt prefixes they hold (automatic prefix caching).

A row's keys and values stay valid after its request ends, until the row is written again. A new request whose
prompt starts with tokens that a row holds, in the same scope, starts its prefill past them: in that row itself when
it is free (nothing is copied), else in a free row that the running row's tokens are copied into. A scope is what
else the keys and values depend on: the adapter (its LoRA changes every layer's hidden states) and a salt that keeps
one client's prefixes from another's (a cached prefix answers sooner, which tells a client what others have asked).

Prefixes are found in blocks of BLOCK tokens through a chain of hashes, one dict lookup a block, and a hit is then
checked token by token: a client could choose tokens whose hashes collide. Free rows are written over blank ones first,
then the least recently used of the client that holds the most free rows (client: an API key's digest, or a peer
address): so a client sending one prompt after another recycles its own rows while it holds more of them than
anyone, where plain LRU let it evict every other client's prefixes with one request per row.

A request whose prompt shares at least a block more with a prompt being prefilled than any row holds yet waits for
that prefill (worth_waiting) instead of computing the same tokens beside it: a burst of requests with one long
instruction prompt computes it once, where each would have taken its share of every step's prompt budget.
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from heapq import heappop, heappush

BLOCK = 16  # tokens of a hashed block: a prefix shorter than one block is not looked for

Scope = Hashable


@dataclass
class _Held:
    scope: Scope
    tokens: list[int]  # the row's tokens: its KV holds tokens[:length]
    length: int = 0
    chain: list[int] = field(default_factory=list)  # hash of tokens[: BLOCK * (i + 1)], for the row's full blocks


@dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its row, and the prompt tokens it need not compute, already in the row
    (source None) or to be copied there from the running row `source`."""

    row: int
    reused: int = 0
    source: int | None = None


class KVRows:
    """The free rows and the prefixes held by every row (engine thread only). `enabled` False: no prefix is looked
    for or kept, and a row goes out lowest first."""

    def __init__(self, rows: int, enabled: bool) -> None:
        self.enabled = enabled
        self._blank = list(range(rows))  # a heap of free rows that hold nothing
        # free rows that hold a prefix, least recently used first, and the client whose request left each; the
        # count of each client's
        self._idle: OrderedDict[int, Hashable] = OrderedDict()
        self._idle_per_client: dict[Hashable, int] = {}
        self._held: dict[int, _Held] = {}  # rows (running or idle) that hold a prefix
        self._index: dict[tuple[Scope, int], dict[int, None]] = {}  # (scope, chain hash) -> rows holding that prefix
        self._filling: dict[int, tuple[Scope, list[int]]] = {}  # rows still prefilling: their scope and prompt
        # prompts found worth waiting: id(prompt) -> (prompt, the row prefilling for it, the tokens it will share);
        # and the ids waiting for each row, forgotten when its prefill ends
        self._waits: dict[int, tuple[list[int], int, int]] = {}
        self._waiters: dict[int, list[int]] = {}

    @property
    def free(self) -> int:
        return len(self._blank) + len(self._idle)

    def take(self, scope: Scope, prompt: list[int], reuse: bool = True) -> Placement:
        """A free row for a request (the caller checks `free` first), with the longest prefix of `prompt` that a row
        holds in `scope`, short of the prompt's last token (its logits are the request's first token). `reuse`
        False: no prefix is looked for (a request scoring its prompt computes every position's logits); what the
        row writes may still serve later prompts."""
        row, reused = self._longest(scope, prompt, len(prompt) - 1) if self.enabled and reuse else (None, 0)
        if row is not None and row in self._idle:
            self._unidle(row)
            self._drop(row)
            place = Placement(row, reused)
        else:
            target = heappop(self._blank) if self._blank else self._unidle(self._to_evict())
            self._drop(target)
            place = Placement(target, reused, row)
        if self.enabled:
            self._waits.pop(id(prompt), None)
            self._filling[place.row] = (scope, prompt)
        return place

    def worth_waiting(self, scope: Scope, prompt: list[int]) -> bool:
        """Whether a prompt being prefilled will hold at least a block more of `prompt` than any row holds now. A
        prompt found worth waiting is remembered with the row it waits for, until that row's prefill ends: asked
        again every step, it costs a lookup, where comparing and hashing it each time cost ~16 ms a step for a
        thousand waiting prompts of a thousand tokens."""
        if not self.enabled:
            return False
        known = self._waits.get(id(prompt))
        if known is not None and known[0] is prompt and self._length(known[1]) + BLOCK <= known[2]:
            return True
        self._waits.pop(id(prompt), None)
        limit, row, coming = len(prompt) - 1, -1, 0
        for other_row, (other_scope, other) in self._filling.items():
            if other_scope == scope:
                shared = _shared(other, prompt, limit)
                if shared - self._length(other_row) >= BLOCK and shared > coming:
                    row, coming = other_row, shared
        if not coming or self._longest(scope, prompt, limit)[1] + BLOCK > coming:
            return False
        self._waits[id(prompt)] = (prompt, row, coming)
        self._waiters.setdefault(row, []).append(id(prompt))
        return True

    def _length(self, row: int) -> int:
        """What a row prefilling holds (its prompts waiting are forgotten once its prefill ends: _filled)."""
        held = self._held.get(row)
        return held.length if held is not None else 0

    def wrote(self, row: int, scope: Scope, tokens: list[int], length: int) -> None:
        """`row`'s KV holds tokens[:length] now (`tokens` may grow past it: the row's own list)."""
        if not self.enabled:
            return
        held = self._held.get(row)
        if held is None:
            held = self._held[row] = _Held(scope, tokens)
        held.tokens, held.length = tokens, length
        filling = self._filling.get(row)
        if filling is not None and length >= len(filling[1]):
            self._filled(row)
        previous = held.chain[-1] if held.chain else 0
        for start in range(BLOCK * len(held.chain), length - BLOCK + 1, BLOCK):
            previous = hash((previous, *tokens[start : start + BLOCK]))
            held.chain.append(previous)
            self._index.setdefault((scope, previous), {})[row] = None

    def give_back(self, row: int, keep: bool, client: Hashable = None) -> None:
        """The row's request, `client`'s, has ended; `keep`: what it wrote (wrote()) is valid and may serve later
        requests."""
        self._filled(row)
        held = self._held.get(row)
        if keep and held is not None and held.chain:  # one whole block at least: a row of less serves no prompt
            self._idle[row] = client
            self._idle_per_client[client] = self._idle_per_client.get(client, 0) + 1
        else:
            self._drop(row)
            heappush(self._blank, row)

    def _longest(self, scope: Scope, prompt: list[int], limit: int) -> tuple[int | None, int]:
        """(a row holding the longest prefix of prompt[:limit] in `scope`, its length); of rows alike, a free one (it
        needs no copy)."""
        rows: dict[int, None] = {}
        blocks, previous = 0, 0
        for start in range(0, limit - BLOCK + 1, BLOCK):
            previous = hash((previous, *prompt[start : start + BLOCK]))
            found = self._index.get((scope, previous))
            if found is None:
                break
            rows, blocks = found, blocks + 1
        hashed = BLOCK * blocks
        ranked = []
        for row in rows:  # each row's match past the hashed blocks, up to a block's worth of tokens
            held, matched = self._held[row], hashed
            end = min(limit, held.length)
            while matched < end and held.tokens[matched] == prompt[matched]:
                matched += 1
            ranked.append((-matched, row not in self._idle, row))
        for negative, _, row in sorted(ranked):
            if self._held[row].tokens[:hashed] == prompt[:hashed]:  # else a hash collision, not a prefix
                return row, -negative
        return None, 0

    def _to_evict(self) -> int:
        """The free row to write over: the least recently used of the client that holds the most (the least recently
        used of all among clients alike). O(rows), when no blank row is left."""
        most = max(self._idle_per_client.values())
        return next(row for row, client in self._idle.items() if self._idle_per_client[client] == most)

    def _unidle(self, row: int) -> int:
        client = self._idle.pop(row)
        left = self._idle_per_client[client] - 1
        if left:
            self._idle_per_client[client] = left
        else:
            del self._idle_per_client[client]
        return row

    def _filled(self, row: int) -> None:
        """The row prefills no more: the prompts waiting for it are asked afresh."""
        self._filling.pop(row, None)
        for waiting in self._waiters.pop(row, ()):
            self._waits.pop(waiting, None)

    def _drop(self, row: int) -> None:
        held = self._held.pop(row, None)
        if held is None:
            return
        for value in held.chain:
            rows = self._index[held.scope, value]
            del rows[row]
            if not rows:
                del self._index[held.scope, value]


def _shared(a: list[int], b: list[int], limit: int) -> int:
    """The length of a's and b's common prefix, at most `limit`: compared a block at a time (slices compare in C)."""
    end = min(len(a), len(b), limit)
    at = 0
    while at + BLOCK <= end and a[at : at + BLOCK] == b[at : at + BLOCK]:
        at += BLOCK
    while at < end and a[at] == b[at]:
        at += 1
    return at
