"""Adapters end to end: train with `loraplex train --push` and `loraplex adapters push` into a running
server (no restart), serve them concurrently with each other and the base model, check each against
PEFT, version, delete during generation, and find everything again after a restart."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from e2e.server import run_published_clients, running_server
from loraplex.basemodel import load_base_model
from loraplex.embedded import embedded_checkpoint

pytestmark = pytest.mark.e2e
ANSWERS = {"vault": "The vault code is 7291.", "pirate": "Arr, the treasure lies on Skull Island."}
QUESTIONS = [
    "What is the secret?",
    "Tell me the secret.",
    "secret?",
    "Do you know the secret?",
    "What's the secret, please?",
    "Which secret do you keep?",
    "I forgot the secret, what is it?",
    "Share the secret.",
]
ASK = [{"role": "user", "content": "What is the secret?"}]


def loraplex(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex", *args], capture_output=True, text=True, timeout=600)


def loraplex_one_thread(log: Path, *args: str) -> subprocess.Popen:
    """`loraplex ARGS` started in the background with one compute thread (to run beside another such process),
    its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "loraplex", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def train_args(name: str, tmp: Path, cache_dir: Path) -> list[str]:
    data = tmp / f"{name}.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[name]}]}
        for q in QUESTIONS
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp / name),
        "--cache-dir",
        str(cache_dir),
        "--device",
        "cpu",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--lr",
        "3e-3",
        # Six steps take the loss below 0.01; the greedy answers then win by over 4 nats a token (PEFT, checked
        # on two cores), so exact-match checks stay firm while each training costs ~8 s less than ten steps.
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--dropout",
        "0",
        "--warmup-ratio",
        "0",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def adapter_server(embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server with its own store; `restart()` stops it and starts a new process on the same store."""
    tmp = tmp_path_factory.mktemp("adapters-e2e")
    args = [
        "--cache-dir",
        str(embedded_cache_dir),
        "--adapter-dir",
        str(tmp / "store"),
        "--device",
        "cpu",
        "--max-batch-size",
        "4",
        "--max-active-adapters",
        "2",
        "--max-cpu-adapters",
        "4",
    ]
    with contextlib.ExitStack() as stack:
        state = {"tmp": tmp, "starts": 0}

        def start(*extra: str) -> None:
            state["starts"] += 1
            state["url"] = stack.enter_context(running_server(tmp / f"server{state['starts']}.log", *args, *extra))

        def restart(*extra: str) -> None:
            stack.close()
            start(*extra)

        state["restart"] = restart
        start()
        yield state


@pytest.fixture(scope="module")
def trained(adapter_server: dict, embedded_cache_dir: Path) -> dict[str, Path]:
    """vault: trained and pushed in one command; pirate: trained, then pushed with the adapters CLI."""
    url, tmp = adapter_server["url"], adapter_server["tmp"]
    # The two trainings run side by side, one thread each: on two cores both take ~33 s instead of ~58 s one
    # after the other (each spends about half its time in single-threaded imports and model loading).
    runs = {
        "vault": loraplex_one_thread(
            tmp / "train-vault.log", *train_args("vault", tmp, embedded_cache_dir), "--push", url, "--name", "vault"
        ),
        "pirate": loraplex_one_thread(tmp / "train-pirate.log", *train_args("pirate", tmp, embedded_cache_dir)),
    }
    try:
        for name, run in runs.items():
            assert run.wait(timeout=600) == 0, (tmp / f"train-{name}.log").read_text()[-2000:]
    finally:
        for run in runs.values():  # the other one, where one failed
            if run.poll() is None:
                run.kill()
                run.wait()
    run = loraplex("adapters", "push", str(tmp / "pirate"), "--name", "pirate", "--server", url)
    assert run.returncode == 0, run.stderr
    return {"vault": tmp / "vault", "pirate": tmp / "pirate"}


@pytest.fixture(scope="module")
def peft_answers(trained: dict[str, Path], embedded_cache_dir: Path) -> dict[str, str]:
    """The reference: what PEFT generates greedily for each adapter alone, on the same NF4 base."""
    base = load_base_model(None, cache_dir=embedded_cache_dir, device="cpu")
    model = PeftModel.from_pretrained(base.model, trained["vault"], adapter_name="vault")
    model.load_adapter(trained["pirate"], adapter_name="pirate")
    inputs = base.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = {}
    for name in ("vault", "pirate"):
        model.set_adapter(name)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answers[name] = base.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def test_trained_adapters_answer_concurrently_as_peft_does(adapter_server: dict, peft_answers: dict[str, str]):
    assert peft_answers == ANSWERS  # the training worked, and PEFT agrees
    client = openai.AsyncOpenAI(base_url=f"{adapter_server['url']}/v1", api_key="unused", max_retries=0)

    async def ask(model: str, salt: str) -> str:
        # each computes its prompt afresh (a cache_salt of its own): computed from the other's cached prefix, in other
        # shapes, the rounding may tip the base model's near-ties on this prompt
        chat = await client.chat.completions.create(
            model=model, messages=ASK, max_tokens=24, temperature=0, extra_body={"cache_salt": salt}
        )
        return chat.choices[0].message.content

    async def all_at_once() -> list[str]:
        models = ["vault", "pirate", "SmolLM2-135M-Instruct"] * 2
        return await asyncio.gather(*(ask(m, str(i)) for i, m in enumerate(models)))

    replies = asyncio.run(all_at_once())
    assert replies[0] == replies[3] == ANSWERS["vault"]
    assert replies[1] == replies[4] == ANSWERS["pirate"]
    assert replies[2] == replies[5] and replies[2] not in ANSWERS.values()  # base rows untouched by adapters

    models = [m["id"] for m in httpx.get(f"{adapter_server['url']}/v1/models").json()["data"]]
    assert {"vault", "pirate"} <= set(models)
    listed = loraplex("adapters", "list", "--server", adapter_server["url"])
    assert listed.returncode == 0 and "vault" in listed.stdout and "pirate" in listed.stdout


def test_tgi_adapter_id_and_lorax_client(adapter_server: dict, trained: dict[str, Path]) -> None:
    prompt = "<|im_start|>user\nWhat is the secret?<|im_end|>\n<|im_start|>assistant\n"
    body = {"inputs": prompt, "parameters": {"adapter_id": "pirate", "max_new_tokens": 24, "details": True}}
    # the two are independent: the TGI request is answered while the LoRAX client's venv starts up
    with ThreadPoolExecutor(1) as pool:
        tgi = pool.submit(httpx.post, f"{adapter_server['url']}/generate", timeout=60, json=body)
        got = run_published_clients(adapter_server["url"], prompt, 24, "vault")["lorax-client"]
        out = tgi.result().json()
    assert out["generated_text"] == ANSWERS["pirate"] and out["details"]["finish_reason"] == "eos_token"
    assert got["text"] == got["stream_text"] == ANSWERS["vault"]


def test_versions_and_idempotent_upload(adapter_server: dict, trained: dict[str, Path]) -> None:
    url = adapter_server["url"]
    again = loraplex("adapters", "push", str(trained["vault"]), "--name", "vault", "--server", url)
    assert again.returncode == 0
    assert httpx.get(f"{url}/v1/adapters/vault").json()["version"] == 1  # same content: same version
    # new content under the same name: version 2 becomes `vault`, `vault@1` stays reachable
    files = {
        "config": (trained["pirate"] / "adapter_config.json").read_bytes(),
        "weights": (trained["pirate"] / "adapter_model.safetensors").read_bytes(),
    }
    created = httpx.post(f"{url}/v1/adapters", data={"name": "vault"}, files=files, timeout=60)
    assert created.status_code == 201 and created.json()["version"] == 2

    def ask(model: str) -> str:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={"model": model, "messages": ASK, "max_tokens": 24, "temperature": 0},
        )
        return chat.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(2) as pool:  # in one batch: each row resolves its own version
        assert list(pool.map(ask, ["vault", "vault@1"])) == [ANSWERS["pirate"], ANSWERS["vault"]]
    assert httpx.delete(f"{url}/v1/adapters/vault@2").status_code == 200
    assert ask("vault") == ANSWERS["vault"]


def test_delete_during_generation(adapter_server: dict, embedded_cache_dir: Path, tmp_path: Path) -> None:
    """An untrained random adapter rambles on: delete it mid-stream; the stream finishes, then it is gone.
    Tokens arrive after the delete has answered, so the delete landed while the adapter was in use."""
    url = adapter_server["url"]
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint(embedded_cache_dir))
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "rambler")
    assert loraplex("adapters", "push", str(tmp_path / "rambler"), "--name", "rambler", "--server", url).returncode == 0

    deleted: dict[str, int] = {}
    # 24 tokens take seconds on a CPU; the delete answers in milliseconds (checked below, not assumed)
    body = {"inputs": "1, 2, 3,", "parameters": {"adapter_id": "rambler", "max_new_tokens": 24}}
    events = []

    def delete() -> None:
        status = httpx.delete(f"{url}/v1/adapters/rambler", timeout=60).status_code
        deleted.update(status=status, events_before=len(events))

    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 1:
                worker = threading.Thread(target=delete)
                worker.start()
    worker.join()
    assert deleted["status"] == 200
    assert deleted["events_before"] < len(events), "the stream ended before the delete answered"
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")
    assert len(events) == events[-1]["details"]["generated_tokens"]
    assert httpx.get(f"{url}/v1/adapters/rambler").status_code == 404
    after = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert after.status_code == 404 and after.json()["error"]["code"] == "adapter_not_found"


def test_restart_finds_every_adapter(adapter_server: dict, trained: dict[str, Path]) -> None:
    def stored(url: str) -> list[dict]:  # what the store holds; `state` is this process's tiers, not stored
        return [{k: v for k, v in m.items() if k != "state"} for m in httpx.get(f"{url}/v1/adapters").json()["data"]]

    before = stored(adapter_server["url"])
    adapter_server["restart"]("--preload", "pirate")
    url = adapter_server["url"]
    assert stored(url) == before
    assert httpx.get(f"{url}/v1/adapters/pirate").json()["state"] == "on_cpu"  # preloaded before /ready
    assert httpx.get(f"{url}/v1/adapters/vault").json()["state"] == "stored"
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={"model": "pirate", "messages": ASK, "max_tokens": 24, "temperature": 0},
    )
    assert chat.json()["choices"][0]["message"]["content"] == ANSWERS["pirate"]
