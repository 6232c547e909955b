"""EngineConfig: the engine's limits, fixed at start-up because every buffer is allocated from them."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.graphs import buckets_up_to

if TYPE_CHECKING:  # Settings pulls in pydantic, which the engine itself does not need
    from loraplex.settings import Settings

# Modules wrapped with multi-LoRA by default: the seven projections of llama-like decoders.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDLE_PREFILL_FACTOR = 4  # prompt budget of steps with no decoding request, in multiples of max_prefill_tokens


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
    # Triton kernels for decode steps: None = on CUDA; True = anywhere (on CPU: Triton's interpreter, for tests)
    fused_kernels: bool | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def from_settings(cls, settings: "Settings") -> "EngineConfig":
        return cls(
            max_batch_size=settings.max_batch_size,
            max_active_adapters=settings.max_active_adapters,
            max_lora_rank=settings.max_lora_rank,
            max_seq_len=settings.max_seq_len,
            max_prefill_tokens=settings.max_prefill_tokens,
            cuda_graphs=settings.cuda_graphs,
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
