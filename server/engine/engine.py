"""The engine: one thread owns the model and the device and runs the continuous-batching loop.

Each iteration admits waiting requests into free KV rows (activating their adapter into a slot if needed),
runs one batched prefill chunk over the admitted requests still prefilling (as many as the token budget
holds), then one decode step for every decoding row. Each forward's tokens are sampled on the device and
come back in one copy. Requests leave the moment they finish or are cancelled, freeing their row.
"""

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters.lora import LoraWeights
from server.engine.attention import ATTENTION_NAME, KVCache, StepContext
from server.engine.config import EngineConfig
from server.engine.errors import AdapterTooLarge, EngineStopped, PromptTooLong
from server.engine.graphs import IDS, POSITIONS, SLOTS, WRITE_ROWS, DecodeGraphs, decode_args
from server.engine.multilora import (
    LoraContext,
    LoraLayout,
    LoraStore,
    MultiLoraLinear,
    PackCache,
    ShrinkGroup,
    shrink_groups,
)
from server.engine.requests import FinishReason, GenerationRequest, TokenEvent
from server.engine.sampling import sample_batch
from server.engine.slots import SlotTable
from server.engine.text import TextStream

log = logging.getLogger("loraplex.engine")

EventSink = Callable[[TokenEvent], None]
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
    text: TextStream
    generator: torch.Generator | None
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)


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
        if config.fused_kernels or (config.fused_kernels is None and self.device.type == "cuda"):
            from server.engine import kernels  # Triton: in CUDA builds of torch, not a CPU install's requirement

            kernels.install(model)
            self._lora_context.decode_kernels = kernels.FusedDecode()
        self.lora_store, self.lora_layers = self._wrap_targets()
        self._packs = PackCache(self.lora_store.layout, self.dtype, pin=self.device.type == "cuda")
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.cache = KVCache(
            text_config.num_hidden_layers,
            config.max_batch_size,
            text_config.num_key_value_heads,
            config.max_seq_len,
            head_dim,
            self.dtype,
            self.device,
        )
        self.eos_ids = self._eos_ids()
        self.slots = SlotTable(config.max_active_adapters)
        self._free_rows = list(range(config.max_batch_size))  # a heap: lowest rows first keeps batches short
        self._rows: dict[str, _Row] = {}
        self._waiting: deque[tuple[GenerationRequest, EventSink]] = deque()
        self._cancels: set[str] = set()
        self._deactivations: list[str] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._active_snapshot: dict[str, int] = {}
        self.activation_seconds: deque[float] = deque(maxlen=1024)  # recent CPU -> slot latencies
        # Decode inputs [4, max_batch] are filled here and reach the device in one copy per step.
        self._host_inputs = torch.zeros(
            4, config.max_batch_size, dtype=torch.long, pin_memory=self.device.type == "cuda"
        )
        self._host_view = self._host_inputs.numpy()  # the same memory, for cheap per-row writes
        self._graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            self._graphs = DecodeGraphs(self._graph_forward, config.graph_buckets(), config.kv_buckets(), self.device)

    # ---- set-up -------------------------------------------------------------------------------------
    def _wrap_targets(self) -> tuple[LoraStore, dict[str, MultiLoraLinear]]:
        targets = [
            (name, module)
            for name, module in self.model.named_modules()
            if name.rsplit(".", 1)[-1] in self.config.target_modules and hasattr(module, "in_features")
        ]
        a_offsets, b_offsets, a_width, b_width = {}, {}, 0, 0
        for name, module in targets:
            a_offsets[name], b_offsets[name] = a_width, b_width
            a_width += module.in_features
            b_width += module.out_features
        layout = LoraLayout(a_offsets, b_offsets, a_width, b_width)
        store = LoraStore(layout, self.config.max_active_adapters, self.config.max_lora_rank, self.dtype, self.device)
        layers: dict[str, MultiLoraLinear] = {}
        for members in shrink_groups(targets, a_offsets):
            in_features = members[0][1].in_features
            a0 = a_offsets[members[0][0]]
            group = ShrinkGroup(store.a[:, :, a0 : a0 + len(members) * in_features], len(members))
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
        self._fail_all(EngineStopped("the engine was stopped"))

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue a request; `sink` gets its events on the engine thread. Raises before anything is queued."""
        self.validate(request)
        if request.lora is not None:
            self._packs.get(request.lora)  # packed here, on the caller's thread: the engine thread only copies
        with self._cv:
            if self._stopped:
                raise EngineStopped("the engine is stopped")
            self._waiting.append((request, sink))
            self._cv.notify()

    def validate(self, request: GenerationRequest) -> None:
        n, limit = len(request.prompt_ids), self.config.max_seq_len
        if n == 0:
            raise ValueError("the prompt is empty")
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

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    # ---- the loop (engine thread) -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopped or self._waiting or self._rows or self._cancels or self._deactivations):
                    self._cv.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except BaseException as exc:  # a fault outside a forward: end every request rather than hang them
                log.exception("the engine thread failed; no further requests are accepted")
                with self._cv:
                    self._stopped = True
                self._fail_all(EngineStopped(f"the engine failed: {exc}"))
                return

    def step(self) -> bool:
        """One iteration; True if a forward ran. Tests call it directly, without the thread."""
        self._apply_commands()
        self._admit()
        ran = False
        prefilling = self._prefill_batch()
        if prefilling:
            self._guarded(prefilling, lambda: self._prefill(prefilling))
            ran = True
        decoding = [r for r in self._rows.values() if r.decoding and r.generated]
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding))
            ran = True
        return ran

    def _guarded(self, rows: list[_Row], work: Callable[[], None]) -> None:
        # A failing forward (e.g. out of memory) ends the requests in it, not the engine.
        try:
            work()
        except Exception as exc:
            for row in rows:
                if row.request.request_id in self._rows:
                    self._finish(row, "error", error=exc)

    def _apply_commands(self) -> None:
        with self._cv:
            cancels, self._cancels = self._cancels, set()
            deactivations, self._deactivations = self._deactivations, []
            if cancels:
                kept = deque()
                for request, sink in self._waiting:
                    if request.request_id in cancels:
                        self._end_unadmitted(request, sink, "cancelled")
                    else:
                        kept.append((request, sink))
                self._waiting = kept
        for request_id in cancels:
            row = self._rows.get(request_id)
            if row is not None:
                self._finish(row, "cancelled")
        for key in deactivations:
            self.slots.deactivate(key)
        self._active_snapshot = self.slots.active()

    def _admit(self) -> None:
        with self._cv:
            candidates = list(self._waiting)
        admitted: set[str] = set()
        for request, sink in candidates:
            if not self._free_rows:
                break
            slot = self.no_adapter
            if request.adapter_key is not None:
                acquired = self.slots.acquire(request.adapter_key)
                if acquired is None:
                    continue  # every slot is used by running rows: wait; later requests may still fit
                slot, needs_copy = acquired
                if needs_copy:
                    self._activate(request.adapter_key, request.lora, slot)
            row = heapq.heappop(self._free_rows)
            generator = None
            if request.sampling.seed is not None:
                generator = torch.Generator(self.device).manual_seed(request.sampling.seed)
            self._rows[request.request_id] = _Row(
                request,
                sink,
                row,
                slot,
                list(request.prompt_ids),
                0,
                TextStream(self.tokenizer, request.sampling.stop),
                generator,
            )
            admitted.add(request.request_id)
        if admitted:
            with self._cv:
                self._waiting = deque(w for w in self._waiting if w[0].request_id not in admitted)
            self._active_snapshot = self.slots.active()

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
    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        slots: torch.Tensor,
        read_rows: torch.Tensor | None,
        kv_len: int,
    ) -> torch.Tensor:
        # ids, positions, write_rows: [B, T]; slots, read_rows: [B]  ->  logits of the last position [B, V]
        self._lora_context.set(slots, self.dtype)
        step = StepContext(self.cache, write_rows, positions, read_rows, kv_len)
        out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, engine_step=step)
        return out.logits[:, -1]

    def _graph_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, write_rows: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        return self._forward(ids, positions, write_rows, slots, None, kv_len)

    def _prefill_batch(self) -> list[_Row]:
        """Rows still prefilling, in admission order, while their padded chunk fits the token budget."""
        batch: list[_Row] = []
        longest = 0
        for row in self._rows.values():
            if row.decoding:
                continue
            chunk = min(len(row.request.prompt_ids) - row.prefilled, self.config.prefill_chunk)
            if batch and (len(batch) + 1) * max(longest, chunk) > self.config.max_prefill_tokens:
                break
            batch.append(row)
            longest = max(longest, chunk)
        return batch

    def _prefill(self, rows: list[_Row]) -> None:
        """One chunk of each row in one forward, left-padded to the longest so every row ends on its last
        token (the only position whose logits are computed); padding writes to the dummy row."""
        ends = [min(len(r.request.prompt_ids), r.prefilled + self.config.prefill_chunk) for r in rows]
        width = max(end - r.prefilled for r, end in zip(rows, ends, strict=True))
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
        positions = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
        write_rows = torch.full((len(rows), width), self.cache.dummy_row, dtype=torch.long)  # [B, T]
        for i, (r, end) in enumerate(zip(rows, ends, strict=True)):
            pad = width - (end - r.prefilled)
            ids[i, pad:] = torch.tensor(r.request.prompt_ids[r.prefilled : end])
            positions[i, pad:] = torch.arange(r.prefilled, end)
            write_rows[i, pad:] = r.row
        slots = torch.tensor([r.slot for r in rows])
        read_rows = torch.tensor([r.row for r in rows])
        tensors = [t.to(self.device, non_blocking=True) for t in (ids, positions, write_rows, slots, read_rows)]
        logits = self._forward(*tensors, max(ends))
        for r, end in zip(rows, ends, strict=True):
            r.prefilled = end
        done = [i for i, r in enumerate(rows) if r.decoding]
        if done:
            self._sample([rows[i] for i in done], logits[done] if len(done) < len(rows) else logits)

    def _decode(self, rows: list[_Row]) -> None:
        width = max(r.row for r in rows) + 1  # batch row b is cache row b: idle rows in between are padding
        graphs = self._graphs if self._graphs is not None and width <= self._graphs.max_batch else None
        if graphs is not None:
            width = graphs.batch_bucket(width)
        # The previous step's copy out of this buffer has finished: its tokens were read back since.
        view = self._host_view[:, :width]  # [4, width]
        view[IDS], view[POSITIONS], view[WRITE_ROWS], view[SLOTS] = 0, 0, self.cache.dummy_row, self.no_adapter
        for r in rows:
            view[:, r.row] = (r.ids[-1], len(r.ids) - 1, r.row, r.slot)
        inputs = self._host_inputs[:, :width]
        kv_len = max(len(r.ids) for r in rows)
        if graphs is not None:
            logits = graphs.run(inputs, kv_len)
        else:
            logits = self._forward(*decode_args(inputs.to(self.device, non_blocking=True)), None, kv_len)
        self._sample(rows, logits[[r.row for r in rows]])

    # ---- sampling and finishing ---------------------------------------------------------------------
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        # logits: [len(rows), V]; one device -> host copy brings every row's token and logprob
        params = [r.request.sampling for r in rows]
        seen = [
            torch.tensor(r.ids, device=self.device) if p.repetition_penalty != 1.0 else None
            for r, p in zip(rows, params, strict=True)
        ]
        tokens, logprobs = sample_batch(logits, params, seen, [r.generator for r in rows])
        picked = torch.stack([tokens.double(), logprobs.double()]).tolist()  # float64 holds token ids exactly
        for row, token, logprob in zip(rows, picked[0], picked[1], strict=True):
            self._emit_token(row, int(token), logprob)

    def _emit_token(self, row: _Row, token: int, logprob: float) -> None:
        row.ids.append(token)
        row.generated += 1
        index = row.generated - 1
        params = row.request.sampling
        if token in self.eos_ids and not params.ignore_eos:
            self._send(row, index, token, row.text.flush(), logprob, "stop")
            return
        delta, stopped = row.text.push(token)
        if stopped:
            self._send(row, index, token, delta, logprob, "stop")
        elif row.generated >= params.max_new_tokens:
            self._send(row, index, token, delta + row.text.flush(), logprob, "length")
        else:
            self._send(row, index, token, delta, logprob, None)

    def _send(
        self,
        row: _Row,
        index: int,
        token: int | None,
        text: str,
        logprob: float | None,
        finish: FinishReason | None,
        error: BaseException | None = None,
    ) -> None:
        request = row.request
        row.sink(TokenEvent(request.request_id, index, token, text, logprob, len(request.prompt_ids), finish, error))
        if finish is not None:
            self._release(row)

    def _finish(self, row: _Row, reason: FinishReason, error: BaseException | None = None) -> None:
        self._send(row, max(row.generated - 1, 0), None, "", None, reason, error)

    def _release(self, row: _Row) -> None:
        del self._rows[row.request.request_id]
        heapq.heappush(self._free_rows, row.row)
        if row.slot != self.no_adapter:
            self.slots.release(row.slot)
        if row.request.on_finish is not None:
            row.request.on_finish()

    def _end_unadmitted(
        self, request: GenerationRequest, sink: EventSink, reason: FinishReason, error: BaseException | None = None
    ) -> None:
        sink(TokenEvent(request.request_id, 0, None, "", None, len(request.prompt_ids), reason, error))
        if request.on_finish is not None:
            request.on_finish()

    def _fail_all(self, error: BaseException) -> None:
        for row in list(self._rows.values()):
            self._finish(row, "error", error)
        with self._cv:
            waiting, self._waiting = self._waiting, deque()
        for request, sink in waiting:
            self._end_unadmitted(request, sink, "error", error)
