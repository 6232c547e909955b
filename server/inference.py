"""What every generation route shares: prompt encoding, the checks that depend on the served model (prompt
size, max_new_tokens, top_k, temperature), adapter resolution with a lease held for the request's lifetime,
submission to the scheduler, metrics, and cancellation when the client goes away."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request

from adapters.errors import AdapterError, AdapterNotFound
from adapters.lora import LoraWeights
from loraplex.basemodel import LoadedBase
from loraplex.errors import LoraplexError, shown_int
from server.client_share import current_client, prefix_salt
from server.engine import GenerationRequest, PromptScores, SamplingParams, TokenEvent
from server.engine.text import TextStream
from server.grammar import CompiledGrammar, Grammars, GrammarSpec
from server.metrics import Metrics
from server.mixing import AdapterMix, MixCache, mix_key
from server.registry import AdapterRegistry, Lease
from server.scheduler import Scheduler
from server.tokenizer_pool import THREADS as TOKENIZER_THREADS
from server.tokenizer_pool import TokenizerPool, chat_work, ids_work, text_work
from server.tokenizer_workers import TokenizerWorkers

T = TypeVar("T")
Adapter = str | AdapterMix | None  # what a request runs on: an adapter ref, a mix, or the base model
Run = tuple[list[int], SamplingParams]  # one request of several (choices, prompts): its prompt ids and sampling
log = logging.getLogger("loraplex")
BASE_LABEL = "-"  # the `adapter` label of base-model requests in metrics
# the label of every adapter the store does not hold: labels never grow with what clients make up
UNKNOWN_LABEL = "<unknown>"
MIX_LABEL = "<mix>"  # every per-request adapter mix: one label, whatever the client mixes
CLIENT_CLOSED = "499"  # nginx's code for "client closed the request": a cancel, not a server failure
# Prompt text beyond this many characters per token of max_seq_len cannot fit once tokenized (tokens of
# real vocabularies average ~4 characters; 32 leaves room for long runs of spaces or digits, and for TGI's
# `truncate`): refused before the tokenizer spends seconds on it.
PROMPT_CHARS_PER_TOKEN = 32
# Positive temperatures below this overflow the logits they divide (vLLM raises them to the same floor).
MIN_TEMPERATURE = 0.01


class EmptyPrompt(LoraplexError):
    http_status = 422
    code = "empty_prompt"


class PromptTooLong(LoraplexError):
    """The prompt leaves no room in max_seq_len (the engine's PromptTooLong is only a backstop)."""

    http_status = 422
    code = "prompt_too_long"


class InvalidTokens(LoraplexError):
    """Token ids the tokenizer cannot decode, or more than one request may carry."""

    http_status = 422
    code = "invalid_tokens"


class MaxTokensTooLarge(LoraplexError):
    """The prompt fits, but not with as many new tokens as asked for."""

    http_status = 422
    code = "max_tokens_too_large"


class MinTokensTooLarge(LoraplexError):
    """vLLM's min_tokens past the request's completion limit."""

    http_status = 422
    code = "min_tokens_too_large"


class ClientDisconnected(LoraplexError):
    """The client left before its answer: nobody reads this, and it is no server failure."""

    http_status = int(CLIENT_CLOSED)
    code = "client_closed_request"


@dataclass
class Generation:
    """A finished (or cancelled) request, as the non-streaming routes answer it."""

    prompt_tokens: int
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if e.token_id is not None]

    @property
    def prompt_logprobs(self) -> PromptScores | None:
        """The prompt's tokens scored (where asked for: on the first token's event)."""
        return next((e.prompt_logprobs for e in self.events if e.prompt_logprobs is not None), None)


class Inference:
    def __init__(
        self, base: LoadedBase, registry: AdapterRegistry, scheduler: Scheduler, metrics: Metrics, max_seq_len: int
    ) -> None:
        self.base = base
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_seq_len = max_seq_len
        self.max_prompt_chars = PROMPT_CHARS_PER_TOKEN * max_seq_len
        self.vocab_size: int = base.model.config.get_text_config().vocab_size
        self.eos_ids = scheduler.engine.eos_ids
        self.special_ids = frozenset(base.tokenizer.all_special_ids)
        engine = scheduler.engine
        self.mixes = MixCache(engine.config.max_lora_rank, engine.prepare_adapter, engine.deactivate,
                              max_in_use=max(1, engine.config.max_active_adapters // 2))  # fmt: skip
        self.grammars = Grammars(base.tokenizer, self.vocab_size, self.eos_ids)
        self.tokenizer_size = len(base.tokenizer)  # the vocabulary with added tokens: what decode takes
        self._token_texts: dict[int, str] = {}  # at most one entry per vocabulary id
        self.tokenizing = TokenizerPool(self.max_prompt_chars, scheduler.client_shares)
        self.tokenizer_workers = TokenizerWorkers(base.tokenizer, processes=TOKENIZER_THREADS)  # one for each thread
        registry.store.on_removed(self._forget_labels)

    # ---- prompts: tokenizing and templating run in the tokenizer's processes, which its threads wait on ---------
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer_workers.encode(text)
        if not ids:
            raise EmptyPrompt("the prompt encodes to no tokens; send some text")
        return ids

    async def encode_prompt(self, text: str) -> list[int]:
        return (await self.encode_prompts([text]))[0]

    async def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """A batch's prompts, each checked against the character bound before any is tokenized (one too long refuses
        the batch), then tokenized one after another: each job holds one of the client's share of requests."""
        for i, text in enumerate(texts):
            self._check_chars(len(text), f"prompt {i}" if len(texts) > 1 else "the prompt")
        return [await self.tokenizing.run(text_work(len(text.encode())), self.encode, text) for text in texts]

    def check_prompt_ids(self, prompts: list[list[int]]) -> None:
        """Token-id prompts' ids: in the model's vocabulary and the tokenizer's (an echo decodes them). Their count
        is checked with max_new_tokens, as a text prompt's tokens are."""
        vocabulary = min(self.vocab_size, self.tokenizer_size)
        for i, ids in enumerate(prompts):
            bad = next((token for token in ids if token >= vocabulary), None)
            if bad is not None:
                which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise InvalidTokens(f"{which}: {_outside(bad, vocabulary)}")

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        tools_texts: list[str] | None = None,
    ) -> list[int]:
        """The chat's tokens, as the base model's template renders the messages (ChatMessage.template()) and `tools`
        (OpenAI's tool objects; None: none), whose texts are `tools_texts` (their schemas, names and descriptions:
        counted against the prompt's bound as the messages' text is)."""
        texts = [text for m in messages for text in _template_texts(m)] + (tools_texts or [])
        what = "the messages' content" + (" and the tools" if tools else "")
        self._check_chars(sum(map(len, texts)), what)
        work = chat_work(len(messages), sum(len(text.encode()) for text in texts))
        return await self.tokenizing.run(work, self.tokenizer_workers.chat, messages, add_generation_prompt, tools)

    # ---- the tokenizer endpoints: the same bounds, threads and processes ------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(token id, start, stop) per token of `text`: offsets into `text`, for TGI's /tokenize."""
        self._check_chars(len(text), "the text")
        offsets = self.tokenizer_workers.offsets
        return await self.tokenizing.run(text_work(len(text.encode())), offsets, text, add_special_tokens)

    async def token_strings(self, ids: list[int]) -> list[str]:
        """The tokens' strings of ids this tokenizer made of a text within the character bound (as many as it
        made: not bounded by max_seq_len, which bounds ids a client sends)."""
        return await self.tokenizing.run(ids_work(len(ids)), self.tokenizer_workers.token_strings, ids)

    async def detokenize(self, ids: list[int]) -> str:
        self.check_token_ids(ids)
        return await self.tokenizing.run(ids_work(len(ids)), self.tokenizer_workers.decode, ids)

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs report it (cached: a top-20 answer names thousands of tokens)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.base.tokenizer.decode([token_id])
        return text

    def stream_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text as a stream decodes it (TGI's per-token text), nothing held back for stop
        sequences: "" while a character spread over tokens is incomplete, then the whole character."""
        stream = TextStream(self.base.tokenizer, ())
        return [stream.push(token_id)[0] for token_id in ids]

    def check_token_ids(self, ids: list[int]) -> None:
        """What the tokenizer can decode: ids of the vocabulary, at most max_seq_len of them (one KV row)."""
        if len(ids) > self.max_seq_len:
            raise InvalidTokens(
                f"{len(ids)} token ids; this server decodes at most {self.max_seq_len} "
                "(max_seq_len) per request: send fewer"
            )
        bad = next((i for i in ids if not 0 <= i < self.tokenizer_size), None)
        if bad is not None:
            raise InvalidTokens(_outside(bad, self.tokenizer_size))

    def check_tokenized(self, tokens: int) -> None:
        """A /tokenize answer's tokens: at most max_seq_len. A text within the character bound can be ~250,000
        tokens of rare characters, megabytes of JSON rendered by the threads every other answer is rendered by."""
        if tokens > self.max_seq_len:
            raise PromptTooLong(
                f"the text is {tokens} tokens; this server tokenizes at most max_seq_len {self.max_seq_len} at "
                "once, what a prompt can hold: send it in parts"
            )

    def _check_chars(self, chars: int, what: str) -> None:
        if chars > self.max_prompt_chars:
            raise PromptTooLong(
                f"{what} has {chars} characters; this server takes at most {self.max_prompt_chars} "
                f"({PROMPT_CHARS_PER_TOKEN} per token of max_seq_len {self.max_seq_len}): shorten it"
            )

    # ---- sampling values that depend on the served model ---------------------------------------------------
    def max_new_tokens(self, prompt_tokens: int, requested: int | None, field: str, default: int) -> int:
        """The request's completion limit: `requested` (sent as `field`) if it fits the KV row with the prompt,
        else a typed error saying what fits; no request: `default`, or what is left of the row if less."""
        room = self.max_seq_len - prompt_tokens
        if room < 1:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens} tokens; max_seq_len {self.max_seq_len} takes at most "
                f"{self.max_seq_len - 1} prompt tokens, to leave room for one new token: shorten it"
            )
        if requested is None:
            return min(default, room)
        if requested > room:
            raise MaxTokensTooLarge(
                f"{field} {shown_int(requested)} + the prompt's {prompt_tokens} tokens exceed max_seq_len "
                f"{self.max_seq_len}: send {field} <= {room}, or a shorter prompt"
            )
        return requested

    @staticmethod
    def min_tokens(min_tokens: int | None, max_new_tokens: int, field: str, sent: bool) -> int:
        """vLLM's min_tokens (None: 0), at most the completion limit: `field`'s value, `sent` by the client or not."""
        if min_tokens is not None and min_tokens > max_new_tokens:
            limit = f"{field} {max_new_tokens}" if sent else f"{field} (not sent: {max_new_tokens} here)"
            raise MinTokensTooLarge(
                f"min_tokens {shown_int(min_tokens)} exceeds {limit}: send min_tokens <= {max_new_tokens}, or a "
                f"larger {field}"
            )
        return min_tokens or 0

    def top_k(self, top_k: int | None) -> int:
        """0 (off) for None and for every k that keeps the whole vocabulary, as HF and vLLM read it."""
        return 0 if top_k is None or top_k >= self.vocab_size else top_k

    def logit_bias(self, biases: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias (token id strings, checked as digits) as the sampler takes it; ids past the
        model's logits are refused."""
        pairs = {int(token): bias for token, bias in (biases or {}).items()}
        bad = next((token for token in pairs if token >= self.vocab_size), None)
        if bad is not None:
            raise InvalidTokens(f"logit_bias: {_outside(bad, self.vocab_size)}")
        return tuple(sorted(pairs.items()))

    def stop_token_ids(self, ids: list[int] | None, min_tokens: int, ignore_eos: bool) -> frozenset[int]:
        """vLLM's stop_token_ids as the engine takes them; ids past the model's logits are refused, and so are stop
        tokens that, with EOS, are the whole vocabulary under min_tokens, which holds every one of them back: the
        engine would be left no token to draw (logits all -inf, a failed step told as the server's fault). A
        vocabulary of at most MAX_STOP_TOKEN_IDS + 1 tokens (byte-level models) can be covered so."""
        bad = next((token for token in ids or () if token >= self.vocab_size), None)
        if bad is not None:
            raise InvalidTokens(f"stop_token_ids: {_outside(bad, self.vocab_size)}")
        stops = frozenset(ids or ())
        if min_tokens and len(stops | (frozenset() if ignore_eos else self.eos_ids)) >= self.vocab_size:
            raise InvalidTokens(
                f"stop_token_ids: with the end-of-sequence token they are all {self.vocab_size} tokens of the "
                "vocabulary, which min_tokens holds back: no token is left to draw; send fewer stop_token_ids, or "
                "min_tokens 0"
            )
        return stops

    @staticmethod
    def temperature(temperature: float) -> float:
        return temperature if temperature == 0 else max(temperature, MIN_TEMPERATURE)

    def adapter_ref(self, model_or_adapter: str | None) -> str | None:
        """None, "" and the base model's served name mean the base model."""
        return None if model_or_adapter in (None, "", self.base.served_name) else model_or_adapter

    async def grammar(self, spec: GrammarSpec | None) -> CompiledGrammar | None:
        """The compiled grammar of a request that asks for one (compiled off the loop, cached); a 422 if it cannot.
        The compile counts against the client's share: the compiler's threads are every client's."""
        if spec is None:
            return None
        with self.scheduler.client_shares.holding():
            return await self.grammars.get(spec)

    # ---- running -------------------------------------------------------------------------------------------
    async def stream(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter,
        grammar: CompiledGrammar | None = None,
        scoring: bool = False,
    ) -> AsyncGenerator[TokenEvent]:
        """Events of one request (its output constrained by `grammar`, if given: a matcher of its own). Errors
        before the first event (unknown adapter, queue full, prompt too long) raise typed errors; leaving early
        cancels the request in the engine. `scoring`: a request of no tokens (OpenAI's max_tokens 0), whose
        prompt is scored in a step, which draws a token (`sampling` asks for one): dropped here (`_unsampled`),
        before anything counts it as generated."""
        label = self._label(adapter)
        try:
            request = GenerationRequest(
                prompt_ids,
                sampling,
                grammar=grammar.matcher() if grammar else None,
                cache_salt=prefix_salt.get(),
                client=current_client.get(),
            )
            self.scheduler.check(request)  # a request refused anyway must not load an adapter or evict one
            held = None
            if adapter is not None:  # loading it counts against the client's share, as the queue does after
                with self.scheduler.client_shares.holding():
                    held = await self._hold(adapter)
            if held is not None:
                label = self._label(adapter)  # indexed now, if another server stored it
                request.adapter_key, request.lora, request.on_finish = held
            try:
                token_stream = self.scheduler.submit(request)
            except BaseException:
                if held is not None:
                    held[2]()  # the engine never took it
                raise
        except LoraplexError as exc:
            self.metrics.requests.labels(self._still(label), str(exc.http_status)).inc()
            raise
        self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))  # resolved after the hold, with no wait since
        status = CLIENT_CLOSED
        generated = self.metrics.generated_tokens.labels(label)
        first = True
        try:
            async for event in token_stream:
                if scoring:
                    event = _unsampled(event)
                if first:  # every event of a request carries its count
                    self.metrics.prompt_tokens_cached.inc(event.cached_tokens)
                    first = False
                if event.token_id is not None:
                    generated.inc()
                yield event
            status = "200"
        except LoraplexError as exc:
            status = str(exc.http_status)
            raise
        finally:
            await token_stream.aclose()
            # the version may have been deleted while it ran, and its series dropped: `label` would bring it back
            self.metrics.requests.labels(self._still(label), status).inc()

    async def _hold(self, adapter: str | AdapterMix) -> tuple[str, LoraWeights, Callable[[], None]]:
        """(adapter key, weights, release) for the request's lifetime: a lease on the adapter, or on each
        component of a mix (so none is unloaded or deleted under it) and the derived adapter."""
        if isinstance(adapter, str):
            lease = await self.registry.acquire(adapter)
            return lease.key, lease.weights, lease.release
        holds: list[Callable[[], None]] = []

        def release() -> None:
            for hold in holds:
                hold()

        try:
            leases: list[Lease] = []
            for ref in adapter.refs:
                leases.append(await self.registry.acquire(ref))
                holds.append(leases[-1].release)
            key = mix_key([lease.key for lease in leases], adapter.weights)
            components = [(lease.key, lease.weights, w) for lease, w in zip(leases, adapter.weights, strict=True)]
            mixed, hold = await self.mixes.acquire(key, components)
            holds.append(hold)
            return key, mixed, release
        except BaseException:
            release()
            raise

    async def _pinned(self, adapter: Adapter, runs: int) -> Adapter:
        """`adapter` with each name resolved to the version it means now (`name@N`), where a request runs several
        requests (choices, prompts): they start one after another, and a version uploaded meanwhile must not serve
        some of them. A ref that does not resolve is left as it is: each run's stream refuses it, as for one."""
        if adapter is None or runs == 1:
            return adapter
        try:
            if isinstance(adapter, str):
                return (await self.registry.resolve(adapter)).key
            keys = [(await self.registry.resolve(ref)).key for ref in adapter.refs]
            return AdapterMix(tuple(keys), adapter.weights)
        except AdapterError:
            return adapter

    async def _on_one_version(self, adapter: Adapter, runs: int, start: Callable[[Adapter], Awaitable[T]]) -> T:
        """`start(adapter pinned)` for a request of several runs (see `_pinned`), started once more on the version a
        name means now where another server has deleted the one it meant (a rollback there), as `acquire` does for
        one run: the runs' leases that found that version gone took it out of the index. Every run is started again,
        so that all run on one version."""
        pinned = await self._pinned(adapter, runs)
        try:
            return await start(pinned)
        except AdapterNotFound:
            again = await self._pinned(adapter, runs)
            if again == pinned:  # a version named, or nothing moved: the 404 stands
                raise
            return await start(again)

    def _forget_labels(self, removed: list[str]) -> None:
        """The metrics' series of deleted versions (`name@N`), and of their names where no version is left."""
        names = [name for name in {key.partition("@")[0] for key in removed} if not self.registry.store.has(name)]
        self.metrics.forget_adapters([*removed, *names])

    def _label(self, adapter: str | AdapterMix | None) -> str:
        if adapter is None:
            return BASE_LABEL
        if isinstance(adapter, AdapterMix):
            return MIX_LABEL
        try:  # the index only: a label never waits on a remote store
            self.registry.store.resolve(adapter, recheck=False)
        except AdapterError:
            return UNKNOWN_LABEL
        return adapter  # a stored name (at most 64 characters) or name@N

    def _still(self, label: str) -> str:
        """`label`, or the unknown adapters' label once the adapter it names has left the store."""
        if label in (BASE_LABEL, MIX_LABEL, UNKNOWN_LABEL):
            return label
        return self._label(label)

    async def open_stream(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter,
        grammar: CompiledGrammar | None = None,
        scoring: bool = False,
    ) -> AsyncIterator[TokenEvent]:
        """`stream`, started: waits for the first event so that errors before it (unknown adapter, queue
        full, prompt too long) raise here, while a streaming route can still answer with an HTTP error."""
        events = self.stream(prompt_ids, sampling, adapter, grammar, scoring)
        return _Opened(await anext(events), events)

    async def generate(
        self,
        request: Request,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter,
        grammar: CompiledGrammar | None = None,
    ) -> Generation:
        """Run to the end; a client that disconnects meanwhile cancels the request at once."""
        return (await self.generate_many(request, [(prompt_ids, sampling)], adapter, grammar))[0]

    async def generate_many(
        self,
        request: Request,
        runs: list[Run],
        adapter: Adapter,
        grammar: CompiledGrammar | None = None,
        scoring: bool = False,
    ) -> list[Generation]:
        """One Generation per run, in order, run concurrently as requests of the same batch; the first error (queue
        full, unknown adapter) cancels the others and raises, as does a client that disconnects. `scoring`: see
        `stream`."""

        async def collect(prompt_ids: list[int], sampling: SamplingParams, pinned: Adapter) -> Generation:
            result = Generation(len(prompt_ids))
            async for event in self.stream(prompt_ids, sampling, pinned, grammar, scoring):
                result.events.append(event)
            return result

        async def collect_all(pinned: Adapter) -> list[Generation]:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(collect(*run, pinned)) for run in runs]
            except ExceptionGroup as errors:  # the routes map one typed error; the first is the cause
                raise errors.exceptions[0] from None
            return [t.result() for t in tasks]

        return await until_disconnected(request, lambda: self._on_one_version(adapter, len(runs), collect_all))

    async def open_streams(
        self, runs: list[Run], adapter: Adapter, grammar: CompiledGrammar | None = None, scoring: bool = False
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(index of its run, event) of several requests, as they come; errors before the first events raise here.
        Closing the stream cancels every request still running. `scoring`: see `stream`."""

        async def open_all(pinned: Adapter) -> AsyncIterator[tuple[int, TokenEvent]]:
            streams: list[AsyncIterator[TokenEvent]] = []
            try:
                for prompt_ids, sampling in runs:
                    streams.append(await self.open_stream(prompt_ids, sampling, pinned, grammar, scoring))
            except BaseException:
                for opened in streams:
                    await opened.aclose()  # type: ignore[attr-defined]
                raise
            return _merged(streams)

        return await self._on_one_version(adapter, len(runs), open_all)


def _outside(token: int, vocabulary: int) -> str:
    return f"token id {shown_int(token)} is not in the vocabulary (0..{vocabulary - 1})"


def _unsampled(event: TokenEvent) -> TokenEvent:
    """A scoring request's event: the token its step drew was never asked for, so the event says nothing was
    generated (no token, text or logprob), ended by length as vLLM's; its prompt's scores stay."""
    if event.token_id is None:  # an end of its own (cancelled): as it is
        return event
    return replace(event, token_id=None, text="", logprob=None, top_logprobs=(), finish_reason="length",
                   stop_reason=None)  # fmt: skip


class _Opened:
    """A stream whose first event has come, that event put back in front. Closing it closes the stream, which cancels
    its request, whether it was read or not (a generator closed before it started runs none of its body: the choices
    open_streams had opened when a later one was refused ran on till nothing referred to them)."""

    def __init__(self, first: TokenEvent, events: AsyncGenerator[TokenEvent]) -> None:
        self._first: TokenEvent | None = first
        self._events = events

    def __aiter__(self) -> "_Opened":
        return self

    async def __anext__(self) -> TokenEvent:
        if (first := self._first) is not None:
            self._first = None
            return first
        return await anext(self._events)

    async def aclose(self) -> None:
        self._first = None
        await self._events.aclose()


async def _merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Interleave streams by arrival; an error in one raises here, and closing this cancels them all. At most one
    item a stream waits here: the rest of a stream read slowly waits in its own queue, where its connection's
    backlog counts it (backlog.py)."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue(len(streams))

    async def pump(index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for event in stream:
                    await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def choice_samplings(sampling: SamplingParams, count: int) -> list[SamplingParams]:
    """`count` choices of one request: the same parameters, choice i seeded with seed + i when a seed is set,
    so each choice equals the same request sent alone with that seed."""
    if sampling.seed is None:
        return [sampling] * count
    return [replace(sampling, seed=(sampling.seed + i) % 2**64) for i in range(count)]


async def until_disconnected(request: Request, work: Callable[[], Awaitable[T]], poll: float = 0.1) -> T:
    """Await `work()`, cancelling it if the HTTP client disconnects first (a non-streaming response has no
    other way to notice)."""
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                log.info("client disconnected from %s; its request is cancelled", request.url.path)
                raise ClientDisconnected("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


def _template_texts(message: dict[str, Any]) -> list[str]:
    """The texts of a message that its chat template renders: its content, the call it answers (a tool turn's
    tool_call_id) and its tool calls' ids, names and arguments."""
    calls = message.get("tool_calls") or []
    return [
        message["content"],
        message.get("tool_call_id") or "",
        *(text for call in calls for text in (call["id"], call["function"]["name"], call["function"]["arguments"])),
    ]
