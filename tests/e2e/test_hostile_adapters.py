"""Issue 14 through a real server: hostile adapter uploads sent while honest requests (on the base model and
on an honest adapter) are in flight. Each hostile upload gets a 4xx JSON error and leaves nothing stored,
and the honest answers are the ones the server gave before any hostile input."""

import gzip
import io
import json
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import save

pytestmark = pytest.mark.e2e
HIDDEN, KV = 576, 192  # SmolLM2-135M: q_proj 576 -> 576, v_proj 576 -> 192 (3 kv heads of 64)
PROMPTS = ["The capital of France is", "Once upon a time"]


def lora_files(
    config: dict | None = None, change: Callable[[dict], None] | None = None, config_text: str | None = None
) -> dict:
    """A LoRA on layer 0's q_proj and v_proj of the embedded model, laid out as PEFT saves it."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for module, out in (("q_proj", HIDDEN), ("v_proj", KV)):
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=generator) * 0.05
        state[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=generator) * 0.5
    if change is not None:
        change(state)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    text = config_text if config_text is not None else json.dumps({**base, **(config or {})})
    return {"config": ("adapter_config.json", text.encode()), "weights": ("adapter_model.safetensors", save(state))}


def huge_header_tar(type_: bytes, payload: bytes | int) -> dict:
    """A .tar.gz whose first header is a GNU long name or pax header of `payload` (or that many bytes)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = type_, payload if isinstance(payload, int) else len(payload)
        out.write(info.tobuf(tarfile.GNU_FORMAT))
        if isinstance(payload, int):
            for _ in range(payload >> 20):
                out.write(b"a" * (1 << 20))
        else:
            out.write(payload + b"\0" * (-len(payload) % 512))
        out.write(b"\0" * 1024)
    return {"archive": ("adapter.tar.gz", raw.getvalue())}


def tar_gz(files: dict, gzip_name: str = "") -> dict:
    """`files` (as lora_files gives them) as a .tar.gz whose gzip header stores `gzip_name` as its file's name."""
    raw = io.BytesIO()
    with gzip.GzipFile(gzip_name, "wb", fileobj=raw) as out, tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.values():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"archive": ("adapter.tar.gz", raw.getvalue())}


def set_first_a(value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[next(k for k in state if "lora_A" in k)][0, 0] = value

    return change


def to_fp8(state: dict) -> None:
    for key in state:
        state[key] = state[key].to(torch.float8_e5m2)


HOSTILE = {
    "alpha-nan": lambda: lora_files(
        config_text=json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": float("nan"), "target_modules": ["q_proj", "v_proj"]}
        )
    ),
    "alpha-huge": lambda: lora_files({"lora_alpha": 1e30}),
    "a-past-bf16": lambda: lora_files(change=set_first_a(3e38)),
    "pattern-nan": lambda: lora_files({"alpha_pattern": {"q_proj": float("nan")}}),
    "pattern-regex": lambda: lora_files({"alpha_pattern": {"(.*a){25}x": 16}}),
    "pattern-paren": lambda: lora_files({"rank_pattern": {"(": 2}}),
    "fp8-weights": lambda: lora_files(change=to_fp8),
    "rslora-string": lambda: lora_files({"use_rslora": "false"}),
    "nested-config": lambda: lora_files(config_text='{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "longname-tar": lambda: huge_header_tar(b"L", 300 << 20),
    "pax-digits-tar": lambda: huge_header_tar(b"x", b"9" * 50_000),
    "empty-tar": lambda: {"archive": ("a.tar.gz", gzip.compress(bytes(10240)))},
    # an honest adapter behind a 100 MiB gzip file name: 12 s of the interpreter, then it was stored
    "gzip-name-tar": lambda: tar_gz(lora_files(), gzip_name="n" * (100 << 20)),
    # one file twice: the error named the server's scratch directory
    "twice-tar": lambda: tar_gz({"a": ("adapter_config.json", b"{}"), "b": ("adapter_config.json", b"{}")}),
    # valid files PEFT would run otherwise than as a plain LoRA of these tensors
    "rank-not-declared": lambda: lora_files({"r": 16}),
    "untargeted-tensors": lambda: lora_files({"target_modules": ["q_proj"]}),
    "other-layers": lambda: lora_files({"layers_to_transform": [1]}),
    "untargeted-by-regex": lambda: lora_files({"target_modules": r".*\.q_proj"}),
    # matches every decoder layer's mlp, which is no Linear layer: PEFT refuses to load it
    "not-linear-by-regex": lambda: lora_files({"target_modules": r".*\.(q_proj|v_proj|mlp)"}),
    # Python's re, PEFT's matcher, backtracks for hours on the module names
    "backtracking-regex": lambda: lora_files({"target_modules": r"(.*)*\.q_proj"}),
    "layer-replication": lambda: lora_files({"layer_replication": [[0, 30]]}),
    "activated-lora": lambda: lora_files({"alora_invocation_tokens": [1, 2]}),
    # PEFT subtracts PiSSA's initial B A from the base weights as it loads the adapter
    "pissa-init": lambda: lora_files({"init_lora_weights": "pissa"}),
    # PEFT keeps random lora_A / lora_B on the targeted modules of layers 1-29, which the file has no tensors for
    "random-init": lambda: lora_files({"init_lora_weights": False}),
    "unknown-init": lambda: lora_files({"init_lora_weights": "zeros"}),
    "bloated-training": lambda: {
        **lora_files(),
        "training": ("training.json", json.dumps({"x": [{}] * 20_000}).encode()),
    },
}


def generate(url: str, prompt: str, adapter: str | None) -> str:
    parameters = {"max_new_tokens": 12, **({"adapter_id": adapter} if adapter else {})}
    response = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def stored_names(url: str) -> list[str]:
    listing = httpx.get(f"{url}/v1/adapters").json()
    assert listing["broken"] == []
    return sorted(m["name"] for m in listing["data"])


def test_hostile_uploads_harm_no_honest_request(server: str) -> None:
    url = server
    before = stored_names(url)  # the shared server's store may hold other modules' adapters
    honest = httpx.post(f"{url}/v1/adapters", data={"name": "honest"}, files=lora_files(), timeout=60)
    assert honest.status_code == 201, honest.text
    jobs = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, "honest")]
    expected = [generate(url, prompt, adapter) for prompt, adapter in jobs]
    assert expected[0] != expected[1] or expected[2] != expected[3]  # the honest adapter changes answers

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = [pool.submit(generate, url, prompt, adapter) for prompt, adapter in jobs]
        for name, files in HOSTILE.items():
            started = time.perf_counter()
            response = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files(), timeout=60)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.json()["error"]["code"], name
            assert ".tmp-" not in response.text, response.text  # the store's scratch space is not the client's
            assert time.perf_counter() - started < 10, name
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert [a.result() for a in answers] == expected

        assert stored_names(url) == sorted([*before, "honest"])
        # the same requests once more, together: one decode run instead of four (each alone was `expected`)
        assert list(pool.map(lambda job: generate(url, *job), jobs)) == expected
