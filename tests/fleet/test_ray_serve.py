"""A real Ray Serve application on CPU: two replicas of a tiny random model on one adapter store behind one
ingress. Uploads go through the ingress; requests for three adapters, interleaved and concurrent, answer as
one plain server does and land on the replica that holds their adapter (its `x-loraplex-replica` header);
a replica killed mid-stream fails that stream with a clear error, leaves the other replica's stream whole,
and is replaced. Skipped without the `ray` extra (`make test-ray` installs it and runs this)."""

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from peft_dirs import make_peft_dir
from ready import wait_ready

from loraplex.settings import Settings
from server.app import create_app

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402 - only once Ray is known to be there

from server.fleet.ray_serve import APP_NAME, REPLICA, REPLICA_HEADER, application, build  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = ("alpha", "beta", "gamma")
SERVING = dict(
    device="cpu",
    max_batch_size=4,
    max_seq_len=512,
    max_active_adapters=4,
    max_cpu_adapters=8,
    max_lora_rank=8,
    max_prefill_tokens=64,
)
PROMPTS = ("The capital of", "Once upon a time", "hello", "zq")
ADMIN_KEY = "fleet-admin-key"  # the fleet's: its client sends it


def upload(client: httpx.Client | TestClient, name: str, path: Path) -> httpx.Response:
    files = {
        "config": (path / "adapter_config.json").read_bytes(),
        "weights": (path / "adapter_model.safetensors").read_bytes(),
    }
    return client.post("/v1/adapters", data={"name": name}, files=files)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-adapters")
    return {
        name: make_peft_dir(root / name, seed=i + 1, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def plain(
    tiny_model_dirs: dict[str, Path], adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """The reference: one plain server (same model, same settings) in this process."""
    tmp = tmp_path_factory.mktemp("plain")
    settings = Settings(base_model=str(tiny_model_dirs["llama"]), adapter_dir=tmp / "store", cache_dir=tmp, **SERVING)
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=120)
        for name, path in adapter_dirs.items():
            assert upload(client, name, path).status_code == 201
        yield client


@pytest.fixture(scope="module")
def fleet(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("fleet")
    settings = Settings(
        base_model=str(tiny_model_dirs["llama"]), adapter_dir=tmp / "store", cache_dir=tmp, admin_key=[ADMIN_KEY],
        **SERVING,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # room for every request of a test on one replica: routing must not spill to the other for lack of it
        serve.run(application(settings, replicas=2, max_ongoing_requests=32), name=APP_NAME, route_prefix="/")
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=headers) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def tgi(adapter: str, prompt: str, max_new_tokens: int = 8) -> dict:
    return {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": max_new_tokens}}


def ask(client: httpx.Client | TestClient, kind: str, adapter: str, prompt: str) -> tuple[str, str | None]:
    """(the generated text, the replica that answered) of one request of `kind`."""
    if kind == "generate":
        response = client.post("/generate", json=tgi(adapter, prompt))
        text = response.json()["generated_text"] if response.status_code == 200 else None
    elif kind == "completions":
        response = client.post(
            "/v1/completions", json={"model": adapter, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        )
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
    else:
        response = client.post("/generate_stream", json=tgi(adapter, prompt))
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        text = events[-1].get("generated_text") if response.status_code == 200 else None
    assert response.status_code == 200, response.text
    return text, response.headers.get(REPLICA_HEADER)


HOLDERS: dict[str, str] = {}  # adapter -> the replica that took it first (the tests below run in order)


def test_uploads_through_the_ingress_reach_every_replica(fleet: httpx.Client, adapter_dirs: dict[str, Path]) -> None:
    for name, path in adapter_dirs.items():
        response = upload(fleet, name, path)
        assert response.status_code == 201, response.text
    # a replica lists what another stored once it refreshes its index (--store-refresh-s); serving a name it
    # has not seen looks it up at once (below)
    deadline = time.monotonic() + 10 * Settings().store_refresh_s
    while {item["name"] for item in fleet.get("/v1/adapters").json()["data"]} != set(ADAPTERS):
        assert time.monotonic() < deadline, "an upload never reached the other replica's listing"
        time.sleep(0.2)
    # the base model, on any replica, and each replica names itself
    answered = {fleet.post("/generate", json=tgi("", "hello")).headers[REPLICA_HEADER] for _ in range(6)}
    assert answered and all(answered)


def test_requests_route_to_the_replica_holding_their_adapter_and_answer_as_one_server(
    fleet: httpx.Client, plain: TestClient
) -> None:
    # one request each, in turn, so that Serve learns who holds what: a new adapter goes to the replica
    # holding the fewest, so the three spread over both
    for adapter in ADAPTERS:
        _, HOLDERS[adapter] = ask(fleet, "generate", adapter, PROMPTS[0])
        time.sleep(1.0)  # the replica reports its adapters to Serve's routers asynchronously
    assert len(set(HOLDERS.values())) == 2, HOLDERS

    work = [
        (kind, adapter, prompt)
        for prompt in PROMPTS[:3]
        for kind in ("generate", "completions", "stream")
        for adapter in ADAPTERS
    ]  # interleaved: every adapter in every wave
    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(lambda job: ask(fleet, *job), work))
    for (kind, adapter, prompt), (text, replica) in zip(work, answers, strict=True):
        assert text == ask(plain, kind, adapter, prompt)[0], (kind, adapter, prompt)
        assert replica == HOLDERS[adapter], (kind, adapter, HOLDERS)


def long_prompt(plain: TestClient, adapter: str, tokens: int) -> str:
    """A prompt whose greedy answer runs the whole `tokens` (no EOS): a stream that is surely still running."""
    for prompt in PROMPTS:
        body = {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": tokens, "details": True}}
        if plain.post("/generate", json=body).json()["details"]["finish_reason"] == "length":
            return prompt
    pytest.fail("every prompt stops early: pick others")


def stream_events(client: httpx.Client, body: dict, started: threading.Event | None = None) -> list[dict]:
    events = []
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if started is not None:
                    started.set()
    return events


def declared_but_unsent(port: int, path: str, length: int, key: str | None = ADMIN_KEY) -> tuple[int, dict]:
    """The status and JSON body answered to a request head that declares `length` bytes of body, none of them sent
    (the head with `key`, or none)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        if key is not None:
            connection.putheader("Authorization", f"Bearer {key}")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_hostile_bodies_get_their_4xx_and_an_honest_stream_beside_them_is_unchanged(
    fleet: httpx.Client, plain: TestClient
) -> None:
    """The ingress reads bodies by a server's rules: JSON nested past the parser's depth was a 500 from the
    ingress's routing, a head declaring 100 MiB (over --max-request-mb) waited for its body, which the ingress
    would have buffered up to --max-adapter-mb on any route, and a body of a million items was parsed whole."""
    adapter = ADAPTERS[1]
    tokens = 200
    body = tgi(adapter, long_prompt(plain, adapter, tokens), tokens)
    expected = plain.post("/generate", json=body).json()["generated_text"]
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        honest = pool.submit(stream_events, fleet, body, started)
        assert started.wait(60)
        nested = fleet.post(
            "/generate", content=b'{"inputs": ' + b"[" * 100_000, headers={"content-type": "application/json"}
        )
        # the replica's own answer (the routing's parse raised RecursionError, and the ingress answered 500)
        assert nested.status_code == 413 and nested.json()["error"]["code"] == "too_many_json_items", nested.text
        # more items than any route takes: counted, not parsed, by the ingress; refused by the replica
        items = b'{"model": "' + adapter.encode() + b'", "prompt": [' + b",".join([b"[3]"] * 1_000_000) + b"]}"
        many = fleet.post("/v1/completions", content=items, headers={"content-type": "application/json"})
        assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_json_items", many.text
        status, error = declared_but_unsent(fleet.base_url.port or 0, "/v1/completions", 100 << 20)
        assert status == 413 and error["error"]["code"] == "request_too_large", error
        assert "--max-request-mb" in error["error"]["message"]
        # a head without a key, or with a wrong one, is refused before its body is read, which the ingress would
        # otherwise hold (up to --max-request-mb a request) for a client that may send nothing else
        for key in (None, "not-a-key"):
            status, error = declared_but_unsent(fleet.base_url.port or 0, "/v1/completions", 1 << 20, key)
            assert status == 401 and error["error"]["code"] == "invalid_api_key", error
        events = honest.result(120)
    assert events[-1]["generated_text"] == expected


def test_a_killed_replica_fails_its_streams_clearly_and_is_replaced(fleet: httpx.Client, plain: TestClient) -> None:
    victim_adapter = ADAPTERS[0]
    victim = HOLDERS[victim_adapter]
    bystander_adapter = next(a for a in ADAPTERS if HOLDERS[a] != victim)
    tokens = 400
    doomed_body = tgi(victim_adapter, long_prompt(plain, victim_adapter, tokens), tokens)
    calm_body = tgi(bystander_adapter, long_prompt(plain, bystander_adapter, tokens), tokens)
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(stream_events, fleet, doomed_body, started)
        calm = pool.submit(stream_events, fleet, calm_body)
        assert started.wait(60)
        (actor,) = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if REPLICA in a["name"] and a["name"].endswith(victim)
        ]
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        doomed_events, calm_events = doomed.result(60), calm.result(120)

    assert doomed_events[-1]["error_type"] == "replica_failed", doomed_events[-1]  # TGI's error event
    assert len(doomed_events) < tokens
    expected = plain.post("/generate", json=calm_body).json()["generated_text"]
    assert calm_events[-1]["generated_text"] == expected  # the other replica's stream ran to its end

    # the adapter is served on by the surviving replica at once, answering as before
    expected = ask(plain, "generate", victim_adapter, PROMPTS[0])[0]
    assert ask(fleet, "generate", victim_adapter, PROMPTS[0])[0] == expected
    # and Serve replaces the killed replica: a new one answers (the base model goes to any replica)
    deadline = time.monotonic() + 150
    while True:
        replicas = serve.status().applications[APP_NAME].deployments[REPLICA].replica_states
        response = fleet.post("/generate", json=tgi("", PROMPTS[0]))
        assert response.status_code == 200, response.text
        if replicas.get("RUNNING") == 2 and response.headers[REPLICA_HEADER] not in HOLDERS.values():
            break
        assert time.monotonic() < deadline, f"the killed replica was never replaced: {replicas}"
        time.sleep(0.2)


def test_the_shipped_serve_config_builds_the_application(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """deploy/ray/serve.yaml: valid for Serve, and its import path and args build the application."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.import_path == "server.fleet.ray_serve:build"
    args = app.args | {"adapter_dir": str(tmp_path), "device": "cpu"}
    assert isinstance(build(args), serve.Application)
