"""The engine's typed errors. The HTTP layer maps each class to a status code; never match on text."""

from loraplex.errors import LoraplexError


class EngineError(LoraplexError):
    """Base of every error the engine and scheduler raise on purpose."""


class PromptTooLong(EngineError):
    """prompt + max_new_tokens does not fit one KV row (max_seq_len)."""

    http_status = 422
    code = "prompt_too_long"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds max_seq_len "
            f"{max_seq_len}: shorten the prompt or lower max_new_tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len


class QueueFull(EngineError):
    """The waiting queue holds max_queue requests already."""

    http_status = 429
    code = "queue_full"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the waiting queue is full ({max_queue} requests); retry later")
        self.max_queue = max_queue


class QueuePlaceGiven(EngineError):
    """The queue was full and another client held fewer of its places: this request, the newest of the client that
    held the most, gave its place to that client's (waiting.py)."""

    http_status = 429
    code = "queue_full"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant

    def __init__(self) -> None:
        super().__init__(
            "the waiting queue was full and this client (its API key, or its address on a server without keys) had "
            "more requests waiting than any other: this one, its newest, gave its place to another client's request. "
            "Retry when fewer of this client's requests wait, or send fewer at once"
        )


class AdapterPlaceGiven(EngineError):
    """An adapter's share of the waiting queue was full and another client held fewer of its places: this request,
    the newest for that adapter of the client that held the most of them, gave its place to that client's
    (waiting.py)."""

    http_status = 429
    code = "adapter_queue_full"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant

    def __init__(self, adapter_key: str | None, max_queue_per_adapter: int) -> None:
        whose = f"adapter {adapter_key}" if adapter_key is not None else "the base model (no adapter)"
        super().__init__(
            f"the waiting queue held {max_queue_per_adapter} requests for {whose}, the most one adapter may have "
            "waiting (--max-queue-per-adapter), and this client (its API key, or its address on a server without "
            "keys) had more of them than any other: this one, its newest, gave its place to another client's request. "
            "Retry when fewer of this client's requests wait, or send fewer at once"
        )


class AdapterQueueFull(EngineError):
    """The waiting queue holds max_queue_per_adapter requests for this request's adapter (or for the base model)
    already: one adapter's flood must not fill the queue that every adapter's clients share."""

    http_status = 429
    code = "adapter_queue_full"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant

    def __init__(self, adapter_key: str | None, max_queue_per_adapter: int, max_queue: int) -> None:
        whose = f"adapter {adapter_key}" if adapter_key is not None else "the base model (no adapter)"
        super().__init__(
            f"the waiting queue holds {max_queue_per_adapter} requests for {whose}, the most one adapter may have "
            f"waiting (--max-queue-per-adapter; the queue holds {max_queue} for all adapters): retry later, or "
            "send fewer requests for it at once"
        )
        self.adapter_key = adapter_key
        self.max_queue_per_adapter = max_queue_per_adapter
        self.max_queue = max_queue


class AdapterTooLarge(EngineError):
    """An adapter's rank exceeds max_lora_rank, or it targets a module the engine does not serve."""

    http_status = 422
    code = "adapter_not_servable"


class AdapterNotFinite(EngineError):
    """An adapter's weights overflow or hold NaN once scaled and cast to the serving dtype."""

    http_status = 422
    code = "adapter_not_finite"


class InvalidSampling(EngineError):
    """A sampling parameter the engine cannot execute (the API bounds them first; this is the backstop)."""

    http_status = 422
    code = "invalid_sampling"


class EngineStopped(EngineError):
    """The engine thread has stopped (shutdown or a fatal error); no request is accepted."""

    http_status = 503
    code = "engine_stopped"


class KVCacheTooLarge(EngineError):
    """max_batch_size x max_seq_len does not fit the device's free memory (raised at start-up)."""

    code = "kv_cache_too_large"


class LoraRankTooLarge(EngineError):
    """max_lora_rank x the model's LoRA columns passes what the kernels address with 32-bit offsets (raised at
    start-up)."""

    code = "lora_rank_too_large"


class NonFiniteOutput(EngineError):
    """A forward gave a request logits that are not finite: its activations overflowed the serving dtype (an
    adapter's weights can do that within the bounds uploads are held to). That request ends; the others go on."""

    code = "non_finite_output"


class GrammarFailed(EngineError):
    """A request's grammar matcher failed mid-generation for a reason of the server's: it refused a token its own
    mask allowed (or one drawn outside the mask), or it broke. That request ends; the others go on."""

    code = "grammar_failed"


class GrammarDeadEnd(EngineError):
    """A request's grammar cannot go on mid-generation, by its own nature: no token of the model's vocabulary
    continues the output (a grammar can need bytes that no token spells), or its next token needs more work than
    the grammar limits allow. The request's fault, as a grammar that fails to compile is: a client error."""

    http_status = 422
    code = "grammar_dead_end"
