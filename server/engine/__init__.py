"""The multi-LoRA inference engine: one thread, one model, continuous batching over many adapters."""

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import (
    AdapterQueueFull,
    AdapterTooLarge,
    EngineError,
    EngineStopped,
    KVCacheTooLarge,
    LoraRankTooLarge,
    PromptTooLong,
    QueueFull,
)
from server.engine.requests import FinishReason, GenerationRequest, PromptScores, PromptToken, TokenEvent
from server.engine.sampling import SamplingParams

__all__ = [
    "AdapterQueueFull",
    "AdapterTooLarge",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStopped",
    "FinishReason",
    "GenerationRequest",
    "KVCacheTooLarge",
    "LoraRankTooLarge",
    "PromptScores",
    "PromptToken",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "TokenEvent",
]
