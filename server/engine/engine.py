"""The engine: one thread owns the model and the device and runs the continuous-batching loop.

Each iteration admits waiting requests into free KV rows (activating their adapter into a slot if needed),
then runs ONE forward over a flat batch of tokens: the next token of every decoding request and chunks of the
prompts still prefilling, up to the step's prompt-token budget (batching.py decides, step.py lays it out).
The forward's tokens are sampled on the device and come back in one copy. The next step does not wait for that
copy: its decode tokens are fed from the device (step.py), so it is launched first, and the host takes the last
step's tokens (ids, grammar state, ends by EOS or length), detokenizes them and sends their events while the
device runs it. On CUDA the device then never waits for the host between steps. A request whose next draw reads what
the host has not taken yet (a grammar's mask, a penalty over the tokens so far) makes the engine take the last
step's tokens after it launches the next forward and before it launches that forward's draws. Requests leave the
moment the host sees them finish or they are cancelled, freeing their row; a token drawn for a request after its end
(its EOS or a stop sequence was still on the way) is discarded. Length ends are known ahead and cost nothing. A
request that fails (at admission or in a forward) ends alone; the loop goes on.

Admission is fair between clients and, in each client's turns, between adapters, and a full queue is shared
between clients (waiting.py): one client's flood delays another client's request by one row at most, and cannot
keep it out of the queue. The rows are shared too: where every row runs and a client holding fewer than its share
(the rows over the clients that run, wait or are paused) has a request waiting, the client holding the most rows past
its share pauses one of its decoding rows, the one with the fewest tokens: its keys and values go to host memory, and
its row to the waiting request. A paused row goes before its client's waiting requests in the admission order and,
resumed into any free row, takes its keys and values back and decodes on as if never paused. Without it, one client's
requests running long answers (n choices each, max_tokens in the thousands) held every row, and another client's
request waited for them all. One client alone may hold every row. Admitted prompts take each step's prompt budget in
turns between clients (batching.py): one client's burst of long prompts holds another client's prompt for one of
them at most.

A request asking for its prompt's logprobs (prompt_logprobs) has every prompt position scored: it takes no cached
prefix, and a step holding a chunk of its prompt keeps those positions' logits beside the sampled ones: it replays
its bucket's scoring graph (graphs.py), the same step with a wider head, and its draws are launched and taken as
any step's. The scores reach the host with the request's first token, as the copies left them (PromptScores): their
objects, tens a prompt token, are made where the event is consumed, not on this thread, which every request waits on.
"""

import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters.lora import LoraWeights
from loraplex.memory import available_memory
from server.engine.attention import ATTENTION_NAME, KVCache, StepContext, kv_head_dim, kv_row_bytes
from server.engine.batching import SCORED_TOKENS, plan_step
from server.engine.config import EngineConfig
from server.engine.constraints import MaskFiller, StepMasks
from server.engine.errors import (
    AdapterTooLarge,
    EngineStopped,
    GrammarDeadEnd,
    GrammarFailed,
    InvalidSampling,
    NonFiniteOutput,
    PromptTooLong,
)
from server.engine.fusions import wrap_fusions
from server.engine.graphs import StepGraphs
from server.engine.multilora import (
    LoraContext,
    LoraLayout,
    LoraStore,
    MultiLoraLinear,
    PackCache,
    ShrinkGroup,
    lora_targets,
    shrink_groups,
)
from server.engine.prefix_cache import KVRows
from server.engine.requests import FinishReason, GenerationRequest, PromptScores, StepScores, TokenEvent, Top
from server.engine.sampling import device_tensor, draw, final_logits, top_logprobs
from server.engine.slots import SlotTable
from server.engine.step import Segment, Sequence, StepBuffer, StepTensors
from server.engine.text import TextStream
from server.engine.waiting import EventSink, WaitingQueue

log = logging.getLogger("loraplex.engine")

# on_activation(adapter key, slot, seconds from CPU weights to usable slot)
ActivationHook = Callable[[str, int, float], None]


@dataclass
class _Row:
    """A request the engine has admitted: it owns one KV row and holds one slot user."""

    request: GenerationRequest
    sink: EventSink
    row: int
    slot: int
    ids: list[int]  # prompt + generated so far
    prefilled: int  # prompt tokens already written into the cache
    cached: int  # prompt tokens found in the KV cache (prefix_cache.py), not computed for it
    text: TextStream
    generator: torch.Generator | None
    # ids as a host tensor, for rows whose draw reads them (a penalty): each step sends its filled prefix to the
    # device in one copy, where converting the list took ~150 ns an id (2,000 ids: 0.3 ms a row every step)
    seen: torch.Tensor | None
    stops: frozenset[int]  # the tokens that end it: EOS (unless ignore_eos) and its stop_token_ids
    generated: int = 0
    ended: bool = False  # released: its KV row and slot are another request's now
    # its prompt's scored chunks (prompt_logprobs), until its first token's event carries them: (the step's scores,
    # the chunk's first position among them, its positions)
    scores: list[tuple[StepScores, int, int]] = field(default_factory=list)
    # paused (another client's share of the rows): its first len(ids) - 1 positions' keys and values in host memory
    # (KVCache.save); it holds no KV row and no slot
    saved: list[torch.Tensor] | None = None
    turn: int | None = None  # its place in the prompts' rotation between clients, once its client's first (batching.py)


class _RowShares:
    """Each client's share of the KV rows in one admission pass: the rows over the clients that run, wait or are
    paused (one at least); a client under it may take a row from the client holding the most past it."""

    def __init__(self, rows: Iterable[_Row], asking: set[str | None], total: int) -> None:
        self.total = total
        self.asking = asking  # the clients with a request waiting or a row paused
        self.recount(rows)

    def recount(self, rows: Iterable[_Row]) -> None:
        self.holding = Counter(row.request.client for row in rows)
        self.share = max(1, self.total // max(1, len(self.asking | set(self.holding))))

    def taking(self) -> bool:
        """Whether a client asking for a row holds fewer than its share while another holds more than its own."""
        share = self.share
        return any(self.holding[c] < share for c in self.asking) and any(h > share for h in self.holding.values())

    def giver(self, client: str | None) -> str | None:
        """The client that gives `client` a row: `client` holds fewer than its share, the other the most past it."""
        if self.holding[client] >= self.share:
            return None
        heaviest = max((c for c in self.holding if c != client), key=self.holding.__getitem__, default=None)
        return heaviest if heaviest is not None and self.holding[heaviest] > self.share else None


class _Output(NamedTuple):
    """A token taken from the device whose text and event wait until the next step has been launched."""

    row: _Row
    index: int
    token: int
    logprob: float
    top: Top
    finish: FinishReason | None  # decided by the token alone (EOS, a complete grammar, max tokens)
    textless: bool  # a stop token, whose text is left out (vLLM's include_stop_str_in_output keeps it)
    stop_reason: int | None  # the token, where it is one of the request's stop_token_ids that ended it


class _Drawn(NamedTuple):
    """A step's sampling, launched on the device: every row's token and logprob, then the asking rows' top ids
    and logprobs, flat in one float64 host tensor, on its way from the device until `ready`."""

    rows: list["_Row"]  # the sampled rows, in the order of their draws
    flat: torch.Tensor
    ready: torch.cuda.Event | None  # None: on the host already
    masks: StepMasks | None
    asking: list[int]  # rows (by position) that asked for top logprobs
    top_n: int  # columns of top logprobs per asking row


def _reads_its_tokens(row: _Row) -> bool:
    """Whether the row's next draw reads its tokens so far on the host: a grammar's mask, a penalty's counts."""
    return row.request.grammar is not None or row.request.sampling.penalized


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        on_activation: ActivationHook | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.no_adapter = config.max_active_adapters  # the all-zero slot
        self._on_activation = on_activation
        text_config = model.config.get_text_config()
        model.set_attn_implementation(ATTENTION_NAME)
        self._lora_context = LoraContext(config.max_active_adapters, config.max_lora_rank)
        greedy_pick = None  # a greedy step's tokens and logprobs in one kernel pass, where the kernels run
        if config.fused_kernels or (config.fused_kernels is None and self.device.type == "cuda"):
            from server.engine import kernels  # Triton: in CUDA builds of torch, not a CPU install's requirement

            kernels.install(model)
            self._lora_context.decode_kernels = kernels.FusedDecode()
            greedy_pick = kernels.greedy_pick
        self.lora_store, self.lora_layers = self._wrap_targets()
        if self._lora_context.decode_kernels is not None:
            wrap_fusions(self.model, self._lora_context)
        self._lora_context.slot_ranks = self.lora_store.ranks
        self._greedy_pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = greedy_pick
        self._packs = PackCache(self.lora_store.layout, self.dtype, pin=self.device.type == "cuda")
        self.cache = KVCache(
            text_config.num_hidden_layers,
            config.max_batch_size,
            text_config.num_key_value_heads,
            config.max_seq_len,
            kv_head_dim(text_config),
            self.dtype,
            self.device,
        )
        self.eos_ids = self._eos_ids()
        self.slots = SlotTable(config.max_active_adapters)
        self._kv_rows = KVRows(config.max_batch_size, config.prefix_cache)
        self._rows: dict[str, _Row] = {}
        self._paused: dict[str, _Row] = {}  # request id -> a row paused for another client's share of the rows
        self._turns = itertools.count()  # the prompts' rotation between clients (_turn)
        self._waiting = WaitingQueue()  # under _cv; its turns on the engine thread only
        self._cancels: set[str] = set()
        self._deactivations: list[str] = []
        self._masks = MaskFiller()  # the steps' grammar masks; its threads start at the first costly step
        self._pending: list[_Output] = []  # the last step's tokens, delivered once the next step is launched
        self._in_flight: _Drawn | None = None  # the last step's draws, not taken by the host yet
        # the last step's drawn tokens on the device, in its sampled rows' order: what the next step feeds
        self._fed = torch.zeros(config.max_batch_size, dtype=torch.long, device=self.device)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._active_snapshot: dict[str, int] = {}
        self.activation_seconds: deque[float] = deque(maxlen=1024)  # recent CPU -> slot latencies
        # Each step's tokens and metadata are laid out here and reach the device in one copy.
        self._step = StepBuffer(config.max_step_tokens, config.max_batch_size, self.cache.dummy_row, self.no_adapter,
                                pin=self.device.type == "cuda")  # fmt: skip
        self._graphs: StepGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            self._graphs = StepGraphs(self._graph_forward, config.graph_buckets(), self._step.host, self.device,
                                      SCORED_TOKENS)  # fmt: skip

    # ---- set-up -------------------------------------------------------------------------------------
    def _wrap_targets(self) -> tuple[LoraStore, dict[str, MultiLoraLinear]]:
        targets = lora_targets(self.model, self.config.target_modules)
        layout = LoraLayout.of(targets)
        a_offsets, b_offsets = layout.a_offsets, layout.b_offsets
        store = LoraStore(layout, self.config.max_active_adapters, self.config.max_lora_rank, self.dtype, self.device)
        layers: dict[str, MultiLoraLinear] = {}
        for members in shrink_groups(targets, a_offsets):
            in_features, out_features = members[0][1].in_features, sum(module.out_features for _, module in members)
            a0, b0 = a_offsets[members[0][0]], b_offsets[members[0][0]]
            group = ShrinkGroup(store.a[:, :, a0 : a0 + len(members) * in_features],
                                store.b[:, :, b0 : b0 + out_features], [module for _, module in members])  # fmt: skip
            for member, (name, module) in enumerate(members):
                lora_a, lora_b = store.views(name, module.in_features, module.out_features)
                wrapped = MultiLoraLinear(module, module.in_features, module.out_features, lora_a, lora_b,
                                          self._lora_context, group, member)  # fmt: skip
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, wrapped)
                layers[name] = wrapped
        return store, layers

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else value or [])
        return frozenset(ids)

    # ---- thread-safe API ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still waiting or running end with an EngineStopped error event."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        self._masks.close()
        self._fail_all(EngineStopped("the engine was stopped"))

    def submit(
        self,
        request: GenerationRequest,
        sink: EventSink,
        max_queue: int | None = None,
        max_queue_per_adapter: int | None = None,
    ) -> None:
        """Queue a request; `sink` gets its events on the engine thread. Raises before anything is queued. With
        `max_queue` (and `max_queue_per_adapter`), QueueFull or AdapterQueueFull unless it has room (waiting.py): a
        place another client's newest request gives is taken last, with the request queued in the same hold of the
        lock, so that only a request that will wait takes one (taken before a check that refused this request, a
        client's newest request ended with 429 for nothing)."""
        self.validate(request)
        if request.lora is not None:
            self._packs.get(request.lora)  # packed here, on the caller's thread: the engine thread only copies
        with self._cv:
            if self._stopped:
                raise EngineStopped("the engine is stopped")
            if max_queue is not None:
                self._waiting.make_room(request.client, request.adapter_key, max_queue, max_queue_per_adapter,
                                        take=True)  # fmt: skip
            self._waiting.add((request, sink))
            self._cv.notify()

    def check_room(
        self, client: str | None, adapter_key: str | None, max_queue: int, max_queue_per_adapter: int | None = None
    ) -> None:
        """Raise QueueFull or AdapterQueueFull unless a request of `client` for `adapter_key` may join a queue of at
        most `max_queue`, and at most `max_queue_per_adapter` for one adapter (waiting.py): free, or by a place
        another client's newest request would give (`submit` takes it)."""
        with self._cv:
            self._waiting.make_room(client, adapter_key, max_queue, max_queue_per_adapter, take=False)

    def validate(self, request: GenerationRequest) -> None:
        n, limit = len(request.prompt_ids), self.config.max_seq_len
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model.get_input_embeddings().num_embeddings
        # runs on the event loop, twice a request (the scheduler checks before the adapter loads): min/max in C
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise InvalidSampling(f"prompt token ids must lie in 0..{vocab - 1}")
        seed = request.sampling.seed
        if seed is not None and not 0 <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise InvalidSampling(f"seed must lie in 0..2**64 - 1, got {seed}")
        if n + request.sampling.max_new_tokens > limit:
            raise PromptTooLong(n, request.sampling.max_new_tokens, limit)
        if (request.lora is None) != (request.adapter_key is None):
            raise ValueError("adapter_key and lora come together (both None for the base model)")
        if request.lora is not None:
            self.check_adapter(request.lora)

    def check_adapter(self, lora: LoraWeights) -> None:
        """Raise AdapterTooLarge unless every module of `lora` fits a slot of a wrapped layer."""
        if lora.rank > self.config.max_lora_rank:
            raise AdapterTooLarge(f"adapter rank {lora.rank} exceeds max_lora_rank {self.config.max_lora_rank}")
        for name, module in lora.modules.items():
            layer = self.lora_layers.get(name)
            if layer is None:
                raise AdapterTooLarge(f"adapter targets {name!r}, which is not a LoRA-served layer of the model")
            if module.a.shape[1] != layer.in_features or module.b.shape[0] != layer.out_features:
                raise AdapterTooLarge(
                    f"adapter module {name!r} maps {module.a.shape[1]} -> {module.b.shape[0]} features, "
                    f"the model's layer {layer.in_features} -> {layer.out_features}"
                )

    def prepare_adapter(self, lora: LoraWeights) -> LoraWeights:
        """Pack `lora` for activation and return the adapter to keep instead of it: the same weights as views of
        the pack, which lives as long as they do, so a CPU tier holds each adapter once. Thread-safe; the
        registry calls it on its load worker, so the engine thread only pays the device copies."""
        return self._packs.pack_in_place_of(lora)

    @property
    def alive(self) -> bool:
        """The engine thread runs and accepts requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step (its row is freed); its last event says "cancelled"."""
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    def deactivate(self, key: str) -> None:
        """Free the slot of adapter `key` between steps (at once if idle, else when its last row leaves)."""
        with self._cv:
            self._deactivations.append(key)
            self._cv.notify()

    def active_adapters(self) -> dict[str, int]:
        """Adapter key -> slot, as of the last step (a snapshot, safe from any thread)."""
        return dict(self._active_snapshot)

    def waiting_adapters(self) -> list[str]:
        """Adapter keys of the queued requests, each once (safe from any thread): from the per-adapter counts, so a
        metrics scrape costs O(adapters), not O(waiting requests)."""
        with self._cv:
            return [key for key in self._waiting.per_adapter if key is not None]

    def waiting_counts(self) -> dict[str | None, int]:
        """Adapter key (None: the base model) -> its queued requests, for every key with any (safe from any
        thread)."""
        with self._cv:
            return dict(self._waiting.per_adapter)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a row: queued, or paused for another client's share of the rows."""
        return len(self._waiting) + len(self._paused)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_paused(self) -> int:
        """Requests paused for another client's share of the rows (counted in num_waiting too)."""
        return len(self._paused)

    # ---- the loop (engine thread) -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopped or self._waiting.has_items or self._rows or self._paused or self._cancels
                           or self._deactivations or self._in_flight):  # fmt: skip
                    self._cv.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as exc:  # a fault outside one request's guard: end the running ones, go on
                log.exception("an engine step failed; its running requests end with an error")
                self._salvage()
                self._deliver()
                for row in list(self._rows.values()):
                    self._finish(row, "error", error=exc)
            except BaseException as exc:  # the interpreter is going down: liveness must say so
                with self._cv:
                    self._stopped = True
                self._fail_all(EngineStopped(f"the engine failed: {exc}"))
                raise

    def step(self) -> bool:
        """One iteration; True if it ran a forward or took a step's tokens. Tests call it directly, without the
        thread."""
        self._apply_commands()
        self._admit()
        drawn = self._in_flight
        in_flight = {id(r) for r in drawn.rows} if drawn is not None else set()
        decoding: list[_Row] = []
        prefilling: list[tuple[_Row, int]] = []  # (row, prompt tokens not yet in the cache)
        for r in self._rows.values():
            left = len(r.request.prompt_ids) - r.prefilled
            drawing = id(r) in in_flight
            if left:
                prefilling.append((r, left))
            elif (r.generated or drawing) and r.generated + drawing < r.request.sampling.max_new_tokens:
                decoding.append(r)  # (a token on its way that is the request's last ends it: no step for it)
        budget = self.config.max_prefill_tokens if decoding else self.config.idle_prefill_tokens
        plan = plan_step(
            decoding,
            prefilling,
            budget,
            scored=lambda r: r.request.sampling.prompt_logprobs is not None,
            client=lambda r: r.request.client,
            turn=self._turn,
        )
        if plan:
            self._guarded([row for row, _ in plan], lambda: self._run(plan))
            return True
        took = self._in_flight is not None
        self._take_in_flight()
        self._deliver()
        return took

    def _turn(self, row: _Row) -> int:
        """The row's place in the prompts' rotation between clients: numbered when its prompt is first its client's
        first still prefilling (plan_step asks then), so that it goes behind the other clients' waiting ones."""
        if row.turn is None:
            row.turn = next(self._turns)
        return row.turn

    def _take_in_flight(self) -> None:
        drawn, self._in_flight = self._in_flight, None
        if drawn is not None:
            self._take(drawn)

    def _salvage(self) -> None:
        """After a failure: take the draws launched before it (they are their requests' tokens) if they can be
        read; the caller ends the rows that still wait."""
        try:
            self._take_in_flight()
        except Exception:  # the device itself failed: those rows end with the step's error
            log.exception("a step's drawn tokens could not be read")

    def _guarded(self, rows: list[_Row], work: Callable[[], None]) -> None:
        # A failing forward (e.g. out of memory) ends the requests in it, not the engine. The operator hears why
        # here: a client of a non-streaming route only gets a 500. The rows waiting for the last step's draws end
        # too (a length end needs no step of its own), after those draws if they can be read. Draws launched by
        # `work` itself are of `rows`.
        before = self._in_flight.rows if self._in_flight is not None else []
        try:
            work()
        except Exception as exc:
            log.exception("an engine step failed; its %d requests end with an error", len(rows))
            self._salvage()
            self._deliver()  # the earlier steps' events first: each request's stay in order
            for row in [*rows, *before]:
                if not row.ended:
                    self._finish(row, "error", error=exc)

    def _apply_commands(self) -> None:
        with self._cv:
            cancels, self._cancels = self._cancels, set()
            deactivations, self._deactivations = self._deactivations, []
            if cancels:
                for request, sink in self._waiting.remove(cancels):
                    self._end_unadmitted(request, sink, "cancelled")
            for request, sink, error in self._waiting.take_leaving():
                self._end_unadmitted(request, sink, "error", error)
        drawn = self._in_flight
        if cancels and drawn is not None and any(r.request.request_id in cancels for r in drawn.rows):
            # the tokens already drawn are the cancelled rows' too; other cancels (queued requests, rows with no
            # token on the way) leave the next step to launch before the host reads them
            self._take_in_flight()
            self._deliver()  # a cancelled row's last token event comes before its end
        for request_id in cancels:
            row = self._rows.get(request_id) or self._paused.get(request_id)
            if row is not None:
                self._finish(row, "cancelled")
        for key in deactivations:
            self.slots.deactivate(key)
        self._active_snapshot = self.slots.active()

    def _admit(self) -> None:
        self.slots.begin_pass()
        shares = None  # counted once every row runs: a request of a client under its share may still take one
        if not self._kv_rows.free:
            if not (self._waiting.has_items or self._paused):  # every row runs and none is asked for: no count
                return
            shares = self._row_shares()
            if not shares.taking():  # nothing to admit into: no O(waiting) pass while every row runs
                return
        ahead: dict[str | None, list[_Row]] = {}
        for row in self._paused.values():
            ahead.setdefault(row.request.client, []).append(row)
        with self._cv:
            in_turn = self._waiting.in_turn(ahead)
        admitted: set[str] = set()
        served: list[GenerationRequest] = []  # in the order they left the queue or resumed in this pass
        for item in in_turn:
            request = item.request if isinstance(item, _Row) else item[0]
            if not self._kv_rows.free:
                shares = shares or self._row_shares()
                if not self._pause_for(request, shares):
                    if not shares.taking():
                        break
                    continue  # a later client may hold fewer than its share
            try:
                if isinstance(item, _Row):
                    if self._resume(item):
                        served.append(request)
                elif self._admit_one(*item):
                    admitted.add(request.request_id)
                    served.append(request)
                else:
                    continue
                if shares is not None:
                    shares.holding[request.client] += 1
            except Exception as exc:  # this request cannot run (e.g. its adapter cannot be activated): it alone ends
                log.warning("request %s failed at admission: %s", request.request_id, exc)
                served.append(request)
                if isinstance(item, _Row):
                    self._finish(item, "error", error=exc)
                else:
                    admitted.add(request.request_id)
                    self._end_unadmitted(request, item[1], "error", exc)
        if admitted:
            with self._cv:
                self._waiting.remove(admitted)
        if served:
            self._waiting.clients.served(request.client for request in served)
            self._waiting.adapters.served(request.adapter_key for request in served)
            self._active_snapshot = self.slots.active()

    def _row_shares(self) -> _RowShares:
        with self._cv:
            clients = self._waiting.clients_waiting
        clients |= {row.request.client for row in self._paused.values()}
        return _RowShares(self._rows.values(), clients, self.config.max_batch_size)

    def _pause_for(self, request: GenerationRequest, shares: _RowShares) -> bool:
        """Free a row for `request` by pausing one of the client that gives its client a row (_RowShares.giver):
        its decoding row with the fewest tokens, where host memory holds its keys and values twice over. False
        where none gives one, or the request would not take the row: it waits for another's prefill, or its adapter
        for a slot (a row paused for it then resumed into the row it left, to be paused again at the next pass)."""
        giver = shares.giver(request.client)
        scoring = request.sampling.prompt_logprobs is not None
        if giver is None or (not scoring and self._kv_rows.worth_waiting(request.cache_scope, request.prompt_ids)):
            return False
        if self._in_flight is not None:  # the rows' tokens of the last step, taken first: a paused row has them all
            self._take_in_flight()
            self._deliver()
            shares.recount(self._rows.values())
            if self._kv_rows.free:  # rows those tokens ended
                return True
        decoding = [row for row in self._rows.values() if row.request.client == giver and row.generated
                    and row.prefilled == len(row.request.prompt_ids)]  # fmt: skip
        if not decoding:
            return False
        row = min(decoding, key=lambda r: len(r.ids))
        key, leaving = request.adapter_key, None if row.slot == self.no_adapter else row.slot
        if key is not None and not self.slots.would_take(key, leaving):
            return False
        saved_bytes = kv_row_bytes(self.model.config.get_text_config(), len(row.ids), self.dtype)
        if 2 * saved_bytes > available_memory(torch.device("cpu")):
            return False
        try:  # every position but its last token's, which its next step writes
            saved = self.cache.save(row.row, len(row.ids) - 1)
        except Exception:  # host memory ran out meanwhile, say: nothing has changed, and the request waits
            log.exception("request %s could not be paused for another client's", row.request.request_id)
            return False
        self._pause(row, saved)
        shares.holding[giver] -= 1
        return True

    def _pause(self, row: _Row, saved: list[torch.Tensor]) -> None:
        """Take a decoding row out of the batch, its keys and values `saved` in host memory, its KV row and slot given
        back; it waits in _paused."""
        request, written = row.request, len(row.ids) - 1
        row.saved = saved
        self._kv_rows.wrote(row.row, request.cache_scope, row.ids, written)
        self._kv_rows.give_back(row.row, True, request.client)  # what it wrote may serve prompts meanwhile
        if row.slot != self.no_adapter:
            self.slots.release(row.slot)
        del self._rows[request.request_id]
        self._paused[request.request_id] = row

    def _resume(self, row: _Row) -> bool:
        """A paused row back in the batch, in a free row with its keys and values; False if its adapter must wait
        for a slot."""
        assert row.saved is not None
        request, written = row.request, len(row.ids) - 1
        slot = self._slot_for(request)
        if slot is None:
            return False
        place = self._kv_rows.take(request.cache_scope, row.ids[:written], reuse=False)
        try:
            self.cache.restore(place.row, row.saved)
        except BaseException:
            self._kv_rows.give_back(place.row, keep=False)
            if slot != self.no_adapter:
                self.slots.release(slot)
            raise
        self._kv_rows.wrote(place.row, request.cache_scope, row.ids, written)
        row.row, row.slot, row.saved = place.row, slot, None
        del self._paused[request.request_id]
        self._rows[request.request_id] = row
        return True

    def _slot_for(self, request: GenerationRequest) -> int | None:
        """The slot of the request's adapter, activated if it was not (the no-adapter slot for the base model); None
        if every slot is held by running rows."""
        if request.adapter_key is None:
            return self.no_adapter
        acquired = self.slots.acquire(request.adapter_key)
        if acquired is None:
            return None  # wait; later requests may still fit
        slot, needs_copy = acquired
        if needs_copy:
            try:
                self._activate(request.adapter_key, request.lora, slot)
            except BaseException:  # its hold on the slot ends with it, or none could reuse it
                self.slots.release(slot)
                self.slots.deactivate(request.adapter_key)  # its slot may hold half a copy
                raise
        return slot

    def _admit_one(self, request: GenerationRequest, sink: EventSink) -> bool:
        """Give `request` a row (and its adapter a slot); False if every slot is held by running rows, or if a prompt
        being prefilled will hold more of its prompt than any row does now (prefix_cache.py). A request scoring its
        prompt computes all of it anyway: it waits for no other's prefill."""
        scoring = request.sampling.prompt_logprobs is not None
        if not scoring and self._kv_rows.worth_waiting(request.cache_scope, request.prompt_ids):
            return False
        slot = self._slot_for(request)
        if slot is None:
            return False
        try:
            self._rows[request.request_id] = self._new_row(request, sink, slot)
        except BaseException:  # the request ends unadmitted: its hold on the slot ends with it
            if slot != self.no_adapter:
                self.slots.release(slot)
            raise
        return True

    def _new_row(self, request: GenerationRequest, sink: EventSink, slot: int) -> _Row:
        """The running state of an admitted request: its KV row (with the prompt prefix found cached in it), its
        generator and what its draws read."""
        params = request.sampling
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        seen = None
        if params.penalized:  # room for every id the request can have; pinned, so copies do not block
            seen = torch.empty(len(request.prompt_ids) + params.max_new_tokens, dtype=torch.long,
                               pin_memory=self.device.type == "cuda")  # fmt: skip
            seen[: len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        text = TextStream(self.tokenizer, params.stop, params.min_tokens, params.include_stop_str_in_output)
        # last: only the copy may fail past it. A request scoring its prompt needs every position's logits: no
        # cached prefix
        place = self._kv_rows.take(request.cache_scope, request.prompt_ids, reuse=params.prompt_logprobs is None)
        ids = list(request.prompt_ids)
        try:
            if place.source is not None:
                self.cache.copy_prefix(place.source, place.row, place.reused)
        except BaseException:
            self._kv_rows.give_back(place.row, keep=False)
            raise
        self._kv_rows.wrote(place.row, request.cache_scope, ids, place.reused)
        # ignore_eos: vLLM's stop_token_ids still end the answer
        stops = params.stop_token_ids | (frozenset() if params.ignore_eos else self.eos_ids)
        return _Row(request, sink, place.row, slot, ids, place.reused, place.reused, text, generator, seen, stops)

    def _activate(self, key: str, lora: LoraWeights | None, slot: int) -> None:
        assert lora is not None  # validate() pairs adapter_key with lora
        start = time.perf_counter()
        self.lora_store.load(slot, self._packs.get(lora))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.activation_seconds.append(seconds)
        if self._on_activation is not None:
            self._on_activation(key, slot, seconds)

    # ---- forwards -----------------------------------------------------------------------------------
    def _run(self, plan: list[tuple[_Row, int]]) -> None:
        """One forward over the plan's tokens, then sampling of the rows whose sequence ends on a new token and
        scoring of the prompt positions asked for (prompt_logprobs); the last step's tokens are taken and their
        events go out between this launch and the next."""
        plan = sorted(plan, key=lambda item: item[0].slot)  # stable: each adapter's tokens one run (step.py)
        previous = self._in_flight
        feed = {id(r): i for i, r in enumerate(previous.rows)} if previous is not None else {}
        seqs: list[Sequence] = []
        sampled: list[_Row] = []  # the rows whose sequence ends on a new token, in the order of their logits
        chunks: list[tuple[_Row, int]] = []  # prefilling rows and their prompt tokens after this step
        scored: list[int] = []  # the step's token (flat index) at each scored prompt position
        targets: list[int] = []  # the prompt token after each scored position: the one it scores
        scoring: list[tuple[_Row, int, int]] = []  # (row, its chunk's first position in `scored`, its positions)
        at = 0  # the flat index of the next sequence's first token: fill lays the sequences out in this order
        for row, n in plan:
            prompt = row.request.prompt_ids
            if row.prefilled == len(prompt):  # decoding: its last token, on the host or still on the device
                fed = feed.get(id(row))
                if fed is None:
                    seqs.append(Sequence(row.row, row.slot, [row.ids[-1]], len(row.ids) - 1, True))
                else:
                    seqs.append(Sequence(row.row, row.slot, [0], len(row.ids), True, fed))
                sampled.append(row)
            else:
                end = row.prefilled + n
                last = end == len(prompt)
                seqs.append(Sequence(row.row, row.slot, prompt[row.prefilled : end], row.prefilled, last))
                chunks.append((row, end))
                if last:
                    sampled.append(row)
                # position p scores prompt[p + 1]; the last prompt position's logits are sampled instead
                stop = min(end, len(prompt) - 1)
                if row.request.sampling.prompt_logprobs is not None and stop > row.prefilled:
                    scoring.append((row, len(scored), stop - row.prefilled))
                    scored += range(at, at + stop - row.prefilled)
                    targets += prompt[row.prefilled + 1 : stop + 1]
            at += len(seqs[-1].tokens)
        tokens = at
        if self._graphs is not None:
            width = self._graphs.bucket(tokens)
            self._step.fill(seqs, width)
            logits = self._graphs.run(self._step.host, width, scored)
        else:
            segments = self._step.fill(seqs, tokens)
            buffer = self._step.host.to(self.device, non_blocking=True)  # the host buffer itself on CPU
            keep = device_tensor(scored, self.device) if scored else None
            logits = self._forward(self._step.views(buffer, tokens, len(sampled)), segments, keep)
        if scored:
            top_n = max(row.request.sampling.prompt_logprobs or 0 for row, _, _ in scoring)
            scores = self._score(logits[logits.shape[0] - len(scored) :], targets, top_n)
            for row, first, count in scoring:
                row.scores.append((scores, first, count))
        for row, end in chunks:
            row.prefilled = end
            self._kv_rows.wrote(row.row, row.request.cache_scope, row.ids, end)
        # On CUDA the step so far was only launched: taking the last step's tokens, their text and events overlap
        # the device's work. A row whose draw reads its tokens so far on the host (a grammar's mask, a penalty) must
        # see its last one first: the host takes them between the forward's launch and the draws', so the device
        # runs the forward, not idles, while the host waits for them and advances the grammars.
        take_first = previous is not None and any(_reads_its_tokens(r) and id(r) in feed for r in sampled)
        if take_first:
            self._take(previous)
        if sampled:  # a row's token of the last step counts among those drawn before, taken by the host or not
            drawn = [r.generated + (not take_first and id(r) in feed) for r in sampled]
            self._in_flight = self._launch_sampling(sampled, logits[: len(sampled)], drawn)
        else:
            self._in_flight = None
        if previous is not None and not take_first:
            self._take(previous)
        self._deliver()

    @torch.inference_mode()
    def _forward(
        self, tensors: StepTensors, segments: list[Segment] | None, scored: torch.Tensor | None = None
    ) -> torch.Tensor:
        # the step's flat tokens [1, N] -> logits [len(sample_index) + len(scored), V]: of its sampled tokens, then
        # of its scored prompt positions (scored: [E] flat token indices; None: none)
        self._lora_context.set(tensors.slots, segments)
        fed = self._fed[tensors.feed.clamp(min=0)]  # [N]
        ids = torch.where(tensors.feed >= 0, fed, tensors.ids[0])[None]  # [1, N]
        keep = tensors.sample_index if scored is None else torch.cat([tensors.sample_index, scored])
        out = self.model(input_ids=ids, position_ids=tensors.positions, use_cache=False,
                         logits_to_keep=keep, engine_step=StepContext(self.cache, tensors))  # fmt: skip
        return out.logits[0]

    def _graph_forward(self, buffer: torch.Tensor, width: int, scored: torch.Tensor | None) -> torch.Tensor:
        return self._forward(self._step.views(buffer, width), None, scored)

    # ---- scoring prompts, sampling and finishing ----------------------------------------------------
    def _score(self, logits: torch.Tensor, targets: list[int], top_n: int) -> StepScores:
        """Each scored position's logprob of the prompt token after it, that token's rank and the top_n most likely
        tokens there, under the model's own distribution (vLLM's prompt_logprobs: no sampling parameter applies),
        launched on the device with one copy to the host."""
        # logits: [E, V] of the scored positions; targets[i]: the prompt token after position i
        logprobs = logits.float().log_softmax(-1)  # [E, V]
        picked = logprobs.gather(-1, device_tensor(targets, self.device)[:, None])  # [E, 1]
        rank = (logprobs >= picked).sum(-1)  # [E]: as vLLM counts it, tokens as likely as the target are ahead
        parts = [picked[:, 0].double(), rank.double()]
        top_n = min(top_n, logprobs.shape[-1])
        if top_n:
            values, ids = logprobs.topk(top_n, dim=-1)  # [E, top_n] each
            parts += [ids.double().flatten(), values.double().flatten()]
        return StepScores(*self._to_host(parts), len(targets), top_n)

    def _to_host(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """`parts` (float64: it holds token ids exactly) as one host tensor, on its way in one copy that does not block
        (pinned on CUDA), and the event that says it arrived (None on the CPU, where the copy is done)."""
        flat = torch.cat(parts).to("cpu", non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return flat, ready

    def _launch_sampling(self, rows: list[_Row], logits: torch.Tensor, drawn: list[int]) -> _Drawn:
        # logits: [len(rows), V]; drawn[i]: the tokens rows[i] drew before this draw. One device -> host copy
        # brings every row's token, logprob and top logprobs
        params = [r.request.sampling for r in rows]
        # vLLM's min_tokens: a row short of them draws no token that would end it
        banned = [r.stops if n < p.min_tokens else frozenset() for r, n, p in zip(rows, drawn, params, strict=True)]
        # Grammar masks first: the forward was only launched, so this CPU work overlaps the device's. A row the last
        # step's token ended (taken just before) has its draw computed in vain, and no mask.
        grammars = [None if r.ended else r.request.grammar for r in rows]
        masks = self._masks.fill(grammars, logits.shape[-1], banned)
        # the copy reads ids already taken; _take_token writes the next one past them
        seen = [
            (r.seen[: len(r.ids)].to(self.device, non_blocking=True), len(r.request.prompt_ids))
            if r.seen is not None
            else None
            for r in rows
        ]
        allowed = masks.allowed(logits.shape[-1], self.device) if masks is not None else None
        final = final_logits(logits, params, seen, allowed, banned)  # [B, V]
        if self._greedy_pick is not None and all(p.greedy and not p.top_logprobs for p in params):
            tokens, picked = self._greedy_pick(final)  # [B] each: no row needs the whole distribution
            asking, top_ids, top_values = top_logprobs(final, params)  # none asks
        else:
            logprobs = final.float().log_softmax(-1)  # [B, V]
            tokens = draw(logprobs, params, [r.generator for r in rows])  # [B]
            picked = logprobs.gather(-1, tokens[:, None])[:, 0]  # [B]
            asking, top_ids, top_values = top_logprobs(logprobs, params)  # [m, N] each
        self._fed[: len(rows)].copy_(tokens)  # what the next step's decode tokens are, before the host knows
        parts = [tokens.double(), picked.double()]
        if asking:
            parts += [top_ids.double().flatten(), top_values.double().flatten()]
        flat, ready = self._to_host(parts)
        return _Drawn(rows, flat, ready, masks, asking, top_ids.shape[-1] if asking else 0)

    def _take(self, drawn: _Drawn) -> None:
        """Wait for a step's tokens and take each one (_take_token)."""
        if drawn.ready is not None:
            drawn.ready.synchronize()
        host = drawn.flat.tolist()
        rows = drawn.rows
        b, m, n = len(rows), len(drawn.asking), drawn.top_n
        tops: dict[int, Top] = {}
        for j, i in enumerate(drawn.asking):
            ids = host[2 * b + j * n : 2 * b + (j + 1) * n]
            values = host[2 * b + m * n + j * n : 2 * b + m * n + (j + 1) * n]
            keep = rows[i].request.sampling.top_logprobs
            tops[i] = tuple((int(t), v) for t, v in zip(ids[:keep], values[:keep], strict=True))
        failed = drawn.masks.failed if drawn.masks is not None else {}
        for i, row in enumerate(rows):
            if row.ended:  # after this step was launched (EOS or a stop sequence on the way, a consumer gone, a
                continue  # text fault): this token was computed in vain and never existed
            if i in failed:
                self._grammar_failed(row, failed[i])
            elif math.isnan(host[b + i]):  # its logits held NaN or inf: what it drew means nothing
                self._not_finite(row)
            else:
                self._take_token(row, int(host[i]), host[b + i], tops.get(i, ()))

    def _take_token(self, row: _Row, token: int, logprob: float, top: Top) -> None:
        """What the next step needs of a token now: the row's ids, its grammar's state, and the ends the token
        decides alone (EOS, a complete grammar, max tokens), which free the row before the next step is planned.
        Its text (a stop sequence may end the row there) and its event wait in _pending for _deliver."""
        row.ids.append(token)
        if row.seen is not None:
            row.seen[len(row.ids) - 1] = token
        row.generated += 1
        params, grammar = row.request.sampling, row.request.grammar
        if grammar is not None:
            try:
                grammar.advance(token)
            except GrammarDeadEnd as exc:
                self._grammar_failed(row, exc)
                return
            except Exception as exc:  # this request's matcher alone
                self._grammar_failed(row, GrammarFailed(f"the grammar refused token {token}: {exc}"))
                return
        eos = token in row.stops
        # vLLM's stop_reason: the stop token id that ended the answer; None where EOS did (EOS first, as vLLM checks)
        stop_token = token if eos and (params.ignore_eos or token not in self.eos_ids) else None
        finish: FinishReason | None = None
        if eos or (grammar is not None and grammar.is_finished()):  # complete: only EOS could follow, so skip its step
            finish = "stop"
        elif row.generated >= params.max_new_tokens:
            finish = "length"
        if finish is not None:
            self._release(row, keep=True)
        textless = eos and not params.include_stop_str_in_output
        self._pending.append(_Output(row, row.generated - 1, token, logprob, top, finish, textless, stop_token))

    def _deliver(self) -> None:
        """The text and events of the tokens taken last step, in order. A row whose text reaches a stop sequence
        ends here; a token of its drawn since is discarded by _take."""
        pending, self._pending = self._pending, []
        for out in pending:
            row = out.row
            finish, stop_reason = out.finish, out.stop_reason
            try:
                if out.textless:  # the end of the sequence has no text of its own
                    text = row.text.flush()
                else:
                    text, stop = row.text.push(out.token)
                    if stop is not None:
                        finish, stop_reason = "stop", stop
                    elif finish is not None:
                        text += row.text.flush()
            except Exception as exc:  # this request's text alone (a tokenizer fault): it ends, the others go on
                self._send(row, out.index, None, "", None, "error", error=exc)
                continue
            self._send(row, out.index, out.token, text, out.logprob, finish, top=out.top, stop_reason=stop_reason)

    def _send(
        self,
        row: _Row,
        index: int,
        token: int | None,
        text: str,
        logprob: float | None,
        finish: FinishReason | None,
        error: BaseException | None = None,
        top: Top = (),
        stop_reason: int | str | None = None,
    ) -> None:
        request = row.request
        scored = None  # the prompt's scores go out with the first token, where asked for
        if token is not None and index == 0 and request.sampling.prompt_logprobs is not None:
            for scores, _, _ in row.scores:  # arrived already: this token was copied after them, on the same stream
                scores.wait()
            scored = PromptScores(request.prompt_ids, request.sampling.prompt_logprobs, row.scores)
            row.scores = []
        event = TokenEvent(request.request_id, index, token, text, logprob, len(request.prompt_ids), finish, error,
                           top, row.cached, scored, stop_reason)  # fmt: skip
        if finish is not None and not row.ended:  # a row ended by its token alone was released when taken
            self._release(row, keep=finish != "error")
        try:
            row.sink(event)
        except Exception:  # a consumer that went away (its event loop closed) must not stop the engine
            log.warning("request %s: its event could not be delivered", request.request_id)
            if finish is None:
                self._finish(row, "cancelled")

    def _grammar_failed(self, row: _Row, error: BaseException) -> None:
        """End a request whose grammar stopped it. A dead end is the grammar's own (no token continues it, or it
        outgrew its limits): the client hears why, as a 4xx like a grammar that fails to compile, and the output
        so far is not passed off as a complete answer (a finish_reason would pass off text that does not match
        the grammar). Anything else is a mismatch between the mask and the matcher: the server's fault, logged."""
        if not isinstance(error, GrammarDeadEnd):
            log.error("request %s: %s", row.request.request_id, error)
        self._finish(row, "error", error=error)

    def _not_finite(self, row: _Row) -> None:
        """End a request whose logits are not finite: its token (argmax of NaN) and logprob (NaN) would pass off
        garbage as an answer, and the client hears why instead. The operator hears which adapter it ran."""
        key = row.request.adapter_key
        cause = f"under adapter {key}, whose weights are too large to serve" if key else "on the base model"
        error = NonFiniteOutput(
            f"the logits for this request are not finite: activations overflowed {self.dtype} {cause}"
        )
        log.error("request %s: %s", row.request.request_id, error)
        self._finish(row, "error", error=error)

    def _finish(self, row: _Row, reason: FinishReason, error: BaseException | None = None) -> None:
        self._send(row, max(row.generated - 1, 0), None, "", None, reason, error)

    def _release(self, row: _Row, keep: bool) -> None:
        """Free the row's KV row and slot. `keep`: its KV may serve later prompts (not after an error: a failed step,
        logits that were not finite)."""
        row.ended = True
        if row.saved is not None:  # paused: it holds no KV row and no slot
            del self._paused[row.request.request_id]
            row.saved = None
        else:
            del self._rows[row.request.request_id]
            if keep:  # every token but the last went through a step; the last one's KV was never written
                written = row.prefilled + max(row.generated - 1, 0)
                self._kv_rows.wrote(row.row, row.request.cache_scope, row.ids, written)
            self._kv_rows.give_back(row.row, keep, row.request.client)
            if row.slot != self.no_adapter:
                self.slots.release(row.slot)
        if row.request.on_finish is not None:
            row.request.on_finish()

    def _end_unadmitted(
        self, request: GenerationRequest, sink: EventSink, reason: FinishReason, error: BaseException | None = None
    ) -> None:
        if request.on_finish is not None:
            request.on_finish()
        try:
            sink(TokenEvent(request.request_id, 0, None, "", None, len(request.prompt_ids), reason, error))
        except Exception:  # as in _send: a consumer that went away must not stop the engine
            log.warning("request %s: its event could not be delivered", request.request_id)

    def _fail_all(self, error: BaseException) -> None:
        self._salvage()
        self._deliver()
        for row in [*self._rows.values(), *self._paused.values()]:
            self._finish(row, "error", error)
        with self._cv:
            waiting = self._waiting.clear()
        for request, sink in waiting:
            self._end_unadmitted(request, sink, "error", error)
