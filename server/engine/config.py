"""EngineConfig: the engine's limits, fixed at start-up because every buffer is allocated from them."""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from loraplex.memory import available_memory
from server.engine.attention import kv_row_bytes
from server.engine.graphs import buckets_up_to
from server.engine.multilora import LoraLayout, lora_targets

if TYPE_CHECKING:  # Settings pulls in pydantic, which the engine itself does not need
    from loraplex.settings import Settings

# Modules wrapped with multi-LoRA by default: the seven projections of llama-like decoders.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_BATCH_SIZE = 32  # a CPU computes rather than streams: more rows only queue work behind each other
AUTO_BATCH_CAP = 256  # past this many rows a step is compute-bound: latency grows, throughput barely
KV_MEMORY_SHARE = 0.5  # of the device memory free after the model; the rest: adapter slots, activations, graphs
# Of the same free memory, what adapter slots may take where their number is not set: the slots bound how many
# adapters run at once, and a request whose adapter has none waits until a slot drains (on the H200, mixed traffic
# over 32 adapters within the latency target: 16 req/s on 16 slots of rank 64, >= 40 on the 64 fitted; BENCHMARKS.md).
# Beyond memory a slot costs nothing a step: every LoRA kernel reads only the slots of the step's tokens.
SLOT_MEMORY_SHARE = 0.25
CPU_ADAPTER_SLOTS = 8  # a CPU's slots: what it computes is the bound there, not how many adapters run at once
IDLE_PREFILL_FACTOR = 4  # prompt budget of steps with no decoding request, in multiples of max_prefill_tokens


log = logging.getLogger("loraplex.engine")


def fit_batch_size(model: PreTrainedModel, max_seq_len: int) -> int:
    """KV rows of max_seq_len tokens that KV_MEMORY_SHARE of the free device memory (a CPU's: the available RAM)
    holds, up to AUTO_BATCH_CAP on a GPU (an H200 with an 8B NF4 model: the cap) and CPU_BATCH_SIZE on a CPU
    (the embedded model's 32 rows of 2,048 tokens are 3 GB in fp32: more than some machines have free)."""
    weight = model.get_input_embeddings().weight
    row = kv_row_bytes(model.config.get_text_config(), max_seq_len, weight.dtype)
    most = AUTO_BATCH_CAP if weight.device.type == "cuda" else CPU_BATCH_SIZE
    return rows_that_fit(available_memory(weight.device), row, most)


def rows_that_fit(free_bytes: int, row_bytes: int, most: int) -> int:
    """KV rows of `row_bytes` that KV_MEMORY_SHARE of `free_bytes` holds, up to `most`; at least 1."""
    return max(1, min(most, int(KV_MEMORY_SHARE * free_bytes / row_bytes)))


def slots_that_fit(free_bytes: int, slot_bytes: int, most: int) -> int:
    """Adapter slots of `slot_bytes` that SLOT_MEMORY_SHARE of `free_bytes` holds beside the store's all-zero slot,
    up to `most`; at least 1."""
    in_memory = int(SLOT_MEMORY_SHARE * free_bytes / slot_bytes) - 1
    return max(1, min(most, in_memory))


def fit_adapter_slots(model: PreTrainedModel, targets: tuple[str, ...], max_rank: int, most: int) -> int:
    """The adapter slots of max_rank that fit the GPU (slots_that_fit), up to `most` (the CPU tier's places: every
    active adapter keeps its CPU copy); CPU_ADAPTER_SLOTS (up to `most`) on a CPU."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "cuda":
        return min(most, CPU_ADAPTER_SLOTS)
    slot = LoraLayout.of(lora_targets(model, targets)).slot_bytes(max_rank, weight.dtype)
    return slots_that_fit(available_memory(weight.device), slot, most)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # KV rows, i.e. requests running at once
    max_active_adapters: int = 8  # LoRA slots on the device
    max_lora_rank: int = 64  # every slot is padded to this rank
    max_seq_len: int = 2048  # prompt + completion per request
    # Prompt tokens per step, beside one token per decoding request: bounds a step's cost, so the latency that
    # running streams see while new prompts arrive (Sarathi-Serve's token budget)
    max_prefill_tokens: int = 512
    cuda_graphs: bool = True  # capture the step per token bucket (CUDA only)
    prefix_cache: bool = True  # reuse prompt prefixes that KV rows hold (prefix_cache.py)
    # Triton kernels for decode steps: None = on CUDA; True = anywhere (on CPU: Triton's interpreter, for tests)
    fused_kernels: bool | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def for_model(cls, settings: "Settings", model: PreTrainedModel) -> "EngineConfig":
        """The settings, completed for `model`: max_seq_len at most its context length, max_batch_size, when not
        set, the KV rows that fit the device (fit_batch_size), and max_active_adapters, when not set, the adapter
        slots that fit it (fit_adapter_slots)."""
        text = model.config.get_text_config()
        max_seq_len = min(settings.max_seq_len, text.max_position_embeddings)
        if max_seq_len < settings.max_seq_len:
            log.info("max_seq_len %d lowered to the model's context length %d", settings.max_seq_len, max_seq_len)
        max_batch_size = settings.max_batch_size
        if max_batch_size is None:
            max_batch_size = fit_batch_size(model, max_seq_len)
            log.info("max_batch_size %d: the KV rows of %d tokens that fit", max_batch_size, max_seq_len)
        slots = settings.max_active_adapters
        if slots is None:
            slots = fit_adapter_slots(model, DEFAULT_TARGETS, settings.max_lora_rank, settings.max_cpu_adapters)
            log.info("max_active_adapters %d: adapter slots of rank %d fitted to the %s", slots, settings.max_lora_rank,
                     model.get_input_embeddings().weight.device.type)  # fmt: skip
        return cls(
            max_batch_size=max_batch_size,
            max_active_adapters=slots,
            max_lora_rank=settings.max_lora_rank,
            max_seq_len=max_seq_len,
            max_prefill_tokens=settings.max_prefill_tokens,
            cuda_graphs=settings.cuda_graphs,
            prefix_cache=settings.prefix_cache,
            fused_kernels=None if settings.fused_kernels else False,
        )

    @property
    def idle_prefill_tokens(self) -> int:
        """The prompt budget of a step in which no request decodes: no stream waits on it, and a bigger step
        spreads its fixed cost (reading every weight, ~3,000 kernels) over more prompt tokens."""
        return IDLE_PREFILL_FACTOR * self.max_prefill_tokens

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step runs: a token for every running request and the prompt budget, or the
        idle budget alone."""
        return max(self.max_batch_size + self.max_prefill_tokens, self.idle_prefill_tokens)

    def graph_buckets(self) -> list[int]:
        """Token counts with a captured step: powers of two up to max_step_tokens, and it."""
        return buckets_up_to(self.max_step_tokens, 1)
