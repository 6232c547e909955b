"""The whole serving stack in process (HTTP routes -> registry -> engine) on a tiny fp32 model: many more
adapters than CPU and device slots, served round-robin, each still answering exactly as PEFT does, and
nothing left behind once adapters leave the tiers."""

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from peft_dirs import make_peft_dir
from ready import wait_ready
from transformers import AutoModelForCausalLM

from adapters.lora import LoraWeights
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app
from server.engine.multilora import PackedLora

ADAPTERS, CPU_TIER, SLOTS = 40, 6, 3
PROMPT = "hello"


def make_adapter(path: Path, seed: int) -> Path:
    return make_peft_dir(path, seed=seed, r=2 + seed % 3, target_modules=["q_proj", "v_proj", "down_proj"])


def upload_files(peft_dir: Path) -> dict[str, bytes]:
    return {name: (peft_dir / file).read_bytes() for name, file in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE))}


@pytest.fixture(scope="module")
def stack(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("churn")
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(
        adapter_dir=tmp / "store",
        cache_dir=tmp,
        device="cpu",
        max_batch_size=4,
        max_active_adapters=SLOTS,
        max_cpu_adapters=CPU_TIER,
        max_lora_rank=8,
        max_seq_len=64,
    )
    app = create_app(settings, base=base)
    with TestClient(app) as client:
        wait_ready(client)
        dirs = [make_adapter(tmp / f"a{i}", seed=i) for i in range(ADAPTERS)]
        for i, d in enumerate(dirs):
            assert client.post("/v1/adapters", data={"name": f"a{i}"}, files=upload_files(d)).status_code == 201
        yield {"client": client, "dirs": dirs, "app": app, "model_dir": tiny_model_dirs["llama"]}


def generate(client: TestClient, adapter: str) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": 6, "details": True}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def live(kind: type) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def test_an_adapter_cannot_take_the_served_base_models_name(stack: dict) -> None:
    """OpenAI's `model` names the base model by its served name: an adapter of that name could never be reached."""
    client = stack["client"]
    served = client.get("/v1/models").json()["data"][0]["id"]
    answer = client.post("/v1/adapters", data={"name": served}, files=upload_files(stack["dirs"][0]))
    assert answer.status_code == 400, answer.text  # as every invalid name
    error = answer.json()["error"]
    assert error["code"] == "invalid_adapter_name" and "base model" in error["message"]
    assert served not in [entry["name"] for entry in client.get("/v1/adapters").json()["data"]]


def test_a_refused_request_loads_no_adapter(stack: dict) -> None:
    client = stack["client"]
    body = {"inputs": "x" * 80, "parameters": {"adapter_id": "a1", "max_new_tokens": 4}}  # 80 + 4 > 64 tokens
    assert client.post("/generate", json=body).status_code == 422
    assert client.get("/v1/adapters/a1").json()["state"] == "stored"  # never loaded, nothing evicted for it


def test_round_robin_over_more_adapters_than_tiers(stack: dict) -> None:
    client, runtime = stack["client"], stack["app"].state.runtime
    before = live(LoraWeights), live(PackedLora)  # other tests' adapters may be alive too
    first = [generate(client, f"a{i}") for i in range(ADAPTERS)]
    second = [generate(client, f"a{i}") for i in range(ADAPTERS)]
    assert first == second  # every slot reuse loaded the right adapter
    assert len({tuple(t) for t in first}) >= 8  # the adapters really differ

    # the tiers stayed within their bounds, and evicted adapters left nothing behind
    assert runtime.registry.cpu_adapters <= CPU_TIER
    assert len(runtime.engine.active_adapters()) <= SLOTS
    assert live(LoraWeights) - before[0] <= CPU_TIER
    assert live(PackedLora) - before[1] <= CPU_TIER

    # and each answer is what PEFT gives for that adapter alone
    model = AutoModelForCausalLM.from_pretrained(stack["model_dir"], dtype=torch.float32)
    ids = runtime.base.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    for i in range(0, ADAPTERS, 5):
        peft = PeftModel.from_pretrained(model, stack["dirs"][i])
        with torch.no_grad():
            out = peft.generate(ids, max_new_tokens=6, do_sample=False)
        assert first[i] == out[0, ids.shape[1] :].tolist(), f"adapter a{i}"
        model = peft.unload()
