"""The metrics the inference gateway's endpoint picker routes by (its model-server protocol): the names that
deploy/kubernetes/components/inference-gateway/router-values.yaml points it at exist on /metrics, with the protocol's
types and labels, and move with a real engine's load on a tiny model."""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from peft_dirs import make_peft_dir
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ready import wait_ready

from adapters.errors import AdapterNotFound
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app
from server.engine import GenerationRequest, SamplingParams, TokenEvent
from server.metrics import routed_names
from server.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
ROUTER_VALUES = REPO / "deploy" / "kubernetes" / "components" / "inference-gateway" / "router-values.yaml"
SLOTS = 2


def loraplex_engine() -> dict[str, str]:
    """The engineConfigs entry the picker applies to our pods."""
    values = yaml.safe_load(ROUTER_VALUES.read_text())["router"]["epp"]
    config = yaml.safe_load(values["pluginsCustomConfig"][values["pluginsConfigFile"]])
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = [e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "loraplex"]
    return engine


SPECS = loraplex_engine()


def upload(client: TestClient, name: str, peft: Path) -> None:
    files = {
        "config": (peft / "adapter_config.json").read_bytes(),
        "weights": (peft / "adapter_model.safetensors").read_bytes(),
    }
    assert client.post("/v1/adapters", data={"name": name}, files=files).status_code == 201


@pytest.fixture(scope="module")
def client(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("protocol")
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    # one KV row: a second request must queue, so both gauges have something to show
    settings = Settings(
        adapter_dir=tmp / "store",
        cache_dir=tmp,
        device="cpu",
        max_batch_size=1,
        max_seq_len=64,
        max_active_adapters=SLOTS,
        max_cpu_adapters=SLOTS,
        max_lora_rank=8,
    )
    with TestClient(create_app(settings, base=base)) as client:
        wait_ready(client)
        upload(client, "tiny", make_peft_dir(tmp / "tiny", seed=0))
        upload(client, "other", make_peft_dir(tmp / "other", seed=2))
        yield client


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(client: TestClient, spec: str) -> float:
    (sample,) = scrape(client)[spec]
    return sample.value


def lora_labels(client: TestClient) -> dict[str, str]:
    (sample,) = scrape(client)[SPECS["loraSpec"]]
    assert abs(sample.value - time.time()) < 60  # the protocol's value: when it was read
    return sample.labels


def wait_for(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_configured_specs_are_gauges_on_metrics(client: TestClient) -> None:
    response = client.get("/metrics")
    types = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        assert types.get(SPECS[field]) == "gauge", field
    labels = lora_labels(client)
    assert set(labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert labels["max_lora"] == str(SLOTS)


def test_queued_running_kv_and_lora_info_move_with_load(client: TestClient) -> None:
    runtime: Runtime = client.app.state.runtime
    lease = client.portal.call(runtime.registry.acquire, "tiny")
    gate, events, done = threading.Event(), [], threading.Semaphore(0)

    def sink(event: TokenEvent) -> None:
        # the engine thread waits here on the first token, with the adapter's request holding the only row
        gate.wait(timeout=60)
        events.append(event)
        if event.finish_reason is not None:
            done.release()

    prompt = runtime.inference.encode("Hello")
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    queued = client.portal.call(runtime.registry.acquire, "other")
    runtime.engine.submit(
        GenerationRequest(prompt, sampling, adapter_key=lease.key, lora=lease.weights, on_finish=lease.release), sink
    )
    runtime.engine.submit(GenerationRequest(prompt, sampling), sink)
    runtime.engine.submit(
        GenerationRequest(prompt, sampling, adapter_key=queued.key, lora=queued.weights, on_finish=queued.release), sink
    )
    try:
        wait_for(
            lambda: value(client, SPECS["runningRequestsSpec"]) == 1 and value(client, SPECS["queuedRequestsSpec"]) == 2
        )
        assert value(client, SPECS["kvUsageSpec"]) == 1.0  # the one row is taken
        labels = lora_labels(client)
        assert labels["running_lora_adapters"] == "tiny"  # the name a request for it sends
        assert labels["waiting_lora_adapters"] == "other"  # queued for a row, not in a slot yet
    finally:
        gate.set()
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert all(e.error is None for e in events)
    wait_for(lambda: value(client, SPECS["runningRequestsSpec"]) == 0)
    assert value(client, SPECS["queuedRequestsSpec"]) == 0 and value(client, SPECS["kvUsageSpec"]) == 0.0
    # still in their device slots: a request for either needs no load, which is what the picker prefers
    labels = lora_labels(client)
    assert set(labels["running_lora_adapters"].split(",")) == {"tiny", "other"}
    assert labels["waiting_lora_adapters"] == ""


def test_an_older_version_in_a_slot_is_listed_by_its_version(client: TestClient, tmp_path: Path) -> None:
    runtime: Runtime = client.app.state.runtime
    body = {"inputs": "Hello", "parameters": {"adapter_id": "tiny@1", "max_new_tokens": 2}}
    assert client.post("/generate", json=body).status_code == 200
    wait_for(lambda: "tiny@1" in runtime.engine.active_adapters())
    upload(client, "tiny", make_peft_dir(tmp_path / "tiny-2", seed=1))  # 'tiny' now means tiny@2
    running = lora_labels(client)["running_lora_adapters"].split(",")
    assert "tiny@1" in running and "tiny" not in running


def test_routed_names() -> None:
    newest = {"a": "a@2", "b": "b@1"}

    def lookup(name: str) -> str:
        if name not in newest:
            raise AdapterNotFound(name)
        return newest[name]

    assert routed_names(["b@1", "a@1", "a@2", "gone@3"], lookup) == ["a", "a@1", "b", "gone@3"]


@pytest.mark.parametrize("ref", ["gone", "gone-pinned@1"])
def test_a_version_deleted_under_a_running_request_leaves_no_series(
    client: TestClient, tmp_path: Path, ref: str
) -> None:
    """A deleted version's series are dropped (a name retrained daily must not grow the scrape for good): a request
    still running on it when it is deleted must not bring them back when it ends."""
    runtime: Runtime = client.app.state.runtime
    name = ref.partition("@")[0]
    upload(client, name, make_peft_dir(tmp_path / name, seed=3))
    prompt = runtime.inference.encode("Hello")
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    events = client.portal.call(runtime.inference.open_stream, prompt, sampling, ref)  # its first token is out

    async def drain() -> int:
        return sum([1 async for _ in events])

    assert client.delete(f"/v1/adapters/{name}").status_code == 200
    client.portal.call(drain)
    adapters = {
        sample.labels["adapter"]
        for name in ("loraplex_requests_total", "loraplex_prompt_tokens_total", "loraplex_generated_tokens_total")
        for sample in scrape(client).get(name.removesuffix("_total"), [])
    }
    assert not {name, f"{name}@1"} & adapters, adapters
