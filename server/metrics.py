"""Prometheus metrics, all prefixed `loraplex_`. One registry per app, so several apps (tests) never clash.

Gauges that mirror live state (queue depth, batch size, slots, memory) are read at scrape time through
callbacks, so the hot paths never update them.

Four of them are what the Gateway API Inference Extension's endpoint picker reads to route (its model-server
protocol, docs/proposals/003-model-server-protocol): queued requests (`loraplex_queue_depth`), running
requests (`loraplex_running_batch_size`), KV-cache use (`loraplex_kv_cache_usage_ratio`) and the LoRA info
gauge (`loraplex_lora_requests_info`, vLLM's labels). docs/kubernetes.md maps them onto its configuration.
"""

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.errors import AdapterNotFound
from adapters.names import parse_ref
from server.mixing import MIX_PREFIX

if TYPE_CHECKING:
    from server.api.connections import ConnectionCap

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


LORA_INFO = "loraplex_lora_requests_info"
# vLLM's label names: the endpoint picker reads these three labels, whatever the metric's name
RUNNING_LABEL, WAITING_LABEL, MAX_LABEL = "running_lora_adapters", "waiting_lora_adapters", "max_lora"


def routed_names(keys: Iterable[str], newest: Callable[[str], str]) -> list[str]:
    """The adapter refs clients send for `keys` ('name@N'): 'name' while N is its newest version (what a
    request for 'name' gets), else 'name@N'. The picker matches a request's `model` against these strings.
    `newest(name)` is that name's newest key; AdapterNotFound once the name is deleted."""
    names = set()
    for key in keys:
        if key.startswith(MIX_PREFIX):  # a per-request mix: no name routes to it, and its weights are the client's
            continue
        name, _ = parse_ref(key)
        try:
            names.add(name if newest(name) == key else key)
        except AdapterNotFound:  # deleted while its slot drains: only 'name@N' could still reach it
            names.add(key)
    return sorted(names)


class LoraInfo(Collector):
    """`loraplex_lora_requests_info`: one sample whose labels list the adapters in device slots, the adapters
    of queued requests and the slot count; its value is the scrape time, as vLLM's, so a reader that sees
    several series keeps the newest. A custom collector because the labels change: a labelled Gauge would
    keep every past combination as a series of its own. Names come from the adapter store, never from a
    request (an unknown adapter is refused before it reaches the engine)."""

    def __init__(self) -> None:
        self._read: Callable[[], tuple[list[str], list[str], int]] | None = None

    def bind(self, read: Callable[[], tuple[list[str], list[str], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            LORA_INFO,
            "LoRA adapters in device slots (running), adapters of queued "
            "requests not in a slot (waiting), device slots (max_lora); value: unix time",
            labels=[RUNNING_LABEL, WAITING_LABEL, MAX_LABEL],
        )
        if self._read is not None:  # no sample while the model loads: there is nothing to route by yet
            running, waiting, slots = self._read()
            family.add_metric([",".join(running), ",".join(waiting), str(slots)], time.time())
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # without it the registry would call collect() at registration, before anything is bound
        yield GaugeMetricFamily(LORA_INFO, "", labels=[RUNNING_LABEL, WAITING_LABEL, MAX_LABEL])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "Generation requests by adapter and HTTP status", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.prompt_tokens_cached = Counter(
            "loraplex_prompt_tokens_cached", "Prompt tokens found in the KV cache, not computed again", registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "From submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.adapter_loads = Counter("loraplex_adapter_loads", "Adapter loads by tier move", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Adapter load latency: disk_to_cpu or cpu_to_slot",
            ["tier"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.adapter_evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from the CPU tier", registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch_size = Gauge("loraplex_running_batch_size", "Requests in the running batch", registry=r)
        self.paused = Gauge(
            "loraplex_paused_requests",
            "Requests paused for another client's share of the batch rows, their keys and values in host memory "
            "(counted in loraplex_queue_depth too)",
            registry=r,
        )
        self.active_slots = Gauge(
            "loraplex_active_adapter_slots", "Device adapter slots holding an adapter", registry=r
        )
        self.cpu_adapters = Gauge("loraplex_cpu_adapters", "Adapters held in the CPU tier", registry=r)
        self.cpu_adapter_bytes = Gauge(
            "loraplex_cpu_adapter_bytes", "Bytes of adapter weights in the CPU tier", registry=r
        )
        # the picker's "KV-cache utilization": a request takes one whole KV row (max_seq_len tokens) while it
        # runs and a new one needs a free row, so rows in use / rows is what says whether it can be admitted
        # (tokens written / capacity would say "room" while every row is taken)
        self.kv_cache_usage = Gauge(
            "loraplex_kv_cache_usage_ratio", "Fraction of KV-cache rows held by running requests (0 to 1)", registry=r
        )
        self.lora_info = LoraInfo()
        r.register(self.lora_info)
        self.device_memory = Gauge("loraplex_device_memory_bytes", "Device memory allocated by torch", registry=r)
        self.open_connections = Gauge("loraplex_open_connections", "Open client connections", registry=r)
        self.connections_closed = Counter(
            "loraplex_connections_closed_by_cap",
            "Connections closed past --max-connections or --max-connections-per-client",
            registry=r,
        )

    def forget_adapters(self, labels: Iterable[str]) -> None:
        """Drop the per-adapter series of `labels` (adapters gone from the store): each deleted version kept its
        own for good, so a name retrained daily grew the scrape without bound."""
        gone = set(labels)
        for metric, names in ((self.requests, ("adapter", "status")), (self.prompt_tokens, ("adapter",)),
                              (self.generated_tokens, ("adapter",))):  # fmt: skip
            series = {
                tuple(sample.labels[name] for name in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("adapter") in gone
            }
            for values in series:
                with contextlib.suppress(KeyError):  # removed meanwhile by another delete's listener
                    metric.remove(*values)

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

    def bind_live(
        self,
        queue_depth: Callable[[], float],
        batch_size: Callable[[], float],
        paused: Callable[[], float],
        active_slots: Callable[[], float],
        cpu_adapters: Callable[[], float],
        cpu_adapter_bytes: Callable[[], float],
        device: torch.device,
        kv_cache_usage: Callable[[], float],
        slot_adapters: Callable[[], Mapping[str, int]],
        waiting_adapters: Callable[[], Iterable[str]],
        newest: Callable[[str], str],
        max_adapters: int,
    ) -> None:
        """`slot_adapters()`: adapter key -> device slot; `waiting_adapters()`: keys of queued requests;
        `newest(name)`: that name's newest key (see routed_names)."""
        self.queue_depth.set_function(queue_depth)
        self.batch_size.set_function(batch_size)
        self.paused.set_function(paused)
        self.active_slots.set_function(active_slots)
        self.cpu_adapters.set_function(cpu_adapters)
        self.cpu_adapter_bytes.set_function(cpu_adapter_bytes)
        self.kv_cache_usage.set_function(kv_cache_usage)

        def lora_info() -> tuple[list[str], list[str], int]:
            in_slots = slot_adapters()
            queued = [key for key in waiting_adapters() if key not in in_slots]
            return routed_names(in_slots, newest), routed_names(queued, newest), max_adapters

        self.lora_info.bind(lora_info)
        if device.type == "cuda":
            self.device_memory.set_function(lambda: torch.cuda.memory_allocated(device))

    def watch_connections(self, cap: "ConnectionCap | None") -> None:
        """The server's connections, as its protocol's cap counts them (None: a protocol without one, no gauge)."""
        if cap is not None:
            self.open_connections.set_function(lambda: cap.open)
            cap.on_close = self.connections_closed.inc

    def render(self) -> bytes:
        return generate_latest(self.registry)
