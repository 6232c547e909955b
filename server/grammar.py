"""Structured output: JSON schemas, JSON objects and regular expressions compiled into token matchers.

The grammar engine is llguidance (guidance-ai; in vLLM, SGLang and llama.cpp). Measured on the embedded
SmolLM2 tokenizer (49,152 tokens), one shared CPU core, filling one row's mask per token: xgrammar 0.2.9
8 us median / 30 us mean (JSON schema), 2 / 3 us (regex); llguidance 1.9.1 20 / 214 us and 62 / 416 us (its
matchers build their lexer lazily, so the first tokens of a request cost the most). Faster as xgrammar is,
it let a `maxLength` string take raw control characters, so its output did not parse as JSON; llguidance's
did, every time. llguidance also has no dependencies (xgrammar brings tvm-ffi and triton) and bounds every
grammar's work by fuel (lexer states, Earley items per token), which is what a server taking grammars from
clients needs. Its regexes are derivative-based automata: nothing a client sends runs on a backtracking
matcher. Even at its mean, 16 constrained rows cost ~3.4 ms of CPU per step, under a GPU forward.

Compilation runs in a small pool of its own threads (never on the event loop or the engine thread), bounded
in input size, schema depth, llguidance's fuel and time; grammars that passed are kept in an LRU keyed by
(kind, compact text) within a client's scope (the prefix cache's salt: a kept compile answers sooner, which
would tell one client what another sent), a full one forgetting the grammars of the client that made the most
first (as the prefix cache's rows), and each request gets a matcher built from its grammar on those threads, which
its choices copy. Not one matcher a grammar that every request copies: llguidance's copies share
their lexer, and a lexer that once ran past its limits stays in error, so one request that drove a popular grammar's
lexer there (its own output, steered by logit_bias, say) failed every later request of every client on that
grammar, and those running, at their next token. llguidance is imported on the first grammar request.
The threads are shared by every client, so one client's grammars must not take them from the others: they serve
the clients in turn (server/fair_pool.py), requests for a grammar already compiling wait for that compile (a flood
of one slow schema costs one check), a refused grammar is remembered for a while (sent again, it is refused at
once), and a request whose grammar waited for a thread past its deadline, never started, hears that the compiler is
busy (429), not that its grammar is too slow.

llguidance's limits (LLParserLimits) bound the lexer and parser: a regex's first masks stop at their fuel within
about a second, whatever it nests or repeats. They do not bound the translation of a JSON schema into its
grammar, which they only reach afterwards: patternProperties are checked pairwise for overlaps, per object and
again at each allOf or $ref that merges objects, each pair with its own fuel and no total (300 patterns: 5 s, 400:
20 s; 64 patterns merged by 300 allOf: 3 s; a 32 KB schema: hours). Since a thread running llguidance cannot be
stopped, each grammar is first checked in a worker process (server/grammar_check.py) that is killed at its
deadline, and compiled here only once it has passed, so no grammar holds a compile thread for long. The worker's
address space is limited too, so a grammar whose translation would take more memory ends the worker, not the
server, and is refused. No check can see every mask before the answer runs, so a mask itself is kept from costing
in proportion to what a grammar fixes ahead: grammars run with llguidance's forcing off (_without_forcing)."""

import asyncio
import copy
import json
import logging
import math
import queue
import selectors
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from loraplex.errors import LoraplexError, shown_int
from server.client_share import current_client, prefix_salt
from server.engine.constraints import mask_words
from server.engine.errors import GrammarDeadEnd
from server.fair_pool import FairPool

if TYPE_CHECKING:
    import llguidance

MAX_GRAMMAR_CHARS = 32 * 1024  # a schema (as compact JSON) or a pattern; real schemas are a few KB
INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# nesting of the schema's JSON (objects and arrays): compile time grows fast with it (200 levels: seconds)
MAX_SCHEMA_DEPTH = 32
COMPILE_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 2000  # of llguidance's error in a client's answer (a regex error quotes the pattern)
BACKTRACE_MARKS = ("stack backtrace:", "<backtrace>")  # Rust's and anyhow's, lower-cased
CACHED_GRAMMARS = 64
# Refused grammars remembered, and for how long: a refusal for time can be the machine's load, not the grammar's
REFUSED_GRAMMARS = 256
REFUSED_FOR_S = 60.0
COMPILE_THREADS = 2  # each with its own worker process for the checks
# A check worker's address space. Honest grammars need little: the worker maps 28 MB before its first grammar
# (Python and llguidance), and checking a 47 KB schema of 600 properties peaks at 30 MB. Memory grows with what
# a schema multiplies out (allOf over anyOf): the costliest schema found within the bounds above and llguidance's
# own limits (2 allOf x 10 anyOf branches, each merging a 300-property object) peaks at 160 MB, and its compile here
# takes as much again. 256 MiB leaves honest grammars many times their need and no grammar gigabytes.
CHECK_MEMORY_BYTES = 256 << 20

log = logging.getLogger(__name__)

GrammarKind = Literal["json_object", "json_schema", "regex"]
_WHAT = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex"}


class InvalidGrammar(LoraplexError):
    """A schema or pattern the grammar engine refuses, or one over the bounds."""

    http_status = 422
    code = "invalid_grammar"


class GrammarBusy(LoraplexError):
    """Every compile thread stayed busy with other grammars until this request's deadline."""

    http_status = 429
    code = "grammar_busy"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: the cache key, with the text in compact form."""

    kind: GrammarKind
    # the schema as compact JSON in the order sent (its properties are generated in their declared order, as
    # OpenAI and vLLM generate them: a schema of "reasoning" then "answer" means that order), or the pattern
    text: str = ""

    @classmethod
    def json_schema(cls, schema: Any, extra_depth: int = 0) -> "GrammarSpec":
        """`extra_depth`: levels of objects and arrays the server put around schemas the client sent (each held to
        the depth bound on its own)."""
        if isinstance(schema, str):  # TGI takes the schema as an object or as its JSON text
            _check_size(len(schema), "JSON schema")
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise InvalidGrammar(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise InvalidGrammar(f"a JSON schema is an object, not {type(schema).__name__}")
        if _chars_past(schema, MAX_GRAMMAR_CHARS):
            raise InvalidGrammar(
                f"the JSON schema has over {MAX_GRAMMAR_CHARS} characters; at most {MAX_GRAMMAR_CHARS} are accepted"
            )
        depth = _depth(schema, MAX_SCHEMA_DEPTH + extra_depth) - extra_depth
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidGrammar(
                f"the JSON schema nests {depth} levels of objects and arrays; at most {MAX_SCHEMA_DEPTH} are accepted"
            )
        _check_integer_bounds(schema)
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError:
            _refuse_non_finite(schema)
            raise  # a value other than NaN or Infinity, which no JSON reader makes: the server's fault
        _check_size(len(text), "JSON schema")
        _check_unicode(text, "JSON schema")
        return cls("json_schema", text)

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        _check_size(len(pattern), "regex")
        if not pattern:
            raise InvalidGrammar("the regex is empty")
        if (len(pattern) - len(pattern.rstrip("\\"))) % 2:  # llguidance drops it, and runs the regex without it
            raise InvalidGrammar(
                "the regex ends in a lone backslash, an escape of nothing: escape it (\\\\) or leave it out"
            )
        _check_unicode(pattern, "regex")
        return cls("regex", pattern)


JSON_OBJECT = GrammarSpec("json_object")


def _check_size(chars: int, what: str) -> None:
    if chars > MAX_GRAMMAR_CHARS:
        raise InvalidGrammar(f"the {what} has {chars} characters; at most {MAX_GRAMMAR_CHARS} are accepted")


def not_unicode(text: str) -> str | None:
    """Why `text` is no text UTF-8 can hold, None where it is. JSON may escape half of a surrogate pair alone
    ("\\ud800"): Python holds it, no UTF-8 can, and the tokenizer and llguidance raise on it."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        pair = f"half of a UTF-16 surrogate pair ({text[exc.start]!r})"
        return f"character {exc.start} is {pair}: send valid Unicode text"
    return None


def _check_unicode(text: str, what: str) -> None:
    # Checked here, not by llguidance at the compile: a chat's tools are rendered into its prompt under tool_choice
    # "auto", which compiles nothing, and their texts were encoded to be counted (a 500)
    why = not_unicode(text)
    if why is not None:
        raise InvalidGrammar(f"the {what} is not Unicode text: {why}")


def _check_integer_bounds(schema: dict) -> None:
    """llguidance holds an integer's bounds in 64 bits and clamps one past them: minimum 2**64 and maximum 2**64 + 5
    compiled to the one integer 2**63 - 1, an answer outside the schema. Such a bound is refused instead. Bounds
    reach an integer from other subschemas too (allOf, $ref, a sibling of its type), so in a schema with an
    integer type anywhere every bound is held to 64 bits (the schema's depth is checked first, so this walk is
    bounded)."""
    stack: list[Any] = [schema]
    integers = False
    outside: list[tuple[str, int | float]] = []
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        stack.extend(item.values())
        kind = item.get("type")
        integers = integers or kind == "integer" or (isinstance(kind, list) and "integer" in kind)
        for key in INTEGER_BOUNDS:
            bound = item.get(key)
            if isinstance(bound, int | float) and not isinstance(bound, bool) and not INT64_MIN <= bound <= INT64_MAX:
                outside.append((key, bound))
    if integers and outside:
        key, bound = outside[0]
        shown = shown_int(bound) if isinstance(bound, int) else bound
        raise InvalidGrammar(
            f"the JSON schema has integers and a {key} of {shown}, outside 64-bit integers ({INT64_MIN} to "
            f"{INT64_MAX}), the range integers are generated in: a bound can reach an integer through allOf, $ref "
            "or a sibling keyword, so a schema with integers takes every bound within that range"
        )


def _refuse_non_finite(schema: dict) -> None:
    """Python's JSON reader (a body's, or a schema sent as text) takes NaN and Infinity, which are no JSON: the
    compiler, reading the schema's text, refused them only as "expected value" at a column of a text the client never
    sent. Called where the schema could not be written as JSON, so it walks only a schema that holds one."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        pointer, item = stack.pop()
        if isinstance(item, dict):
            escaped = ((str(key).replace("~", "~0").replace("/", "~1"), child) for key, child in item.items())
            stack.extend((f"{pointer}/{key}", child) for key, child in escaped)
        elif isinstance(item, list):
            stack.extend((f"{pointer}/{i}", child) for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            shown = pointer if len(pointer) <= 200 else pointer[:200] + "..."  # its keys may be long
            raise InvalidGrammar(
                f"the JSON schema holds {json.dumps(item)} at {shown} (a JSON pointer; a number past a double's "
                "range, such as 1e999, reads as Infinity): NaN and Infinity are not JSON numbers, and a schema is "
                "JSON; send a finite number there"
            )


def _chars_past(value: Any, limit: int) -> bool:
    """Whether `value`'s compact JSON surely has over `limit` characters, from a count that stops past it: the walks
    and the compact dump below took 0.4 s of the event loop for a 2.8 MB schema before its size refused it. Counts
    what JSON cannot write shorter: brackets, the commas between items, a key's quotes and colon, a scalar's one
    character (a string's two quotes)."""
    chars, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            chars += 1 + len(item)  # the braces and the commas between entries
            for key, child in item.items():
                chars += len(str(key)) + 3
                if chars > limit:
                    return True
                stack.append(child)
        elif isinstance(item, list):
            chars += 1 + len(item)  # the brackets and the commas between items
            if chars > limit:
                return True
            stack.extend(item)
        else:
            chars += len(item) + 2 if isinstance(item, str) else 1
        if chars > limit:
            return True
    return False


def _depth(value: Any, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """Nesting of objects and arrays, walked without recursion (the value came from a client), up to past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


class GrammarMatcher:
    """One request's matcher (engine.constraints.TokenConstraint): the parse state of its output so far."""

    def __init__(self, matcher: "llguidance.LLMatcher", family: "llguidance.LLMatcher | None" = None) -> None:
        self._matcher = matcher
        # the matcher it was copied from: copies share its lexer, and their fills take turns at it (on two threads a
        # request's choices were filled no faster than on one)
        self.family = family

    def fill_mask(self, row: torch.Tensor) -> None:
        # row: int32 [W], contiguous, CPU: llguidance writes every word of it
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._matcher.is_error():  # llguidance reports grammar and fuel errors as a state, not by raising
            raise _failure(self._matcher.get_error())

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise _failure(self._matcher.get_error())

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()  # complete, and nothing but the end of the sequence may follow


# What llguidance's "Parser Error:" (its spelling for a refused token as well) says of a limit the parser hit
_PARSER_LIMITS = ("Current row has", "Too many items", "fuel exhausted", "too many states")


def _failure(error: str) -> Exception:
    """llguidance's error as the engine takes it. A dead end is the grammar's: llguidance allows a token when its
    bytes can go on in the grammar, not when some token can spell what must follow, so a grammar needing bytes
    that no token has stops there (it then offers only the end of the sequence, and names the stop
    NoExtensionBias); so is a limit its lexer or parser hit. Anything else (a token refused that the mask allowed,
    a panic) is a mismatch: ValueError. llguidance names these only in its message."""
    reason = error.split("\n", 1)[0]
    if reason == "NoExtensionBias":
        return GrammarDeadEnd("no token of this model can continue the grammar here: its output stopped unfinished")
    if reason.startswith(("lexer error:", "parser error:")) or (
        reason.startswith("Parser Error:") and any(limit in reason for limit in _PARSER_LIMITS)
    ):
        return GrammarDeadEnd(f"the grammar needs more work here than its limits allow ({reason}): simplify it")
    log.warning("grammar matcher error: %s", error)  # in full for the operator
    return ValueError(_without_backtrace(error))


def _first_allowed(row: torch.Tensor) -> int | None:
    """The lowest token id a mask row [W] int32 (bit t % 32 of word t // 32) allows, None for none."""
    words = torch.nonzero(row)
    if words.numel() == 0:
        return None
    word = int(row[int(words[0, 0])])
    return 32 * int(words[0, 0]) + (word & -word).bit_length() - 1


def _without_backtrace(error: object) -> str:
    """What a client hears of an llguidance error: the message without the backtrace that a panic's or an anyhow
    error's text can go on with (it names the library's build paths, nothing the client can act on), at most
    MAX_ERROR_CHARS."""
    text = str(error)
    starts = [i for i in (text.lower().find(mark) for mark in BACKTRACE_MARKS) if i >= 0]
    return text[: min(starts, default=len(text))].rstrip()[:MAX_ERROR_CHARS]


class CompiledGrammar:
    """A compiled grammar of one request; each of its choices takes its own copy (the copies share one lexer)."""

    def __init__(self, matcher: "llguidance.LLMatcher") -> None:
        self._pristine = matcher  # never advanced: only copied

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self._pristine)


_Key = tuple[str | None, GrammarSpec]  # (the request's prefix_salt, its spec)


class _Compile:
    """One grammar's compile, shared by the requests that ask for it while it is queued or running. It waits in the
    turn of each of their clients (fair_pool.py) and runs in the first that comes: queued in the turn of the client
    that asked first alone, it held another client's request for it behind that client's whole backlog."""

    def __init__(self) -> None:
        self.started = threading.Event()  # set under Grammars._lock: one turn runs it
        self.waiters = 0
        self.result: Future[str] = Future()  # the grammar as llguidance compiles it, once checked
        self.turns: dict[Hashable, Future[None]] = {}  # each asking client's turn in the pool, until one runs it


class Grammars:
    """Compiles grammar specs for one tokenizer, off the event loop, bounded, with an LRU of the results."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_ids: Iterable[int],
        capacity: int = CACHED_GRAMMARS,
        timeout_s: float = COMPILE_TIMEOUT_S,
        check_memory_bytes: int = CHECK_MEMORY_BYTES,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the model's logits width, which may exceed the tokenizer's
        self._stop_ids = sorted(stop_ids)
        self._capacity = capacity
        self._timeout_s = timeout_s
        # A grammar's translation runs twice, checked then compiled here, so one that passes its check holds a
        # thread for about half the budget at most: a request queued behind such grammars has the other half. Each
        # request's own build translates it once more, within a quarter of the budget.
        self._check_s = timeout_s / 4
        # Keyed by (salt, spec): a compile kept, being made or refused answers sooner, which would tell one client
        # which schemas, patterns and choices another sent; so they are shared under one prefix_salt only, as prompts
        # in the KV cache are (an API key's digest and a cache_salt; on a server without keys, every client is one).
        # checked grammars, as llguidance takes them, least recently used first, each with the client whose turn
        # compiled it; and how many each client's turns made. A full cache forgets the least recently used grammar of
        # the client that made the most: with plain LRU, one client sending `capacity` new grammars (or one grammar
        # under as many cache_salts) evicted every other client's, each then paying its compile again
        self._cache: OrderedDict[_Key, tuple[str, Hashable]] = OrderedDict()
        self._cached_per_client: dict[Hashable, int] = {}
        self._refused: OrderedDict[_Key, tuple[str, float]] = OrderedDict()  # message, monotonic expiry
        self._compiling: dict[_Key, _Compile] = {}
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        # the clients in turn: one client's flood of grammars delays another's by a job of each client waiting, where
        # in one queue it held them until their deadline (429 grammar_busy for everyone but the flood)
        self._pool = FairPool(COMPILE_THREADS, "loraplex-grammar")
        self._checkers: queue.SimpleQueue[_Checker] = queue.SimpleQueue()  # one for each thread
        self._all_checkers = [_Checker(check_memory_bytes) for _ in range(COMPILE_THREADS)]
        for checker in self._all_checkers:
            self._checkers.put(checker)

    async def get(self, spec: GrammarSpec) -> CompiledGrammar:
        """`spec` compiled for one request: its own matcher, built from the checked grammar (cached)."""
        return await self._own(spec, await self._checked(spec))

    async def _checked(self, spec: GrammarSpec) -> str:
        key = (prefix_salt.get(), spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][0]
            message, until = self._refused.get(key, ("", 0.0))
            if time.monotonic() < until:
                raise InvalidGrammar(message)
            job = self._compiling.get(key)
            if job is None:
                job = self._compiling[key] = _Compile()
            client = current_client.get()
            if not job.started.is_set() and client not in job.turns:
                job.turns[client] = self._pool.submit(client, partial(self._run, key, job, client))
            job.waiters += 1
        try:
            # shielded: this request's deadline or departure must not cancel a compile others wait for
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.result)), self._timeout_s)
        except TimeoutError:
            if not job.started.is_set():
                raise self._busy() from None
            # It got a thread, maybe just now, behind other clients' grammars: its check stops it within its own time
            # (_check_s), so its answer comes soon, and a slow grammar hears that it is one from the check.
            return await asyncio.shield(asyncio.wrap_future(job.result))
        finally:
            with self._lock:
                job.waiters -= 1
                if not job.waiters and not job.started.is_set():  # queued, and nobody waits for it any more
                    for turn in job.turns.values():
                        turn.cancel()
                    del self._compiling[key]

    async def _own(self, spec: GrammarSpec, grammar: str) -> CompiledGrammar:
        """A matcher of the checked `grammar` for one request, built on a compile thread. One that waited for a thread
        past the deadline hears that the compiler is busy; one building is waited for (its grammar was checked)."""
        future = self._pool.submit(current_client.get(), lambda: CompiledGrammar(self._build(spec, grammar)))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self._timeout_s)
        except TimeoutError:
            if future.cancel():  # never started
                raise self._busy() from None
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # still queued for a request that left: built for nobody otherwise

    def _busy(self) -> GrammarBusy:
        return GrammarBusy(
            f"the grammar compiler was busy with other requests' grammars for {self._timeout_s:g} s; retry shortly"
        )

    def _run(self, key: _Key, job: _Compile, client: Hashable) -> None:
        """Compile thread, in the turn of `client`, waiting for `job`: the compile (unless another client's turn ran
        it first), its result cached or its refusal remembered, then the job forgotten."""
        with self._lock:
            if job.started.is_set() or self._compiling.get(key) is not job:  # run already, or nobody waits any more
                return
            job.started.set()
            for turn in job.turns.values():  # the other clients' turns are theirs again (this one runs: not cancelled)
                turn.cancel()
        try:
            compiled = self._compile(key[1])
        except InvalidGrammar as exc:
            with self._lock:
                del self._compiling[key]
                self._refused[key] = (str(exc), time.monotonic() + REFUSED_FOR_S)
                self._refused.move_to_end(key)
                while len(self._refused) > REFUSED_GRAMMARS:
                    self._refused.popitem(last=False)
            job.result.set_exception(exc)
            return
        except BaseException as exc:
            with self._lock:
                del self._compiling[key]
            job.result.set_exception(exc)
            raise
        with self._lock:
            del self._compiling[key]
            self._cache[key] = (compiled, client)
            self._cached_per_client[client] = self._cached_per_client.get(client, 0) + 1
            while len(self._cache) > self._capacity:
                self._forget_one()
        job.result.set_result(compiled)

    def _forget_one(self) -> None:
        """Drop the least recently used grammar of the client whose turns made the most (the caller holds the lock).
        O(capacity)."""
        most = max(self._cached_per_client.values())
        key = next(key for key, (_, owner) in self._cache.items() if self._cached_per_client[owner] == most)
        _, owner = self._cache.pop(key)
        if most > 1:
            self._cached_per_client[owner] = most - 1
        else:
            del self._cached_per_client[owner]

    def close(self) -> None:
        self._pool.shutdown()
        for checker in self._all_checkers:
            checker.close()

    def _compile(self, spec: GrammarSpec) -> str:
        """The grammar of `spec` as llguidance compiles it, once checked in a worker and probed here."""
        import llguidance

        # compact JSON: a model cannot spend its tokens on whitespace
        options: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
        try:
            if spec.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.text)
            else:
                schema = spec.text if spec.kind == "json_schema" else '{"type": "object"}'
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            grammar = _without_forcing(grammar)
        except (ValueError, RuntimeError) as exc:  # a schema it cannot read
            raise InvalidGrammar(f"the {_WHAT[spec.kind]} cannot be compiled: {_without_backtrace(exc)}") from exc
        checker = self._checkers.get()
        try:
            error = checker.check(grammar, self._check_s)
        finally:
            self._checkers.put(checker)
        if error is None:
            raise InvalidGrammar(f"the {_WHAT[spec.kind]} did not compile within {self._check_s:g} s: simplify it")
        if error:
            raise InvalidGrammar(f"the {_WHAT[spec.kind]} cannot be compiled: {_without_backtrace(error)}")
        # A build that hit a limit leaves the next copy in error, so a second mask tells the client here. Then the
        # second copy takes one allowed token and masks again: a parser limit hit by the first token (a schema of
        # many properties) is told here too, not after the answer has begun.
        matcher = self._build(spec, grammar)
        row = torch.zeros(mask_words(self._vocab_size), dtype=torch.int32)
        try:
            probe = GrammarMatcher(matcher.deep_copy())
            probe.fill_mask(row)
            if (token := _first_allowed(row)) is not None:
                probe.advance(token)
                probe.fill_mask(row)
        except (ValueError, GrammarDeadEnd) as exc:
            raise InvalidGrammar(f"the {_WHAT[spec.kind]} cannot be compiled: {exc}") from exc
        return grammar

    def _build(self, spec: GrammarSpec, grammar: str) -> "llguidance.LLMatcher":
        """A matcher of `grammar` with a lexer of its own, and its first mask made. llguidance builds the lexer at the
        first mask (a short pattern can take seconds there): built now, on a compile thread, not on the engine
        thread at a request's first token."""
        import llguidance

        from server.grammar_check import limits

        matcher = llguidance.LLMatcher(self._get_tokenizer(), grammar, log_level=0, limits=limits())
        try:
            if matcher.is_error():
                raise ValueError(_without_backtrace(matcher.get_error()))
            GrammarMatcher(matcher.deep_copy()).fill_mask(torch.zeros(mask_words(self._vocab_size), dtype=torch.int32))
        except (ValueError, GrammarDeadEnd) as exc:
            raise InvalidGrammar(f"the {_WHAT[spec.kind]} cannot be compiled: {exc}") from exc
        return matcher

    def _get_tokenizer(self) -> "llguidance.LLTokenizer":
        with self._tokenizer_lock:  # the vocabulary is read once (about a second for 49k tokens)
            if self._ll_tokenizer is None:
                import llguidance
                import llguidance.hf

                read = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size, eos_token=self._stop_ids)
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_PlainTextTokenizer(self._tokenizer, read)),
                    n_vocab=self._vocab_size,
                    eos_token=self._stop_ids,
                )
            return self._ll_tokenizer


NO_FORCING = '%llguidance {"no_forcing": true}\n'


def _without_forcing(grammar: str) -> str:
    """`grammar` (llguidance's top-level JSON, of one JSON schema or one regex) as Lark, with forcing off. Where a
    grammar fixes the bytes ahead, llguidance computes all of them at the mask ("forcing"), to allow only the first
    token of their canonical tokenization: a 16 KB const in an array of 100 arrays of 100 fixes 160 MB, which took
    6 s and 3 GB on the engine thread at the first mask after a free choice, every other request's step waiting.
    Forcing also had the fixed bytes tokenized at every mask, through the tokenizer's Python on the engine thread
    (a{100000}: 33 ms a token on SmolLM2's tokenizer). Without it each mask allows the tokens that the fixed bytes
    begin with, and costs what any mask does."""
    top = json.loads(grammar)
    for part in top["grammars"]:
        schema = part.pop("json_schema", None)
        lark = part.get("lark_grammar") or "start: %json " + json.dumps(schema, ensure_ascii=False)
        part["lark_grammar"] = NO_FORCING + lark
    return json.dumps(top, ensure_ascii=False)


class _PlainTextTokenizer:
    """The tokenizer as llguidance reads it (TokenizerWrapper's interface), encoding a special token's text as
    plain text. llguidance tokenizes the bytes a grammar forces to pick the tokens it allows; the Rust tokenizer
    it builds from a fast tokenizer turns "<|im_end|>" in such bytes into the special token, which the matcher
    then refuses (special tokens are never text to it): a grammar that spells one ended its request in a 500."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, read: "llguidance.LLTokenizer") -> None:
        # The Rust tokenizer itself, called straight: llguidance calls this on the engine thread while it fills a
        # mask, where transformers' own __call__ would triple a mask's time
        self._backend = copy.copy(tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
        self._backend.no_padding()
        self._backend.no_truncation()
        self._backend.encode_special_tokens = True  # a special token's text is text
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [read.decode_bytes([i]) for i in range(read.vocab_size)]  # each token's bytes
        self.special_token_ids = list(tokenizer.all_special_ids)

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode() if isinstance(text, bytes) else text
        return self._backend.encode(text, add_special_tokens=False).ids


class _Checker:
    """A worker process of server/grammar_check.py, started at its first check and afresh after one it killed."""

    def __init__(self, memory_bytes: int) -> None:
        self._memory_bytes = memory_bytes
        self._worker: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # close() may come from another thread

    def check(self, grammar: str, timeout_s: float) -> str | None:
        """llguidance's error for the grammar ("" when it is valid), or None when the check overran its time."""
        with self._lock:
            if self._worker is None:
                self._worker = _start_worker(self._memory_bytes)
            worker = self._worker
        assert worker.stdin is not None and worker.stdout is not None
        try:
            worker.stdin.write(json.dumps(grammar) + "\n")
            worker.stdin.flush()
            # epoll, not select(): a server holding a thousand connections numbers the worker's pipes past
            # select()'s 1024, where it fails (and that worker had been kept: every grammar after it failed)
            with selectors.DefaultSelector() as selector:
                selector.register(worker.stdout, selectors.EVENT_READ)
                answered = bool(selector.select(timeout_s))
            if not answered:
                self.close()
                return None
            line = worker.stdout.readline()
        except BaseException:  # a worker in an unknown state is not asked again: the next check starts afresh
            self.close()
            raise
        if not line:  # it died on this grammar (a crash, or killed for memory), as the server would have
            self.close()
            log.warning("the grammar check process ended (status %s) on a grammar: refused", worker.poll())
            return "the grammar compiler stopped on it"
        answer: str = json.loads(line)
        return answer

    def close(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
            worker.wait()


def _start_worker(memory_bytes: int) -> "subprocess.Popen[str]":
    worker = subprocess.Popen(
        [sys.executable, "-m", "server.grammar_check", str(memory_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    if worker.stdout.readline() != '"ready"\n':  # its start is not counted in a grammar's time
        worker.kill()
        raise RuntimeError(f"the grammar check process did not start (status {worker.wait()})")
    return worker
