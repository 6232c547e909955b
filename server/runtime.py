"""Everything the server holds once the model is up: base model, adapter registry, engine, scheduler."""

import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass

from adapters.fingerprint import base_fingerprint
from adapters.store import open_store
from adapters.validate import AdapterLimits
from loraplex.basemodel import LoadedBase, load_base_model
from loraplex.settings import Settings
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.inference import Inference
from server.metrics import Metrics
from server.registry import AdapterRegistry
from server.scheduler import LatencyHooks, Scheduler

log = logging.getLogger("loraplex")


@dataclass
class Runtime:
    settings: Settings
    base: LoadedBase
    metrics: Metrics
    registry: AdapterRegistry
    engine: Engine
    scheduler: Scheduler
    inference: Inference
    started: int  # unix time, the `created` of the base model in /v1/models

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics, base: LoadedBase | None = None) -> "Runtime":
        """Load the model (unless given) and the engine off the event loop, preload adapters, warm up."""
        if base is None:
            log.info("loading base model %s", settings.base_model or "(embedded SmolLM2-135M-Instruct)")
            base = await asyncio.to_thread(
                load_base_model,
                settings.base_model,
                cache_dir=settings.cache_dir,
                device=settings.device,
                served_name=settings.served_model_name,
            )
        sys.setswitchinterval(settings.switch_interval_ms / 1000)  # for the whole process: the engine's thread is in it
        config = EngineConfig.for_model(settings, base.model)
        # before the engine wraps the linear layers: adapters are checked against the model as PEFT sees it
        fingerprint = base_fingerprint(base.model)
        engine = await asyncio.to_thread(
            Engine, base.model, base.tokenizer, config, on_activation=metrics.observe_activation
        )
        # and on the layers the engine serves LoRA on: a model may have other linear layers (Phi-3's fused qkv_proj
        # and gate_up_proj), and an adapter on them was stored, then failed every request with a 500; the modules that
        # are not Linear layers are kept, to refuse configs that target them
        served = (name for name in fingerprint.modules if name in engine.lora_layers)
        fingerprint = fingerprint.restrict(served, keep_others=True)
        store = await asyncio.to_thread(
            open_store,
            settings.adapter_store,
            settings.adapter_dir,
            fingerprint,
            AdapterLimits(max_rank=settings.max_lora_rank, max_bytes=settings.max_adapter_mb * 2**20),
            settings.store_cache_mb * 2**20,
            settings.store_in_use_ttl_s,
        )
        # the CPU tier keeps each adapter as views of the engine's (pinned) packed copy: one copy, pinned once
        registry = AdapterRegistry(
            store,
            max_cpu_adapters=settings.max_cpu_adapters,
            on_unload=engine.deactivate,
            metrics=metrics,
            pin_memory=False,
            prepare=engine.prepare_adapter,
            keep_versions=settings.max_versions_per_adapter,
        )
        scheduler = await asyncio.to_thread(
            Scheduler,
            engine,
            settings.max_queue,
            LatencyHooks(time_to_first_token=metrics.ttft.observe, inter_token=metrics.itl.observe),
            max_queue_per_adapter=settings.max_queue_per_adapter,
            max_requests_per_client=settings.max_requests_per_client,
        )
        metrics.bind_live(
            queue_depth=lambda: scheduler.queue_depth,
            batch_size=lambda: scheduler.running,
            paused=lambda: engine.num_paused,
            active_slots=lambda: len(engine.active_adapters()),
            cpu_adapters=lambda: registry.cpu_adapters,
            cpu_adapter_bytes=lambda: registry.cpu_bytes,
            device=base.device,
            kv_cache_usage=lambda: scheduler.running / config.max_batch_size,
            slot_adapters=engine.active_adapters,
            waiting_adapters=engine.waiting_adapters,
            newest=lambda name: store.resolve(name, recheck=False).key,
            max_adapters=config.max_active_adapters,
        )
        store.start_refresh(settings.store_refresh_s)  # other servers may share the store
        engine.start()
        runtime = cls(
            settings,
            base,
            metrics,
            registry,
            engine,
            scheduler,
            Inference(base, registry, scheduler, metrics, config.max_seq_len),
            int(time.time()),
        )
        try:
            await registry.preload(settings.preload)
            await runtime.warm_up()
        except BaseException:
            runtime.stop()
            raise
        log.info("base model %s ready on %s with %d adapters stored", base.served_name, base.device, len(store))
        return runtime

    async def warm_up(self) -> None:
        """One real request through the whole path (and CUDA graph capture, if any) before /ready says so."""
        request = GenerationRequest(self.inference.encode("Hello"), SamplingParams(max_new_tokens=2))
        async for _ in self.scheduler.generate(request):
            pass

    def stop(self) -> None:
        self.engine.stop()
        self.inference.grammars.close()
        self.inference.tokenizing.close()
        self.inference.tokenizer_workers.close()
        self.registry.close()


def freeze_heap() -> None:
    """What start-up made lives as long as the server: moved out of the cyclic collector's sight (as vLLM does
    once started), so that a full collection walks only what requests made. Collections run on whichever thread
    allocates, the event loop's included: beside an answer of 75,000 logprob objects one held the loop 0.47 s
    over start-up's objects, 0.01 s once they were frozen."""
    gc.collect()
    gc.freeze()
