"""Prometheus metrics, all prefixed `loraplex_`. One registry per app, so several apps (tests) never clash.

Gauges that mirror live state (queue depth, batch size, slots, memory) are read at scrape time through
callbacks, so the hot paths never update them.
"""

from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Generation requests by adapter and HTTP status",
                                ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "From submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.adapter_loads = Counter("loraplex_adapter_loads", "Adapter loads by tier move", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Adapter load latency: disk_to_cpu or cpu_to_slot", ["tier"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=r,
        )
        self.adapter_evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from the CPU tier",
                                         registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch_size = Gauge("loraplex_running_batch_size", "Requests in the running batch", registry=r)
        self.active_slots = Gauge("loraplex_active_adapter_slots", "Device adapter slots holding an adapter",
                                  registry=r)
        self.cpu_adapters = Gauge("loraplex_cpu_adapters", "Adapters held in the CPU tier", registry=r)
        self.cpu_adapter_bytes = Gauge("loraplex_cpu_adapter_bytes", "Bytes of adapter weights in the CPU tier",
                                       registry=r)
        self.device_memory = Gauge("loraplex_device_memory_bytes", "Device memory allocated by torch",
                                   registry=r)

    # ---- the registry's metrics sink (disk -> CPU) -----------------------------------------------------
    def observe_load(self, seconds: float) -> None:
        self.adapter_loads.labels("disk_to_cpu").inc()
        self.adapter_load_seconds.labels("disk_to_cpu").observe(seconds)

    def count_eviction(self) -> None:
        self.adapter_evictions.inc()

    # ---- the engine's activation hook (CPU -> slot) ----------------------------------------------------
    def observe_activation(self, key: str, slot: int, seconds: float) -> None:  # the engine's hook signature
        self.adapter_loads.labels("cpu_to_slot").inc()
        self.adapter_load_seconds.labels("cpu_to_slot").observe(seconds)

    def bind_live(self, queue_depth: Callable[[], float], batch_size: Callable[[], float],
                  active_slots: Callable[[], float], cpu_adapters: Callable[[], float],
                  cpu_adapter_bytes: Callable[[], float], device: torch.device) -> None:
        self.queue_depth.set_function(queue_depth)
        self.batch_size.set_function(batch_size)
        self.active_slots.set_function(active_slots)
        self.cpu_adapters.set_function(cpu_adapters)
        self.cpu_adapter_bytes.set_function(cpu_adapter_bytes)
        if device.type == "cuda":
            self.device_memory.set_function(lambda: torch.cuda.memory_allocated(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
