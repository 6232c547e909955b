"""Generation API parity with vLLM, TGI and LoRAX, in process on the tiny byte-level llama (max_seq_len 64):
tokenizer endpoints, log probabilities, several choices, adapter mixing and structured output."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft_dirs import make_peft_dir
from prometheus_client.parser import text_string_to_metric_families
from ready import wait_ready

from adapters.localstore import LocalBackend
from adapters.store import AdapterStore
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def client(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("parity")
    settings = Settings(
        adapter_dir=tmp / "store",
        cache_dir=tmp,
        device="cpu",
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=4,
        max_lora_rank=16,
        # no refresh in the background: the rollback tests need this server not to have seen another's delete yet,
        # and one every 2 s (the default) could land between the delete and the request
        store_refresh_s=3600,
    )
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    with TestClient(create_app(settings, base=base)) as c:
        wait_ready(c)
        # "loud": rank 1, scaling 1000, its gain ~1500 of the bound's 60000: at weight 100 a mix passes the bound
        for name, seed, rank, alpha in (("m1", 1, 4, 8), ("m2", 2, 8, 8), ("loud", 3, 1, 1000)):
            peft = make_peft_dir(
                tmp / name, seed=seed, r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj"]
            )
            files = {
                "config": ("adapter_config.json", (peft / "adapter_config.json").read_bytes()),
                "weights": ("adapter_model.safetensors", (peft / "adapter_model.safetensors").read_bytes()),
            }
            assert c.post("/v1/adapters", data={"name": name}, files=files).status_code == 201
        yield c


def error_of(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- tokenizer endpoints ---------------------------------------------------------------------------------


def test_vllm_tokenize_and_detokenize_round_trip(client: TestClient) -> None:
    out = client.post("/tokenize", json={"model": "llama", "prompt": "héllo", "return_token_strs": True}).json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) and out["max_model_len"] == MAX_SEQ_LEN
    assert client.post("/detokenize", json={"model": "llama", "tokens": out["tokens"]}).json() == {"prompt": "héllo"}
    for lax in ([True], [72.0], ["72"]):  # read as ids by a lax parser: a body that is wrong must not look right
        assert client.post("/detokenize", json={"tokens": lax}).status_code == 422, lax


def test_vllm_chat_tokenize_applies_the_template(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = client.post("/tokenize", json={"messages": messages}).json()
    without = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert with_prompt["count"] > without["count"] > 2 and with_prompt["token_strs"] is None
    rendered = client.post("/detokenize", json={"tokens": with_prompt["tokens"]}).json()["prompt"]
    assert "hi" in rendered


def test_tgi_tokenize_gives_offsets(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"inputs": "ab c", "parameters": {"max_new_tokens": 3}}).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("a", 0, 1), ("b", 1, 2), (" ", 2, 3), ("c", 3, 4)]
    assert all(isinstance(t["id"], int) for t in tokens)


@pytest.mark.parametrize(
    ("path", "payload", "says", "code"),
    [
        ("/tokenize", {"prompt": "x" * 10_000}, "characters", "prompt_too_long"),
        ("/tokenize", {"inputs": "x" * 10_000}, "characters", "prompt_too_long"),
        ("/tokenize", {"messages": []}, "messages", "invalid_request"),
        ("/detokenize", {"tokens": [1] * (MAX_SEQ_LEN + 1)}, "at most", "invalid_tokens"),
        ("/detokenize", {"tokens": [10**9]}, "vocabulary", "invalid_tokens"),
        ("/detokenize", {"tokens": [-1]}, "vocabulary", "invalid_tokens"),
    ],
)
def test_tokenizer_inputs_are_bounded(client: TestClient, path: str, payload: dict, says: str, code: str) -> None:
    error = error_of(client.post(path, json=payload))
    assert error["code"] == code and says in error["message"], error


# ---- log probabilities -----------------------------------------------------------------------------------


def chat(**params: object) -> dict:
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        **params,
    }


def test_chat_logprobs_and_top_logprobs(client: TestClient) -> None:
    choice = client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=3)).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4 and "".join(c["token"] for c in content) == choice["message"]["content"]
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and tops[0]["token"] == entry["token"]  # greedy: the sampled token is the top one
        assert tops[0]["logprob"] == pytest.approx(entry["logprob"]) and entry["logprob"] <= 0
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert entry["bytes"] == list(entry["token"].encode())
    plain = client.post("/v1/chat/completions", json=chat()).json()["choices"][0]
    assert plain["logprobs"] is None
    assert all(
        not c["top_logprobs"]
        for c in client.post("/v1/chat/completions", json=chat(logprobs=True)).json()["choices"][0]["logprobs"][
            "content"
        ]
    )


def test_chat_stream_carries_logprobs_per_chunk(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2, stream=True)) as r:
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    logprobs = [json.loads(chunk)["choices"][0]["logprobs"] for chunk in chunks[1:]]
    entries = [entry for lp in logprobs if lp for entry in lp["content"]]
    assert len(entries) == 4 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_completion_logprobs_legacy_shape(client: TestClient) -> None:
    body = {"model": "llama", "prompt": "hi", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 3


def test_tgi_details_and_top_n_tokens(client: TestClient) -> None:
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 3, "decoder_input_details": True}
    details = client.post("/generate", json={"inputs": "hi", "parameters": params}).json()["details"]
    assert len(details["tokens"]) == len(details["top_tokens"]) == 4
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) == 3 and top[0]["id"] == token["id"] and top[0]["logprob"] == pytest.approx(token["logprob"])
    assert [t["id"] for t in details["prefill"]] == client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"]
    with client.stream("POST", "/generate_stream", json={"inputs": "hi", "parameters": params}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 4 and all(len(e["top_tokens"]) == 3 for e in events)


@pytest.mark.parametrize(
    ("path", "payload", "says"),
    [
        ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("/v1/chat/completions", chat(top_logprobs=2), "logprobs: true"),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 21}}, "top_n_tokens"),
    ],
)
def test_logprob_counts_are_bounded(client: TestClient, path: str, payload: dict, says: str) -> None:
    error = error_of(client.post(path, json=payload))
    assert error["code"] == "invalid_request" and says in error["message"], error


# ---- several choices -------------------------------------------------------------------------------------


def sse(client: TestClient, path: str, payload: dict) -> list[dict]:
    with client.stream("POST", path, json=payload) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_frequency_and_presence_penalties_reach_the_sampler_on_both_protocols(client: TestClient) -> None:
    """The penalties change a greedy answer (their arithmetic is checked against a reference in the engine's
    tests), the same way through TGI's frequency_penalty and OpenAI's."""

    def tgi(**params: float) -> str:
        body = {"inputs": "ab", "parameters": {"max_new_tokens": 24, "decoder_input_details": False, **params}}
        return client.post("/generate", json=body).json()["generated_text"]

    def openai(**params: float) -> str:
        body = {"model": "llama", "prompt": "ab", "max_tokens": 24, "temperature": 0, **params}
        return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    plain = tgi()
    assert openai() == plain
    assert tgi(frequency_penalty=2.0) == openai(frequency_penalty=2.0) != plain
    assert openai(presence_penalty=2.0) not in (plain, openai(presence_penalty=-2.0))


def test_logit_bias_reaches_the_sampler_and_is_bounded(client: TestClient) -> None:
    """+100 on one token makes a greedy answer that token throughout (its arithmetic is checked against
    transformers in the engine's tests); keys that are not token ids of the model, values past +-100 and too many
    entries are 422s naming logit_bias."""
    z = client.post("/tokenize", json={"prompt": "z", "add_special_tokens": False}).json()["tokens"][0]
    body = {"model": "llama", "prompt": "ab", "max_tokens": 6, "temperature": 0}
    answer = client.post("/v1/completions", json={**body, "logit_bias": {str(z): 100}}).json()
    assert answer["choices"][0]["text"] == "z" * 6
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    answer = client.post("/v1/chat/completions", json={**chat, "logit_bias": {str(z): 100}}).json()
    assert answer["choices"][0]["message"]["content"] == "z" * 4
    for bias, says in (
        ({"x": 1}, "token ids written as strings"),
        ({"9" * 5000: 1}, "at most 12 digits"),  # digits all the same: the message says what is wrong with them
        ({"9" * 5000: 1}, "(5000 characters)"),
        ({"\u00b2": 1}, "token ids written as strings"),  # a digit to str.isdigit, not to int()
        ({"\u2460": 1}, "token ids written as strings"),
        ({"1": 101}, "logit_bias"),
        ({str(i): 1 for i in range(2000)}, "at most 1024 entries"),
        ({"999999": 1}, "not in the vocabulary"),
    ):
        error = error_of(client.post("/v1/completions", json={**body, "logit_bias": bias}))
        assert says in error["message"] and "logit_bias" in error["message"], error


def test_n_choices_with_a_seed_equal_the_requests_sent_one_by_one(client: TestClient) -> None:
    payload = chat(n=3, seed=5, temperature=1.0, max_tokens=6)
    answer = client.post("/v1/chat/completions", json=payload).json()
    texts = [c["message"]["content"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    alone = [client.post("/v1/chat/completions", json={**payload, "n": 1, "seed": 5 + i}).json() for i in range(3)]
    assert texts == [a["choices"][0]["message"]["content"] for a in alone]
    assert len(set(texts)) > 1  # different seeds, different samples
    assert answer["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    streamed = sse(
        client, "/v1/chat/completions", {**payload, "stream": True, "stream_options": {"include_usage": True}}
    )
    by_index = ["", "", ""]
    for chunk in streamed:
        for choice in chunk["choices"]:
            by_index[choice["index"]] += choice["delta"].get("content") or ""
    assert by_index == texts
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # the stream found the prompt in the KV cache
    assert [streamed[-1]["usage"][k] for k in counts] == [answer["usage"][k] for k in counts]
    assert sum(c["finish_reason"] is not None for chunk in streamed for c in chunk["choices"]) == 3


def test_completions_n_and_best_of_rank_by_total_logprob(client: TestClient) -> None:
    payload = {"model": "llama", "prompt": "hi", "max_tokens": 5, "seed": 11, "n": 2, "best_of": 4, "logprobs": 0}
    choices = client.post("/v1/completions", json=payload).json()["choices"]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in choices]
    assert len(choices) == 2 and totals == sorted(totals, reverse=True)
    candidates = client.post("/v1/completions", json={**payload, "n": 4}).json()["choices"]
    assert sorted(sum(c["logprobs"]["token_logprobs"]) for c in candidates)[-2:] == pytest.approx(sorted(totals))


def test_tgi_best_of_answers_the_most_likely_sequence(client: TestClient) -> None:
    params = {"max_new_tokens": 5, "do_sample": True, "best_of": 3, "seed": 2, "details": True}
    answer = client.post("/generate", json={"inputs": "hi", "parameters": params}).json()
    others = answer["details"]["best_of_sequences"]
    best = sum(t["logprob"] for t in answer["details"]["tokens"])
    assert len(others) == 2 and all(best >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    alone = {
        client.post("/generate", json={"inputs": "hi", "parameters": {**params, "best_of": 1, "seed": 2 + i}}).json()[
            "generated_text"
        ]
        for i in range(3)
    }
    assert {answer["generated_text"], *(o["generated_text"] for o in others)} == alone


@pytest.mark.parametrize(
    ("path", "payload", "says"),
    [
        ("/v1/chat/completions", chat(n=9), "n"),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "best_of": 2, "stream": True}, "stream"),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": 2}}, "sampling"),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": 9, "do_sample": True}}, "best_of"),
        ("/generate_stream", {"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}}, "streamed"),
    ],
)
def test_choice_counts_are_bounded(client: TestClient, path: str, payload: dict, says: str) -> None:
    error = error_of(client.post(path, json=payload))
    assert error["code"] == "invalid_request" and says in error["message"], error


# ---- adapter mixing --------------------------------------------------------------------------------------


def tgi(client: TestClient, **params: object) -> dict:
    params = {"max_new_tokens": 8, "details": True, **params}
    response = client.post("/generate", json={"inputs": "mix me", "parameters": params})
    assert response.status_code == 200, response.text
    return response.json()


def test_tgi_details_give_each_tokens_own_text_whatever_the_stop_sequences(client: TestClient) -> None:
    """A stop sequence holds back the answer's text that may begin one, so an event's text came late (''), and
    details.tokens showed that instead of each token's text."""
    plain = tgi(client)
    texts = [t["text"] for t in plain["details"]["tokens"]]
    assert "".join(texts) == plain["generated_text"] and len(texts) > 1
    never = tgi(client, stop=["zzzzzzzzzzzz"])  # never matched: the same answer, and the same texts
    assert [t["text"] for t in never["details"]["tokens"]] == texts
    stop = texts[-1]  # the last token's text: the answer ends where it first appears
    ended = tgi(client, stop=[stop])
    tokens = ended["details"]["tokens"]
    assert [t["text"] for t in tokens] == texts[: len(tokens)]
    assert ended["generated_text"] == "".join(texts[: len(tokens)])[: -len(stop)]  # the stop sequence cut off


def test_a_mix_of_one_adapter_at_weight_one_is_that_adapter(client: TestClient) -> None:
    alone = tgi(client, adapter_id="m2")
    mixed = tgi(client, merged_adapters={"ids": ["m2"], "weights": [1.0], "merge_strategy": "linear"})
    assert mixed["generated_text"] == alone["generated_text"]
    # lorax-client's defaults: no strategy (LoRAX's linear), density 0
    defaults = {"merge_strategy": None, "density": 0.0, "majority_sign_method": None}
    assert tgi(client, merged_adapters={"ids": ["m2"], "weights": [1.0], **defaults}) == mixed
    assert [t["logprob"] for t in mixed["details"]["tokens"]] == pytest.approx(
        [t["logprob"] for t in alone["details"]["tokens"]], abs=1e-4
    )
    base = [t["logprob"] for t in tgi(client)["details"]["tokens"]]
    assert [t["logprob"] for t in alone["details"]["tokens"]] != pytest.approx(base, abs=1e-3)  # it changes them


def test_a_mix_at_weight_zero_is_the_base_model_and_openai_takes_the_extra_field(client: TestClient) -> None:
    zero = {"ids": ["m1", "m2@1"], "weights": [0.0, 0.0]}
    logprobs = [[t["logprob"] for t in tgi(client, **p)["details"]["tokens"]] for p in ({"merged_adapters": zero}, {})]
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-5)
    body = {"model": "llama", "prompt": "mix me", "max_tokens": 8, "temperature": 0}
    base = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    mixed = client.post("/v1/completions", json={**body, "merged_adapters": zero}).json()["choices"][0]["text"]
    half = client.post(
        "/v1/completions", json={**body, "merged_adapters": {"ids": ["m1", "m2"], "weights": [0.5, 0.5]}}
    )
    assert mixed == base and half.status_code == 200
    assert 'adapter="<mix>"' in client.get("/metrics").text


def test_the_choices_of_one_request_share_a_new_mix(client: TestClient) -> None:
    """n choices past the mixes a server holds at once (half its 8 slots): each choice had counted as a mix of its
    own, a 429 on an idle server for any n > 4 with a mix not cached yet."""
    mix = {"ids": ["m1", "m2"], "weights": [0.3, 0.7]}
    body = {"model": "llama", "prompt": "share", "max_tokens": 3, "temperature": 0, "n": 6, "merged_adapters": mix}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    texts = {choice["text"] for choice in response.json()["choices"]}
    assert len(response.json()["choices"]) == 6 and len(texts) == 1  # greedy: one answer six times


def test_the_metrics_series_of_deleted_adapters_go_with_them(client: TestClient, tmp_path: Path) -> None:
    """Requests are counted by adapter (its name, or name@N as asked): each deleted version had kept its series
    for good, so a name retrained and replaced daily grew every scrape without bound."""
    store = client.app.state.runtime.registry.store
    for seed in (21, 22):
        store.put("ephemeral", make_peft_dir(tmp_path / str(seed), seed=seed))
    body = {"prompt": "count me", "max_tokens": 2}
    for model in ("ephemeral", "ephemeral@1", "ephemeral@2"):
        assert client.post("/v1/completions", json={**body, "model": model}).status_code == 200

    def series() -> set[str]:
        return set(re.findall(r'adapter="(ephemeral[^"]*)"', client.get("/metrics").text))

    assert series() == {"ephemeral", "ephemeral@1", "ephemeral@2"}
    assert client.delete("/v1/adapters/ephemeral@1").status_code == 200
    assert series() == {"ephemeral", "ephemeral@2"}
    assert client.delete("/v1/adapters/ephemeral").status_code == 200
    assert series() == set()


@pytest.mark.parametrize("stream", [False, True])
def test_the_choices_of_one_request_run_on_one_version(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """A request with n choices on `name` starts them one after another; a version uploaded meanwhile served the
    later ones (a streamed request waits for each choice's first token before it starts the next)."""
    name = f"versioned{int(stream)}"
    registry = client.app.state.runtime.registry
    store = registry.store
    store.put(name, make_peft_dir(tmp_path / "v1", seed=11, target_modules=["q_proj", "v_proj", "o_proj"]))
    newer = make_peft_dir(tmp_path / "v2", seed=12, target_modules=["q_proj", "v_proj", "o_proj"])
    body = {"model": name, "prompt": "versions", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    alone = client.post("/v1/completions", json={**body, "model": f"{name}@1"}).json()["choices"][0]
    acquire, calls = registry.acquire, []

    async def upload_after_the_first(ref: str):  # type: ignore[no-untyped-def]
        calls.append(ref)
        if len(calls) == 2:  # between the first choice's start and the second's
            store.put(name, newer)
        return await acquire(ref)

    monkeypatch.setattr(registry, "acquire", upload_after_the_first)
    response = client.post("/v1/completions", json={**body, "n": 3, "stream": stream})
    assert response.status_code == 200, response.text
    texts, logprobs = ["", "", ""], [[], [], []]
    if stream:
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
                logprobs[choice["index"]] += (choice["logprobs"] or {}).get("token_logprobs") or []
    else:
        for choice in response.json()["choices"]:
            texts[choice["index"]], logprobs[choice["index"]] = choice["text"], choice["logprobs"]["token_logprobs"]
    assert len(calls) == 3 and store.resolve(name).key == f"{name}@2"  # the upload landed mid-request
    assert texts == [alone["text"]] * 3
    for got in logprobs:
        assert got == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_the_choices_of_one_request_run_on_the_version_a_rollback_left(
    client: TestClient, tmp_path: Path, stream: bool
) -> None:
    """Another server deletes the newest version (a rollback): 'name' here still meant it until the next refresh,
    and a request with n choices, which resolves the name once for all of them, got 404 adapter_not_found ("@2 was
    deleted") though @1 is stored, where a request with one choice is served @1. Every choice runs @1; a request
    naming the deleted version itself still gets the 404."""
    name = f"rolledback{int(stream)}"
    store = client.app.state.runtime.registry.store
    for seed in (13, 14):
        store.put(name, make_peft_dir(tmp_path / str(seed), seed=seed, target_modules=["q_proj", "v_proj", "o_proj"]))
    body = {"model": name, "prompt": "rollback", "max_tokens": 4, "temperature": 0, "stream": stream}
    alone = client.post("/v1/completions", json={**body, "model": f"{name}@1", "stream": False}).json()
    other = AdapterStore(LocalBackend(store.backend.root), store.base, store.limits)
    other.delete(f"{name}@2")
    other.close()
    assert store.resolve(name, recheck=False).key == f"{name}@2"  # not refreshed yet: 'name' here still means it
    response = client.post("/v1/completions", json={**body, "n": 3})
    assert response.status_code == 200, response.text
    texts = ["", "", ""]
    if stream:
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
    else:
        texts = [choice["text"] for choice in response.json()["choices"]]
    assert texts == [alone["choices"][0]["text"]] * 3
    gone = client.post("/v1/completions", json={**body, "model": f"{name}@2", "n": 2})
    assert f"{name}@2" in error_of(gone, 404)["message"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "code", "says"),
    [
        (
            "/generate",
            {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["m2", "m2", "m2"], "weights": [1, 1, 1]}}},
            422,
            "invalid_adapter_mix",
            "max_lora_rank",
        ),
        (
            "/generate",
            {
                "inputs": "x",
                "parameters": {"merged_adapters": {"ids": ["m1"], "weights": [1], "merge_strategy": "ties"}},
            },
            422,
            "invalid_request",
            "linear",
        ),
        (
            "/generate",
            {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["m1", "m2"], "weights": [1]}}},
            422,
            "invalid_request",
            "one weight per adapter",
        ),
        (
            "/generate",
            {"inputs": "x", "parameters": {"adapter_id": "m1", "merged_adapters": {"ids": ["m2"], "weights": [1]}}},
            422,
            "invalid_request",
            "not both",
        ),
        (
            "/generate",
            {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["nobody"], "weights": [1]}}},
            404,
            "adapter_not_found",
            "nobody",
        ),
        (
            "/generate",
            {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["m1"], "weights": [1e9]}}},
            422,
            "invalid_request",
            "weights",
        ),
        (
            "/v1/completions",
            {"model": "m1", "prompt": "x", "merged_adapters": {"ids": ["m2"], "weights": [1]}},
            422,
            "invalid_adapter_mix",
            "base model",
        ),
    ],
)
def test_mixes_are_checked(client: TestClient, path: str, payload: dict, status: int, code: str, says: str) -> None:
    error = error_of(client.post(path, json=payload), status)
    assert error["code"] == code and says in error["message"], error


def test_a_mix_past_the_bound_on_adapters_is_refused_and_lower_weights_serve(client: TestClient) -> None:
    """Every stored adapter is within the bound that keeps the model's numbers finite; a mix's weights multiply
    its values, so the derived adapter is checked against the same bound: a 422 that says to lower the weights."""
    loud = {"ids": ["loud", "m1"], "weights": [100.0, -1.0]}
    error = error_of(client.post("/generate", json={"inputs": "x", "parameters": {"merged_adapters": loud}}))
    assert error["code"] == "invalid_adapter_mix" and "lower the weights" in error["message"], error
    assert "60000" in error["message"] and "loud" in error["message"], error
    tgi(client, merged_adapters={**loud, "weights": [1.0, -1.0]})


# ---- structured output -------------------------------------------------------------------------------------

SMALL_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
SMALL_PATTERN = r"(yes|no) [0-9]{1,2}"


def valid_small(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


@pytest.mark.parametrize("value", [SMALL_SCHEMA, json.dumps(SMALL_SCHEMA)], ids=["object", "json-text"])
def test_tgi_json_grammar_validates_on_an_adapter(client: TestClient, value) -> None:
    params = {"adapter_id": "m1", "max_new_tokens": 40, "grammar": {"type": "json", "value": value}, "details": True}
    out = client.post("/generate", json={"inputs": "json please", "parameters": params}).json()
    assert valid_small(out["generated_text"]), out
    assert out["details"]["finish_reason"] == "eos_token"  # a complete grammar ends as TGI ends it: no stop sequence


def test_tgi_regex_grammar_streamed_and_lorax_response_format(client: TestClient) -> None:
    params = {"max_new_tokens": 20, "grammar": {"type": "regex", "value": SMALL_PATTERN}}
    with client.stream("POST", "/generate_stream", json={"inputs": "yes or no", "parameters": params}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert re.fullmatch(SMALL_PATTERN, events[-1]["generated_text"]), events[-1]
    lorax = {
        "adapter_id": "m2",
        "max_new_tokens": 40,
        "response_format": {"type": "json_object", "schema": SMALL_SCHEMA},
    }
    assert valid_small(client.post("/generate", json={"inputs": "json", "parameters": lorax}).json()["generated_text"])


def test_openai_response_format_json_schema_and_json_object(client: TestClient) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL_SCHEMA, "strict": True}}
    out = client.post(
        "/v1/chat/completions", json=chat(model="m2", max_tokens=40, n=2, seed=5, response_format=response_format)
    ).json()
    assert len(out["choices"]) == 2 and all(valid_small(c["message"]["content"]) for c in out["choices"])
    assert all(c["finish_reason"] == "stop" for c in out["choices"])
    body = {
        "model": "llama",
        "prompt": "an object:",
        "max_tokens": 40,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text.startswith("{")  # any object: a random model may not close it within max_tokens


CHOICES = ["a-b", "c&d (e)", "f~g#h", "x.y*z", "back\\slash"]  # each a character with a meaning in a regex


def test_vllm_guided_fields_and_structured_outputs_constrain_the_answer(client: TestClient) -> None:
    """vLLM's guided_json, guided_regex and guided_choice, and its structured_outputs of v0.10, on both OpenAI routes:
    each answer holds to its constraint (a choice's regex characters stand for themselves); two constraints at once,
    and vLLM's fields this server does not implement, are 422s naming them."""
    completion = {"model": "llama", "prompt": "answer:", "max_tokens": 40, "temperature": 0}
    answers = {}
    for name, extra in (
        ("guided_json", {"guided_json": SMALL_SCHEMA}),
        ("structured json", {"structured_outputs": {"json": json.dumps(SMALL_SCHEMA)}}),
        ("guided_regex", {"guided_regex": SMALL_PATTERN}),
        ("structured regex", {"structured_outputs": {"regex": SMALL_PATTERN}}),
        ("guided_choice", {"guided_choice": CHOICES}),
        ("structured choice", {"structured_outputs": {"choice": CHOICES}}),
    ):
        out = client.post("/v1/completions", json={**completion, **extra})
        assert out.status_code == 200, (name, out.text)
        answers[name] = out.json()["choices"][0]["text"]
    assert valid_small(answers["guided_json"]) and answers["structured json"] == answers["guided_json"]
    assert (
        re.fullmatch(SMALL_PATTERN, answers["guided_regex"]) and answers["structured regex"] == answers["guided_regex"]
    )
    assert answers["guided_choice"] in CHOICES and answers["structured choice"] == answers["guided_choice"]
    chat_out = client.post("/v1/chat/completions", json=chat(max_tokens=20, guided_choice=["yes", "no"])).json()
    assert chat_out["choices"][0]["message"]["content"] in ("yes", "no")
    for extra, says in (
        ({"guided_regex": "a", "guided_choice": ["b"]}, "regex and choice"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format and guided_json"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "root ::= x"}, "guided_grammar is not supported"),
    ):
        assert says in error_of(client.post("/v1/completions", json={**completion, **extra}))["message"], extra
    for harmless in ({"min_tokens": 0}, {"min_p": 0.0}, {"use_beam_search": False}, {"prompt_logprobs": None}):
        assert client.post("/v1/completions", json={**completion, "max_tokens": 2, **harmless}).status_code == 200


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ({"type": "json", "value": {"type": "foo"}}, "Invalid type: foo"),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "regex", "value": r"(a)\1"}, "backreferences are not supported"),
        ({"type": "regex", "value": "a" * 40_000}, "at most"),
        ({"type": "regex", "value": {"x": 1}}, "a string"),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_422_naming_the_problem(client: TestClient, grammar, message) -> None:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": grammar}}
    error = error_of(client.post("/generate", json=body))
    assert error["code"] == "invalid_grammar" and message in error["message"], error
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    error = error_of(client.post("/v1/chat/completions", json=chat(response_format=bad)))
    assert error["code"] == "invalid_grammar"
    assert (
        error_of(client.post("/v1/chat/completions", json=chat(response_format={"type": "json_schema"})))["code"]
        == "invalid_request"
    )


X_PLUS = {"type": "regex", "value": "x+"}
HONEST_GRAMMAR = {"inputs": "yes or no", "parameters": {"max_new_tokens": 8, "grammar": X_PLUS}}


def test_a_grammar_whose_first_mask_fails_is_a_422_before_it_runs(client: TestClient) -> None:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "json", "value": {"$ref": "#"}}}}
    for _ in range(2):  # the second request takes the compiled grammar from the cache
        error = error_of(client.post("/generate", json=body))
        assert error["code"] == "invalid_grammar" and "cannot be compiled" in error["message"], error
    assert re.fullmatch("x+", client.post("/generate", json=HONEST_GRAMMAR).json()["generated_text"])


@pytest.mark.parametrize(("pattern", "answer"), [("(a{1000}){1000}", "aaaa"), ("b{3}a{2147483647}", "bbba")])
def test_a_grammar_fixing_a_run_of_millions_answers_its_run(client: TestClient, pattern: str, answer: str) -> None:
    """Where llguidance forced a grammar's fixed bytes, it computed these runs whole at the first mask (seconds of
    lexer work on the engine thread), and failed there; forcing off, each mask is a mask's work."""
    body = {"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": pattern}}}
    assert client.post("/generate", json=body).json()["generated_text"] == answer
    assert re.fullmatch("x+", client.post("/generate", json=HONEST_GRAMMAR).json()["generated_text"])


def test_a_shared_prompt_prefix_is_computed_once_per_salt(client: TestClient) -> None:
    """A system prompt sent again is found in the KV cache: usage says how many prompt tokens were (OpenAI's
    prompt_tokens_details.cached_tokens) and the answer is the one it computes from scratch. A cache_salt shares
    only with its own salt; an empty or overlong one is a 422 naming it."""
    system = {"role": "system", "content": "Be brief."}

    def ask(question: str, **params: object) -> dict:
        messages = [system, {"role": "user", "content": question}]
        answer = client.post("/v1/chat/completions", json=chat(messages=messages, max_tokens=6, **params))
        assert answer.status_code == 200, answer.text
        return answer.json()

    first = ask("one?", cache_salt="first-test")
    prompt = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = ask("two?", cache_salt="first-test")
    assert 0 < again["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt  # the system prompt, not the question
    other = ask("two?", cache_salt="another")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    stream = {"stream": True, "stream_options": {"include_usage": True}, "cache_salt": "another"}
    messages = [system, {"role": "user", "content": "two?"}]
    streamed = sse(client, "/v1/chat/completions", {**chat(messages=messages, max_tokens=6), **stream})
    assert streamed[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1  # all but the last token
    for salt in ("", "s" * 300):
        assert "cache_salt" in error_of(client.post("/v1/completions", json={**chat(), "cache_salt": salt}))["message"]


def test_vllm_sampling_extensions_reach_the_sampler_and_are_bounded(client: TestClient) -> None:
    """vLLM's ignore_eos, top_k and repetition_penalty on the OpenAI routes, as its clients and benchmark tools send
    them: an end-of-sequence token forced by logit_bias ends the answer unless ignore_eos; top_k 1 samples the
    greedy answer; repetition_penalty answers as the TGI route's does. Out of range: a 422 naming the field."""
    eos = min(client.app.state.runtime.engine.eos_ids)
    forced = {"model": "llama", "prompt": "ab", "max_tokens": 5, "temperature": 0, "logit_bias": {str(eos): 100}}
    ended = client.post("/v1/completions", json=forced).json()
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"
    past = client.post("/v1/completions", json={**forced, "ignore_eos": True}).json()
    assert past["usage"]["completion_tokens"] == 5 and past["choices"][0]["finish_reason"] == "length"
    body = {"model": "llama", "prompt": "abc", "max_tokens": 8}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    top1 = client.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 3, "top_k": 1}).json()
    assert top1["choices"][0]["text"] == greedy
    for off in (0, -1):  # vLLM's two ways to say no top-k: a seeded sample as without it
        sampled = {**body, "temperature": 1.0, "seed": 3}
        plain = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
        assert client.post("/v1/completions", json={**sampled, "top_k": off}).json()["choices"][0]["text"] == plain
    penalized = client.post("/v1/completions", json={**body, "temperature": 0, "repetition_penalty": 5.0}).json()
    tgi = client.post(
        "/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 8, "repetition_penalty": 5.0}}
    )
    assert penalized["choices"][0]["text"] == tgi.json()["generated_text"] != greedy
    # stop_token_ids end the answer as the end of sequence does, their text left out (tests/engine: past the first)
    first = client.post("/tokenize", json={"prompt": greedy[0], "add_special_tokens": False}).json()["tokens"][0]
    stopped = client.post("/v1/completions", json={**body, "temperature": 0, "stop_token_ids": [first]}).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == ""
    bad = [("top_k", -2), ("repetition_penalty", 0), ("repetition_penalty", 101), ("ignore_eos", "x"),
           ("stop_token_ids", [-1]), ("stop_token_ids", [10**9]), ("stop_token_ids", [1] * 1025),
           ("stop_token_ids", [True]), ("stop_token_ids", [1.0])]  # fmt: skip
    for field, value in bad:
        assert field in error_of(client.post("/v1/completions", json={**body, field: value}))["message"]


def test_vllm_min_p_reaches_the_sampler_and_is_bounded(client: TestClient) -> None:
    """vLLM's min_p on the OpenAI routes: 1 keeps the top token alone, so a seeded sample is the greedy answer and
    every token's logprob is 0 (the others report the floor); 0 is off. Outside 0..1: a 422 naming the field
    (tests/engine: the tokens kept against the definition, beside rows without min_p)."""
    body = {"model": "llama", "prompt": "abc", "max_tokens": 8}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    sampled = {**body, "temperature": 1.0, "seed": 3}
    top = client.post("/v1/completions", json={**sampled, "min_p": 1.0, "logprobs": 2}).json()["choices"][0]
    assert top["text"] == greedy
    assert set(top["logprobs"]["token_logprobs"]) == {0.0}
    assert all(sorted(t.values()) == [-9999.0, 0.0] for t in top["logprobs"]["top_logprobs"])
    chat_top = client.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=1.0, seed=3, min_p=1.0))
    chat_greedy = client.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=0))
    assert chat_top.json()["choices"][0]["message"] == chat_greedy.json()["choices"][0]["message"]
    plain = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    assert plain != greedy
    assert client.post("/v1/completions", json={**sampled, "min_p": 0}).json()["choices"][0]["text"] == plain
    for value in (-0.1, 1.5, "x"):
        assert "min_p" in error_of(client.post("/v1/completions", json={**body, "min_p": value}))["message"]


def test_vllm_min_tokens_holds_back_every_end_and_is_bounded(client: TestClient) -> None:
    """vLLM's min_tokens on the OpenAI routes: an end of sequence forced by logit_bias, a stop token and a stop string
    end the answer only past the first min_tokens tokens (a stop string where it ends in their text does not count),
    streamed as not. Negative, or past max_tokens (sent, or its default): a 422 naming min_tokens (tests/engine: the
    masking against transformers' min_new_tokens, beside rows without it)."""
    eos = min(client.app.state.runtime.engine.eos_ids)
    body = {"model": "llama", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    greedy = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    forced = {**body, "logit_bias": {str(eos): 100}, "min_tokens": 3}
    for route, payload in (("/v1/completions", forced), ("/v1/chat/completions", chat(**forced))):
        out = client.post(route, json=payload).json()
        assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop", route
    assert client.post("/v1/completions", json=forced).json()["choices"][0]["text"] == greedy[:3]
    first = client.post("/tokenize", json={"prompt": greedy[0], "add_special_tokens": False}).json()["tokens"][0]
    stopping = {**body, "stop_token_ids": [first], "logit_bias": {str(first): 100}, "min_tokens": 2}
    stopped = client.post("/v1/completions", json=stopping).json()
    assert stopped["usage"]["completion_tokens"] == 3 and stopped["choices"][0]["finish_reason"] == "stop"
    assert len(stopped["choices"][0]["text"]) == 2 and greedy[0] not in stopped["choices"][0]["text"]
    stop = greedy[1]  # a stop string the second token ends: only where it occurs again does it stop the answer
    again = greedy.find(stop, 2)
    assert again > 0, "the greedy answer repeats its second character"
    for extra in ({}, {"stream": True}):
        payload = {**body, "stop": [stop], "min_tokens": 2, **extra}
        if extra:
            text = "".join(c["choices"][0]["text"] for c in sse(client, "/v1/completions", payload))
        else:
            text = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
        assert text == greedy[:again], extra
    plain = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]["text"]
    assert plain == greedy[: greedy.index(stop)] != greedy[:again]
    # a grammar that can only go on with a token min_tokens holds back: the grammar's dead end, not a 500
    a = client.post("/tokenize", json={"prompt": "a", "add_special_tokens": False}).json()["tokens"]
    for extra in ({}, {"stream": True}):
        dead = {**body, "guided_regex": "ab", "stop_token_ids": a, "min_tokens": 1, **extra}
        error = error_of(client.post("/v1/completions", json=dead))
        assert error["code"] == "grammar_dead_end" and "min_tokens" in error["message"], extra
    for payload, says in (
        ({**body, "min_tokens": -1}, "min_tokens"),
        ({**body, "min_tokens": "x"}, "min_tokens"),
        ({**body, "min_tokens": 21}, "min_tokens 21 exceeds max_tokens 20"),
        ({"model": "llama", "prompt": "abc", "min_tokens": 17}, "min_tokens 17 exceeds max_tokens (not sent: 16"),
        (chat(max_completion_tokens=5, min_tokens=6), "exceeds max_completion_tokens 5"),
    ):
        assert says in error_of(client.post("/v1/completions" if "prompt" in payload else "/v1/chat/completions",
                                            json=payload))["message"], payload  # fmt: skip


def test_vllm_include_stop_str_in_output_keeps_what_ended_the_answer(client: TestClient) -> None:
    """vLLM's include_stop_str_in_output: the stop string that ended the answer stays at its end (the first of two
    found), streamed as not, on both OpenAI routes; a stop_token_ids token keeps its text. Not a boolean: a 422."""
    body = {"model": "llama", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    greedy = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = greedy[9:11]  # two characters of the answer: it ends where they first end in it, past its start
    end = greedy.index(stop) + len(stop)
    assert 2 < end < len(greedy)
    kept = {**body, "stop": [stop, "never"], "include_stop_str_in_output": True}
    out = client.post("/v1/completions", json=kept).json()["choices"][0]
    assert out["text"] == greedy[:end] and out["finish_reason"] == "stop"
    streamed = sse(client, "/v1/completions", {**kept, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == greedy[:end]
    chat_text = client.post("/v1/chat/completions", json=chat(max_tokens=20)).json()["choices"][0]["message"]["content"]
    chat_kept = chat(max_tokens=20, stop=[chat_text[1:3]], include_stop_str_in_output=True)
    answer = client.post("/v1/chat/completions", json=chat_kept).json()["choices"][0]["message"]["content"]
    assert answer == chat_text[: chat_text.index(chat_text[1:3]) + 2]
    first = client.post("/tokenize", json={"prompt": greedy[0], "add_special_tokens": False}).json()["tokens"][0]
    by_token = {**body, "stop_token_ids": [first], "include_stop_str_in_output": True}
    assert client.post("/v1/completions", json=by_token).json()["choices"][0]["text"] == greedy[0]
    says = error_of(client.post("/v1/completions", json={**body, "include_stop_str_in_output": "x"}))["message"]
    assert "include_stop_str_in_output" in says


def test_vllm_stop_reason_names_the_stop_sequence_or_token_that_ended_the_answer(client: TestClient) -> None:
    """vLLM's stop_reason beside finish_reason: the stop sequence or the stop_token_ids token that ended a choice,
    null for one ended by length or by a complete grammar; streamed on the choice's last chunk, on both OpenAI
    routes. TGI's finish_reason tells a stop sequence from an end of sequence by it: a complete grammar of a request
    with stop sequences is TGI's eos_token (it was stop_sequence)."""
    body = {"model": "llama", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    greedy = client.post("/v1/completions", json=body).json()["choices"][0]
    assert greedy["finish_reason"] == "length" and greedy["stop_reason"] is None
    stop = greedy["text"][9:11]
    first = client.post("/tokenize", json={"prompt": greedy["text"][0], "add_special_tokens": False}).json()["tokens"]
    for extra, reason in (({"stop": ["never", stop]}, stop), ({"stop_token_ids": first[:1]}, first[0])):
        out = client.post("/v1/completions", json={**body, **extra}).json()["choices"][0]
        assert (out["finish_reason"], out["stop_reason"]) == ("stop", reason), extra
        last = sse(client, "/v1/completions", {**body, **extra, "stream": True})[-1]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", reason), extra
    answer = client.post("/v1/chat/completions", json=chat(max_tokens=20)).json()["choices"][0]
    chat_stop = answer["message"]["content"][1:3]
    cut = client.post("/v1/chat/completions", json=chat(max_tokens=20, stop=[chat_stop])).json()["choices"][0]
    assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", chat_stop)
    last = sse(client, "/v1/chat/completions", chat(max_tokens=20, stop=[chat_stop], stream=True))[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", chat_stop)
    grammar = {**body, "guided_regex": "ab", "stop": ["zzz"]}  # the grammar completes: no stop sequence ended it
    out = client.post("/v1/completions", json=grammar).json()["choices"][0]
    assert (out["text"], out["finish_reason"], out["stop_reason"]) == ("ab", "stop", None)
    regex = {"type": "regex", "value": "ab"}
    assert tgi(client, grammar=regex, stop=["zzz"])["details"]["finish_reason"] == "eos_token"
    said = tgi(client)["generated_text"]
    assert tgi(client, stop=[said[-2:]])["details"]["finish_reason"] == "stop_sequence"


def test_completions_echo_begins_each_choice_with_the_prompt(client: TestClient) -> None:
    """OpenAI's echo on /v1/completions: each choice's text is the prompt's then its own, streamed with its first
    chunk (as vLLM streams it)."""
    body = {"model": "llama", "prompt": "abc", "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    plain = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()
    assert [c["text"] for c in echoed["choices"]] == ["abc" + text for text in plain]
    assert echoed["usage"]["completion_tokens"] == 12
    chunks = sse(client, "/v1/completions", {**body, "echo": True, "stream": True})
    for index, text in enumerate(plain):
        mine = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0].startswith("abc") and "".join(mine) == "abc" + text
    assert client.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]["text"] == plain[0]
    assert "echo" in error_of(client.post("/v1/completions", json={**body, "echo": "x"}))["message"]


# ---- the prompt's logprobs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """adapter name (None: the base model), prompt ids -> PEFT's log_softmax [T, V] fp32 over the prompt: row p
    scores token p + 1. The adapters are the client fixture's (same seeds, same weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    tmp = tmp_path_factory.mktemp("reference")
    seeds = {"m1": (1, 4, 8), "m2": (2, 8, 8)}

    def scores(adapter: str | None, ids: list[int]) -> torch.Tensor:
        model = base
        if adapter is not None:
            seed, rank, alpha = seeds[adapter]
            path = make_peft_dir(tmp / adapter, seed=seed, r=rank, lora_alpha=alpha,
                                 target_modules=["q_proj", "v_proj", "o_proj"])  # fmt: skip
            model = PeftModel.from_pretrained(base, path)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        if adapter is not None:
            model.unload()  # the base model as it was, for the next reference
        return logits.log_softmax(-1)

    return scores


def tokens_of(client: TestClient, body: dict) -> list[int]:
    """The prompt ids the server computes for a completion (`prompt`) or chat (`messages`) body."""
    keys = {"prompt", "messages"} & body.keys()
    return client.post("/tokenize", json={key: body[key] for key in keys}).json()["tokens"]


def assert_vllm_prompt_logprobs(scored: list, ids: list[int], reference: torch.Tensor, n: int) -> None:
    """vLLM's shape: null first, then per token its own entry (its rank) and the n most likely (ranks 1..n)."""
    assert len(scored) == len(ids) and scored[0] is None
    for p, (entry, token) in enumerate(zip(scored[1:], ids[1:], strict=True)):
        row = reference[p]
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(row[token].item(), abs=1e-4), p
        assert own["rank"] == int((row > row[token]).sum()) + 1 and isinstance(own["decoded_token"], str), p
        values, top = row.topk(n)
        for rank, (t, v) in enumerate(zip(top.tolist(), values.tolist(), strict=True), 1):
            assert entry[str(t)]["rank"] == rank and entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4), p
        assert set(entry) == {str(token), *map(str, top.tolist())}, p


def test_vllm_prompt_logprobs_on_both_openai_routes_are_pefts(client: TestClient, reference) -> None:
    """vLLM's prompt_logprobs: each prompt token's logprob after the tokens before it, as PEFT scores the prompt
    (the adapter applied), with its rank and the N most likely tokens; the first token null. Completions carry it
    per choice (every choice, n 2), chat once for the response, as vLLM; streamed, with the first token's chunk.
    Out of its bounds, a 422."""
    body = {"model": "m1", "prompt": "scored prompt", "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2, "n": 2}
    ids = tokens_of(client, body)
    expected = reference("m1", ids)
    answer = client.post("/v1/completions", json=body).json()
    for choice in answer["choices"]:
        assert_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, expected, 2)
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # computed whole, the second time too
    chunks = sse(client, "/v1/completions", {**body, "stream": True})
    for index in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert_vllm_prompt_logprobs(mine[0]["prompt_logprobs"], ids, expected, 2)
        assert all(c.get("prompt_logprobs") is None for c in mine[1:])
    plain = client.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()
    assert all(c["prompt_logprobs"] is None for c in plain["choices"])
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in answer["choices"]]

    talk = chat(model="m2", messages=[{"role": "user", "content": "score me"}], prompt_logprobs=0)
    ids = tokens_of(client, talk)
    expected = reference("m2", ids)
    answer = client.post("/v1/chat/completions", json=talk).json()
    assert_vllm_prompt_logprobs(answer["prompt_logprobs"], ids, expected, 0)
    streamed = sse(client, "/v1/chat/completions", {**talk, "stream": True})
    carrying = [c for c in streamed if c.get("prompt_logprobs") is not None]
    assert len(carrying) == 1 and streamed.index(carrying[0]) == 1  # the first token's, after the role's chunk
    assert_vllm_prompt_logprobs(carrying[0]["prompt_logprobs"], ids, expected, 0)
    assert client.post("/v1/chat/completions", json=chat()).json()["prompt_logprobs"] is None
    for bad in (21, -1, "x"):
        for path, payload in (("/v1/completions", body), ("/v1/chat/completions", talk)):
            assert "prompt_logprobs" in error_of(client.post(path, json={**payload, "prompt_logprobs": bad}))["message"]


def test_completions_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(client: TestClient, reference) -> None:
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1): the legacy logprobs hold
    the prompt's tokens then the answer's; the first prompt token's logprob and top logprobs are null, each other
    is PEFT's log p(token | tokens before), its top logprobs the most likely token's and its own; offsets run on
    through the answer. Streamed, the first chunk holds the prompt's."""
    body = {"model": "llama", "prompt": "the cat sat", "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    ids = tokens_of(client, body)
    expected = reference(None, ids)
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    picked = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp["token_logprobs"][1:-1] == pytest.approx(picked.tolist(), abs=1e-4)
    for p, (token, top) in enumerate(zip(lp["tokens"][1:-1], lp["top_logprobs"][1:-1], strict=True)):
        best = int(expected[p].argmax())
        assert top[client.post("/detokenize", json={"tokens": [best]}).json()["prompt"]] == pytest.approx(
            expected[p, best].item(), abs=1e-4
        )
        assert top[token] == pytest.approx(lp["token_logprobs"][p + 1]) and len(top) <= 2
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids) + 1)]
    assert choice["text"].startswith("the cat sat") and choice["prompt_logprobs"] is None  # not sent: not shown
    chunks = sse(client, "/v1/completions", {**body, "max_tokens": 3, "stream": True})
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["tokens"][: len(ids)] == lp["tokens"][:-1] and first["token_logprobs"][0] is None
    assert first["token_logprobs"][1 : len(ids)] == pytest.approx(lp["token_logprobs"][1:-1], abs=1e-5)
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {"text_offset": []})["text_offset"]]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {"tokens": []})["tokens"]]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))] and len(tokens) == len(ids) + 3


def assert_same_scores(scored: dict, expected: dict) -> None:
    """Two choices' legacy logprobs and vLLM prompt_logprobs alike, their logprobs within a tolerance (the same prompt,
    computed in other batches)."""
    legacy, other = scored["logprobs"], expected["logprobs"]
    assert legacy["tokens"] == other["tokens"] and legacy["text_offset"] == other["text_offset"]
    assert legacy["token_logprobs"][0] is None and other["token_logprobs"][0] is None
    assert legacy["token_logprobs"][1:] == pytest.approx(other["token_logprobs"][1:], abs=1e-5)
    assert legacy["top_logprobs"][0] is None and other["top_logprobs"][0] is None
    for mine, theirs in zip(legacy["top_logprobs"][1:], other["top_logprobs"][1:], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)
    assert scored["prompt_logprobs"][0] is None and expected["prompt_logprobs"][0] is None
    for mine, theirs in zip(scored["prompt_logprobs"][1:], expected["prompt_logprobs"][1:], strict=True):
        assert {t: (e["rank"], e["decoded_token"]) for t, e in mine.items()} == {
            t: (e["rank"], e["decoded_token"]) for t, e in theirs.items()
        }
        logprobs = {t: e["logprob"] for t, e in theirs.items()}
        assert {t: e["logprob"] for t, e in mine.items()} == pytest.approx(logprobs, abs=1e-5)


def test_completions_max_tokens_0_with_echo_answers_the_prompt_scored(client: TestClient) -> None:
    """vLLM's max_tokens 0 with echo, as scoring scripts send it: nothing generated (no token, text or logprob of
    one, completion_tokens 0, finish_reason length), each choice the prompt and its tokens' logprobs, those of the
    same request at max_tokens 1 but its generated token's. Stream and not, n 2, a batch of prompts, token ids;
    an end of sequence forced on the step's token changes nothing. Without echo, or on chat, a 422."""
    eos = min(client.app.state.runtime.engine.eos_ids)
    prompts = ["the cat sat", "abc"]
    body = {"model": "m1", "prompt": prompts, "echo": True, "logprobs": 2, "prompt_logprobs": 1, "n": 2,
            "temperature": 1.0, "logit_bias": {str(eos): 100}}  # fmt: skip
    one = client.post("/v1/completions", json={**body, "max_tokens": 1, "logit_bias": None}).json()
    answer = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert answer["usage"]["completion_tokens"] == 0
    assert answer["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    prompts_of = [p for p in prompts for _ in range(2)]  # choice i of prompt p: index p x n + i
    assert [c["index"] for c in answer["choices"]] == list(range(4))
    assert [c["text"] for c in answer["choices"]] == prompts_of
    for scored, generated in zip(answer["choices"], one["choices"], strict=True):
        assert scored["finish_reason"] == "length"
        assert generated["text"].startswith(scored["text"])
        # the generated token's entries last: without them, the same
        prompt_only = {key: values[:-1] for key, values in generated["logprobs"].items()}
        assert_same_scores(scored, {**generated, "logprobs": prompt_only})

    as_ids = [tokens_of(client, {"prompt": p}) for p in prompts]
    by_ids = client.post("/v1/completions", json={**body, "max_tokens": 0, "prompt": as_ids}).json()
    assert [c["text"] for c in by_ids["choices"]] == prompts_of and by_ids["usage"] == answer["usage"]
    for by_id, by_text in zip(by_ids["choices"], answer["choices"], strict=True):
        assert by_id["finish_reason"] == "length"
        assert_same_scores(by_id, by_text)

    # the step's token drawn as the model would (it has text), not forced
    streamed = {**body, "max_tokens": 0, "prompt": [as_ids[0]], "logit_bias": None, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = sse(client, "/v1/completions", streamed)
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 1]  # one chunk per choice: the prompt's
    for chunk in chunks:
        choice = chunk["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (prompts[0], "length")
        assert_same_scores(choice, answer["choices"][0])
    assert chunks[-1]["usage"]["completion_tokens"] == 0

    text_only = {"model": "llama", "prompt": "abc", "max_tokens": 0, "echo": True, "temperature": 0}
    plain = client.post("/v1/completions", json=text_only).json()
    assert plain["choices"][0]["text"] == "abc" and plain["choices"][0]["logprobs"] is None
    assert plain["usage"]["completion_tokens"] == 0
    says = error_of(client.post("/v1/completions", json={**text_only, "echo": False}))["message"]
    assert "max_tokens 0" in says and "echo" in says
    assert "min_tokens" in error_of(client.post("/v1/completions", json={**text_only, "min_tokens": 1}))["message"]
    assert "max_tokens" in error_of(client.post("/v1/chat/completions", json=chat(max_tokens=0)))["message"]


def test_a_scoring_requests_drawn_token_is_not_counted_as_generated(client: TestClient) -> None:
    """The token that the step scoring a max_tokens 0 request's prompt draws is dropped from its answer, and from
    the generated tokens the metrics count, streamed or not; its prompt is counted, and a max_tokens 1 request's
    token is (the counter is read where it moves)."""

    def counted(name: str) -> float:
        """m2's count (its choices run pinned to its version: "m2@N")."""
        samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
        return sum(s.value for s in samples if s.name == name and s.labels["adapter"].partition("@")[0] == "m2")

    generated, prompt = "loraplex_generated_tokens_total", "loraplex_prompt_tokens_total"
    body = {"model": "m2", "prompt": ["the cat sat", "abc"], "n": 2, "echo": True, "logprobs": 1, "max_tokens": 0}
    before = {name: counted(name) for name in (generated, prompt)}
    assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 0
    assert sse(client, "/v1/completions", {**body, "stream": True})
    assert counted(generated) == before[generated] and counted(prompt) > before[prompt]
    assert client.post("/v1/completions", json={**body, "max_tokens": 1}).json()["usage"]["completion_tokens"] == 4
    assert counted(generated) == before[generated] + 4


def test_tgi_decoder_input_details_score_the_prefill(client: TestClient, reference) -> None:
    """TGI's decoder_input_details with details: the prefill's tokens with their logprobs, the first null."""
    params = {"max_new_tokens": 2, "details": True, "decoder_input_details": True, "adapter_id": "m1"}
    details = client.post("/generate", json={"inputs": "prefill me", "parameters": params}).json()["details"]
    ids = [t["id"] for t in details["prefill"]]
    assert ids == tokens_of(client, {"prompt": "prefill me"})
    expected = reference("m1", ids)
    assert details["prefill"][0]["logprob"] is None
    picked = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert [t["logprob"] for t in details["prefill"][1:]] == pytest.approx(picked.tolist(), abs=1e-4)


# ---- prompts as token ids, and batches of prompts --------------------------------------------------------


def requests_run(client: TestClient) -> float:
    """Requests that reached the engine's queue so far, whatever their end (loraplex_requests_total)."""
    return sum(map(float, re.findall(r"^loraplex_requests_total\{.*\} (\S+)$", client.get("/metrics").text, re.M)))


def test_completions_take_a_prompt_as_token_ids(client: TestClient, reference, monkeypatch) -> None:
    """OpenAI's and vLLM's token-id prompt (lm-evaluation-harness sends `[[ids]]`): answered as the text those ids
    encode, without tokenizing; its ids run as given (no special token added); echo decodes them. Ids outside the
    vocabulary, lax ones (true), an empty prompt and one past max_seq_len are refused."""
    # each computes its prompt afresh (a salt of its own), so that their logprobs are equal to the last bit
    body = {"model": "m1", "prompt": "the cat sat", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    ids = tokens_of(client, body)
    as_text = client.post("/v1/completions", json={**body, "cache_salt": "text"}).json()
    inference = client.app.state.runtime.inference

    def untokenized(text: str) -> list[int]:
        raise AssertionError(f"a token-id prompt was tokenized: {text!r}")

    monkeypatch.setattr(inference, "encode", untokenized)
    for prompt in (ids, [ids]):
        as_ids = client.post("/v1/completions", json={**body, "prompt": prompt, "cache_salt": str(prompt)}).json()
        assert as_ids["choices"] == as_text["choices"] and as_ids["usage"] == as_text["usage"], prompt
        streamed = sse(client, "/v1/completions", {**body, "prompt": prompt, "stream": True})
        assert "".join(c["choices"][0]["text"] for c in streamed) == as_text["choices"][0]["text"]

    # as given: this tokenizer adds no BOS to a text, and none is taken away from ids that begin with one (nor any
    # added to those that do not); lm-evaluation-harness's loglikelihood request scores exactly these tokens, as PEFT
    bare = [1, *ids]  # its BOS first
    scoring = {**body, "prompt": [bare], "max_tokens": 1, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json=scoring).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(bare) + 1 and lp["token_logprobs"][0] is None and lp["tokens"][0] == "<|bos|>"
    picked = reference("m1", bare)[torch.arange(len(bare) - 1), torch.tensor(bare[1:])]
    assert lp["token_logprobs"][1:-1] == pytest.approx(picked.tolist(), abs=1e-4)
    decoded = client.post("/detokenize", json={"tokens": bare}).json()["prompt"]
    assert choice["text"].startswith(decoded) and "".join(lp["tokens"][:-1]) == decoded
    scored = client.post("/v1/completions", json={**scoring, "prompt_logprobs": 0}).json()["choices"][0]
    assert len(scored["prompt_logprobs"]) == len(bare)

    vocab = client.post("/v1/completions", json={**body, "prompt": [[*bare, 10**6]]})
    assert error_of(vocab)["code"] == "invalid_tokens" and "token id 1000000" in error_of(vocab)["message"]
    too_long = error_of(client.post("/v1/completions", json={**body, "prompt": [5] * MAX_SEQ_LEN}))
    assert too_long["code"] == "prompt_too_long", too_long
    for bad in ([True, 5], [5, 1.0], [5, "5"], [], [[]], [[5], [-1]], [[5], 5]):
        error = error_of(client.post("/v1/completions", json={**body, "prompt": bad}))
        assert error["code"] == "invalid_request" and "prompt" in error["message"], (bad, error)


def test_a_batch_of_prompts_is_answered_in_openai_order(client: TestClient) -> None:
    """Several prompts in one request (strings or token-id lists): choice i of prompt p is choice p x n + i, each
    the answer that prompt gets alone (seeded: choice i with seed + i), usage summed over the prompts; streamed,
    each chunk's index says the same. best_of picks within each prompt's candidates. One prompt that cannot run
    refuses the batch before any runs; prompts x choices share n's bound."""
    prompts = ["abc", "the dog", "zz"]
    body = {"model": "m2", "max_tokens": 5, "temperature": 1.0, "seed": 7, "n": 2, "echo": True}
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json() for p in prompts]
    expected = [c["text"] for a in alone for c in a["choices"]]
    assert all(text.startswith(p) for text, p in zip(expected, [p for p in prompts for _ in range(2)], strict=True))
    batch = client.post("/v1/completions", json={**body, "prompt": prompts}).json()
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    assert [c["text"] for c in batch["choices"]] == expected
    for key in ("prompt_tokens", "completion_tokens"):
        assert batch["usage"][key] == sum(a["usage"][key] for a in alone), key
    as_ids = [tokens_of(client, {"prompt": p}) for p in prompts]
    by_ids = client.post("/v1/completions", json={**body, "prompt": as_ids}).json()
    assert [c["text"] for c in by_ids["choices"]] == expected and by_ids["usage"] == batch["usage"]

    chunks = sse(client, "/v1/completions", {**body, "prompt": as_ids, "stream": True, "stream_options":
                                             {"include_usage": True}})  # fmt: skip
    texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(6)]
    assert texts == expected
    assert chunks[-1]["usage"]["prompt_tokens"] == batch["usage"]["prompt_tokens"]
    assert chunks[-1]["usage"]["completion_tokens"] == batch["usage"]["completion_tokens"]

    best = {**body, "n": 1, "best_of": 2, "logprobs": 0}
    singles = [client.post("/v1/completions", json={**best, "prompt": p}).json()["choices"][0] for p in prompts[:2]]
    picked = client.post("/v1/completions", json={**best, "prompt": prompts[:2]}).json()["choices"]
    assert [(c["index"], c["text"]) for c in picked] == [(i, c["text"]) for i, c in enumerate(singles)]

    before = requests_run(client)
    too_long = error_of(client.post("/v1/completions", json={**body, "prompt": ["abc", "x" * 100]}))
    assert too_long["code"] == "prompt_too_long" and requests_run(client) == before
    bad_id = error_of(client.post("/v1/completions", json={**body, "prompt": [as_ids[0], [10**6]]}))
    assert bad_id["code"] == "invalid_tokens" and "prompt 1: token id 1000000" in bad_id["message"]
    assert requests_run(client) == before
    for bad, says in (
        (["abc", [5]], "prompt"),
        ([[5], "abc"], "prompt"),
        (["a"] * 9, "9 prompts"),
    ):
        assert says in error_of(client.post("/v1/completions", json={**body, "n": 1, "prompt": bad}))["message"]
    assert len(client.post("/v1/completions", json={**body, "prompt": prompts[:2] * 2}).json()["choices"]) == 8
    says = error_of(client.post("/v1/completions", json={**body, "n": 1, "best_of": 3, "prompt": prompts}))["message"]
    assert "9 requests" in says and "best_of" in says
