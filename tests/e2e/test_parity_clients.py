"""Issue 19 end to end, with the real clients against one real server on the embedded model (NF4, CPU):
`openai` (structured output through `chat.completions.parse` with a Pydantic model, logprobs and top_logprobs,
n with a seed, token-id prompts and batches of prompts), `text-generation` (grammar, details with top_n_tokens,
best_of) and `lorax-client` (response_format on an adapter, merged_adapters)."""

import json
import re
import subprocess
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from safetensors.torch import save_file

from e2e.server import CLIENTS_PYTHON

pytestmark = pytest.mark.e2e
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "size": {"enum": ["small", "large"]}},
    "required": ["city", "size"],
    "additionalProperties": False,
}


class Capital(BaseModel):
    country: Literal["France", "Spain"]
    capital: str = Field(max_length=16)
    sure: bool


def write_adapter(path: Path, config: dict, seed: int) -> Path:
    """A small random LoRA (q_proj, v_proj, rank 4) for the embedded model, written as PEFT writes it."""
    generator = torch.Generator().manual_seed(seed)
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    state = {}
    for layer in range(config["num_hidden_layers"]):
        for name, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(4, hidden, generator=generator) * 0.05
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=generator) * 0.05
    path.mkdir(parents=True)
    save_file(state, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "none",
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def served(server: str, embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shared server, with two random adapters of this module's uploaded into it."""
    tmp = tmp_path_factory.mktemp("parity-clients")
    config = json.loads((embedded_cache_dir / "models" / "SmolLM2-135M-Instruct" / "config.json").read_text())
    for i, name in enumerate(("alpha", "beta")):
        peft = write_adapter(tmp / name, config, seed=i)
        files = {
            "config": ("adapter_config.json", (peft / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (peft / "adapter_model.safetensors").read_bytes()),
        }
        response = httpx.post(f"{server}/v1/adapters", data={"name": name}, files=files, timeout=60)
        assert response.status_code == 201, response.text
    return server


@pytest.fixture(scope="module")
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120)


def test_openai_parse_with_a_pydantic_model_on_an_adapter(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="alpha",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format=Capital,
        max_tokens=60,
        temperature=0,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Capital), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_openai_logprobs_and_seeded_n(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)  # greedy
    both = client.chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=1.0, seed=11, n=2)
    alone = [
        client.chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=1.0, seed=seed)
        .choices[0]
        .message.content
        for seed in (11, 12)
    ]
    assert [c.message.content for c in both.choices] == alone


def test_openai_features_the_server_lacks_are_refused_not_ignored(client: openai.OpenAI) -> None:
    """Tools left to the model (tool_choice "auto", the default) and suffix would change what the answer is: each is
    a 422 that says what to send instead, and tools the client forbids (tool_choice "none") are answered as plain
    text. Echo with logprobs (lm-evaluation-harness's
    loglikelihood request) scores the prompt's tokens, the first with none."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    model = "SmolLM2-135M-Instruct"
    with pytest.raises(openai.UnprocessableEntityError, match=r'tool_choice "auto".*"required".*"none"'):
        client.chat.completions.create(model=model, messages=messages, tools=[tool], max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match='tool_choice "required" needs tools'):
        client.chat.completions.create(model=model, messages=messages, tool_choice="required", max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="suffix is not supported"):
        client.completions.create(model=model, prompt="The sky is", max_tokens=4, suffix=" and that is all.")
    echoed = client.completions.create(model=model, prompt="The sky is", max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)  # fmt: skip
    scored = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("The sky is") and len(scored.tokens) == echoed.usage.prompt_tokens + 1
    assert scored.token_logprobs[0] is None and all(lp <= 0 for lp in scored.token_logprobs[1:])
    # each computes its prompt afresh (a salt of its own): from the other's cached prefix, the rounding of other
    # shapes may tip a near tie
    plain = client.chat.completions.create(model=model, messages=messages, tools=[tool], tool_choice="none",
                                           max_tokens=4, temperature=0, extra_body={"cache_salt": "plain"})  # fmt: skip
    alone = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"cache_salt": "alone"})  # fmt: skip
    assert plain.choices[0].message.content == alone.choices[0].message.content
    assert not plain.choices[0].message.tool_calls


def test_openai_token_id_prompts_and_a_batch_of_prompts(client: openai.OpenAI, served: str) -> None:
    """lm-evaluation-harness's loglikelihood requests through the openai client: `prompt=[[ids]]` with echo and
    logprobs scores the ids as the text they encode is scored, and a batch of two prompts (texts, or token-id lists)
    is answered per prompt in OpenAI's order, each prompt scored as alone, usage summed."""
    model = "SmolLM2-135M-Instruct"
    texts = ["The capital of France is", "Two plus two is"]
    ids = [httpx.post(f"{served}/tokenize", json={"prompt": t}, timeout=60).json()["tokens"] for t in texts]
    scoring = {"model": model, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    alone = [client.completions.create(prompt=t, **scoring) for t in texts]
    by_ids = client.completions.create(prompt=[ids[0]], **scoring)
    assert by_ids.choices[0].text.startswith(texts[0]) and by_ids.usage.prompt_tokens == len(ids[0])
    # a scored prompt is computed whole, from no cached prefix: equal here, within a margin for steps of other shapes
    expected = alone[0].choices[0].logprobs.token_logprobs[: len(ids[0])]
    assert by_ids.choices[0].logprobs.token_logprobs[: len(ids[0])] == pytest.approx(expected, abs=1e-2)
    for prompt in (texts, ids):
        batch = client.completions.create(prompt=prompt, **scoring)
        assert [c.index for c in batch.choices] == [0, 1]
        assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        for choice, one, text, tokens in zip(batch.choices, alone, texts, ids, strict=True):
            assert choice.text.startswith(text) and choice.logprobs.token_logprobs[0] is None
            assert choice.logprobs.token_logprobs[: len(tokens)] == pytest.approx(
                one.choices[0].logprobs.token_logprobs[: len(tokens)], abs=1e-2
            )


def test_tgi_and_lorax_clients(served: str) -> None:
    if not CLIENTS_PYTHON.exists():
        pytest.skip("the client venv is made by `make test`")
    script = Path(__file__).parent / "clients" / "parity_clients.py"
    run = subprocess.run(
        [str(CLIENTS_PYTHON), str(script), served, "alpha", "beta", json.dumps(SCHEMA)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for key in ("tgi_json", "lorax_json"):
        value = json.loads(got[key]["text"])
        assert set(value) == {"city", "size"} and value["size"] in ("small", "large"), got[key]
        assert len(value["city"]) <= 16 and got[key]["finish_reason"] != "length"
    assert re.fullmatch(r"(yes|no), [0-9]{1,2}", got["tgi_regex"]), got["tgi_regex"]
    top = got["tgi_top_n"]
    assert len(top["top_tokens"]) == len(top["tokens"]) == 4 and all(len(t) == 3 for t in top["top_tokens"])
    assert [t[0][0] for t in top["top_tokens"]] == [t[0] for t in top["tokens"]]  # greedy: the top token
    assert got["tgi_best_of"]["text"] and len(got["tgi_best_of"]["others"]) == 1
    body = {
        "inputs": "The capital of France is",
        "parameters": {
            "max_new_tokens": 4,
            "details": True,
            "merged_adapters": {"ids": ["alpha", "beta"], "weights": [0.5, 0.5], "merge_strategy": "linear"},
        },
    }
    direct = httpx.post(f"{served}/generate", json=body, timeout=120).json()
    assert got["lorax_mix"]["tokens"] == [t["id"] for t in direct["details"]["tokens"]]
