"""Random combinations of valid and boundary request features (sampling, limits, stop sequences, choices,
logprobs, grammars, adapters and mixes, streaming, the tokenizer routes), drawn with a fixed seed and sent to a
real server while honest greedy requests run beside them. No combination may get a 5xx or break its stream,
a refusal is a JSON error with a message, an answer keeps the promises its parameters make, and the honest
answers are exactly what they are alone. A failure names the combination, which can be sent again as is."""

import asyncio
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from e2e.test_parity_clients import SCHEMA, write_adapter

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
SEED = 1201
COMBINATIONS = 24
AT_ONCE = 3  # combinations in flight together; the honest requests make the shared server's batch of 4
ADAPTERS = ("combo-a", "combo-b")
PROMPTS = ("The capital of France is", "1, 2, 3,", "Ünïcödé 日本語 🙂 é", " ", "\n\n")
# a few tokens short of the shared server's max_seq_len (512), as a prompt and as a chat message
LONG = {"text": "one two three four " * 127, "chat": "one two three four " * 120}
STOPS = ("", " ", ".", ",", "\n", "é", "🙂", "日本", "the", "The", "1", "yes", "{", '"', "ab", "aba", "x" * 256)
REGEXES = (r"(yes|no)", r"[0-9]{1,3}", r"é+|🙂", r"<\|im_end\|>")  # the last spells a special token's text
HONEST = [
    ("/generate", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}),
    ("/v1/completions", {"model": "combo-a", "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0}),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6,
            "temperature": 0,
        },
    ),
]


@dataclass
class Limits:
    vocab: int
    room: dict[str, int]  # the largest completion that fits with LONG, per way of sending it


@pytest.fixture(scope="module")
def served(server: str, embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Limits]:
    """The shared server with this module's two random adapters, and the limits its combinations go up to."""
    tmp = tmp_path_factory.mktemp("combinations")
    config = json.loads((embedded_cache_dir / "models" / MODEL / "config.json").read_text())
    for i, name in enumerate(ADAPTERS):
        peft = write_adapter(tmp / name, config, seed=10 + i)
        files = {
            "config": ("adapter_config.json", (peft / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (peft / "adapter_model.safetensors").read_bytes()),
        }
        response = httpx.post(f"{server}/v1/adapters", data={"name": name}, files=files, timeout=60)
        assert response.status_code == 201, response.text
    plain = httpx.post(f"{server}/tokenize", json={"prompt": LONG["text"]}, timeout=60).json()
    message = {"role": "user", "content": LONG["chat"]}
    chat = httpx.post(f"{server}/tokenize", json={"messages": [message]}, timeout=60).json()
    room = {"text": plain["max_model_len"] - plain["count"], "chat": chat["max_model_len"] - chat["count"]}
    assert all(0 < r <= 4 for r in room.values()), room  # a boundary that fits, and runs fast
    return server, Limits(config["vocab_size"], room)


# ---- drawing combinations --------------------------------------------------------------------------------


def pick(rng: random.Random, *choices: object) -> object:
    return rng.choice(choices)


def stops(rng: random.Random) -> list[str]:
    return rng.sample(STOPS, rng.choice((0, 0, 1, 2, 3)))


def mix(rng: random.Random) -> dict:
    ids = [rng.choice((*ADAPTERS, "combo-a@1")) for _ in range(rng.choice((1, 2, 3)))]
    return {"ids": ids, "weights": [rng.choice((0.0, -100.0, 100.0, 0.5, -0.5, 1.0)) for _ in ids]}


def adapter_name(rng: random.Random) -> str | None:
    return rng.choice((None, None, "", MODEL, *ADAPTERS, "combo-b@1", "combo-a@2", "combo-ghost"))


def tgi_grammar(rng: random.Random) -> dict:
    kind = rng.choice(("regex", "json", "json text", "lorax", "lorax schema"))
    if kind == "regex":
        return {"grammar": {"type": "regex", "value": rng.choice(REGEXES)}}
    if kind == "json":
        return {"grammar": {"type": "json", "value": SCHEMA}}
    if kind == "json text":
        return {"grammar": {"type": "json", "value": json.dumps(SCHEMA)}}
    if kind == "lorax":
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_object", "schema": SCHEMA}}


def openai_format(rng: random.Random) -> dict:
    return rng.choice(
        (
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
        )
    )


def prompt_and_limit(rng: random.Random, limits: Limits, encoding: str) -> tuple[str, int | None]:
    """A prompt and a completion limit: small ones, or LONG with the largest that fits, one more, or none."""
    if rng.random() < 0.1:
        room = limits.room[encoding]
        return LONG[encoding], rng.choice((room, room + 1, None))
    return rng.choice(PROMPTS), rng.choice((1, 1, 2, 3, 4))


def tgi_combination(rng: random.Random, limits: Limits) -> tuple[str, dict]:
    inputs, limit = prompt_and_limit(rng, limits, "text")
    p: dict = {"max_new_tokens": limit}
    if rng.random() < 0.6:
        p.update(
            do_sample=pick(rng, True, False),
            temperature=pick(rng, None, 0.0, 1e-9, 0.01, 0.7, 1.0, 100.0),
            top_k=pick(rng, None, 0, 1, 5, limits.vocab - 1, limits.vocab, 10**9),
            top_p=pick(rng, None, 1e-9, 0.5, 0.999, 1.0),
            seed=pick(rng, 0, 42, 2**64 - 1),  # every sampled combination is seeded: the same answer each run
        )
    if rng.random() < 0.4:
        p["repetition_penalty"] = pick(rng, 0.01, 0.5, 1.0, 1.3, 100.0)
    if rng.random() < 0.3:
        p["frequency_penalty"] = pick(rng, -2.0, -0.5, 0.0, 1.0, 2.0)
    p.update(
        stop=stops(rng),
        details=pick(rng, True, False),
        return_full_text=rng.random() < 0.2,
        decoder_input_details=rng.random() < 0.2,
        top_n_tokens=pick(rng, None, None, 0, 1, 20),
        truncate=pick(rng, None, None, None, 1, 3, 10_000),
    )
    if rng.random() < 0.25:
        p["best_of"] = pick(rng, 1, 2)
    if rng.random() < 0.25:
        p["merged_adapters"] = mix(rng)
    else:
        p["adapter_id"] = adapter_name(rng)
    if rng.random() < 0.3:
        p.update(tgi_grammar(rng))
    path = rng.choice(("/generate", "/generate", "/generate_stream", "/generate_stream", "/"))
    body = {"inputs": inputs, "parameters": p}
    if path == "/":
        body["stream"] = pick(rng, True, False)
    return path, body


def messages(rng: random.Random, text: str) -> list[dict]:
    return rng.choice(
        (
            [{"role": "user", "content": text}],
            [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": text}],
            [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "text", "text": " Why?"}]}],
            [{"role": "user", "content": text}, {"role": "assistant", "content": "Sure."}, {"role": "user"}],
            [{"role": "developer", "content": text}, {"role": "tool", "content": "42"}],
        )
    )


def openai_combination(rng: random.Random, limits: Limits) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    text, limit = prompt_and_limit(rng, limits, "chat" if chat else "text")
    body: dict = {"model": adapter_name(rng) or MODEL, "seed": pick(rng, None, 0, 7, 2**64 - 1)}
    body[pick(rng, "max_tokens", "max_completion_tokens")] = limit
    body["temperature"] = pick(rng, 0, 0, 1e-9, 0.7, 2)
    if body["temperature"] and body["seed"] is None:
        body["seed"] = 5  # every sampled combination is seeded: the same answer each run
    body["top_p"] = pick(rng, None, 1e-9, 0.5, 1.0)
    if rng.random() < 0.3:
        body["frequency_penalty"] = pick(rng, -2.0, 0.0, 1.0, 2.0)
        body["presence_penalty"] = pick(rng, -2.0, 0.0, 0.5, 2.0)
    if rng.random() < 0.2:
        body["logit_bias"] = {str(rng.randrange(limits.vocab)): pick(rng, -100, -1.5, 2, 100) for _ in range(3)}
    body["stop"] = pick(rng, None, rng.choice(STOPS), stops(rng))
    body["n"] = pick(rng, 1, 1, 1, 2, 3)
    body["stream"] = rng.random() < 0.4
    if body["stream"] and rng.random() < 0.6:
        body["stream_options"] = {"include_usage": pick(rng, True, False)}
    if rng.random() < 0.25:
        body["response_format"] = openai_format(rng)
    if rng.random() < 0.2:
        body["model"], body["merged_adapters"] = MODEL, mix(rng)
    if chat:
        body["messages"] = messages(rng, text)
        if rng.random() < 0.5:
            body["logprobs"] = True
            body["top_logprobs"] = pick(rng, None, 0, 1, 20)
        return "/v1/chat/completions", body
    body["prompt"] = pick(rng, text, [text], "")
    body["logprobs"] = pick(rng, None, None, 0, 1, 5, 20)
    if rng.random() < 0.3:
        body["best_of"] = body["n"] + pick(rng, 0, 1)
    return "/v1/completions", body


def tokenizer_combination(rng: random.Random, limits: Limits) -> tuple[str, dict]:
    text = rng.choice((*PROMPTS, "", LONG["text"]))
    return rng.choice(
        (
            ("/tokenize", {"inputs": text}),
            ("/tokenize", {"prompt": text, "add_special_tokens": pick(rng, True, False), "return_token_strs": True}),
            ("/tokenize", {"messages": messages(rng, text), "add_generation_prompt": pick(rng, True, False),
                           "return_token_strs": pick(rng, True, False)}),
            ("/detokenize", {"tokens": rng.sample(range(limits.vocab), rng.choice((0, 1, 5)))}),
            ("/detokenize", {"tokens": [0, 1, 2, limits.vocab - 1]}),
        )
    )  # fmt: skip


# combinations that once failed, sent every run whatever the draw
FOUND: list[tuple[str, dict]] = [
    (
        "/generate",
        {"inputs": "hi", "parameters": {"max_new_tokens": 2, "grammar": {"type": "regex", "value": REGEXES[-1]}}},
    ),
]


def combinations(limits: Limits) -> list[tuple[str, dict]]:
    rng = random.Random(SEED)
    draw = (tgi_combination, tgi_combination, openai_combination, openai_combination, tokenizer_combination)
    return [*FOUND, *(rng.choice(draw)(rng, limits) for _ in range(COMBINATIONS))]


# ---- sending them, and what every answer must keep ----------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: object  # the JSON body, or a stream's events (the [DONE] marker as the string "[DONE]")
    streamed: bool


async def send(client: httpx.AsyncClient, path: str, body: dict) -> Reply:
    async with client.stream("POST", path, json=body) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return Reply(response.status_code, json.loads(await response.aread()), False)
        events: list[object] = []
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
        return Reply(response.status_code, events, True)


def stop_free(text: str, stop: list[str]) -> None:
    hit = [s for s in stop if s and s in text]
    assert not hit, f"stop sequence(s) {hit} in the answer {text!r}"


def grammar_kept(text: str, grammar: dict | None) -> None:
    """An output that ended on its own (not by length or a stop sequence) is a sentence of its grammar."""
    if grammar is None:
        return
    if grammar.get("type") == "regex":
        assert re.fullmatch(grammar["value"], text), f"{text!r} does not match {grammar['value']!r}"
    elif grammar.get("type") != "text":
        assert isinstance(json.loads(text), dict), text


def check_tgi(body: dict, reply: Reply) -> None:
    p = body["parameters"]
    asked = p["max_new_tokens"]
    top_n = p.get("top_n_tokens") or 0
    grammar = p.get("grammar") or p.get("response_format")
    if reply.streamed:
        events = reply.body
        assert isinstance(events, list) and events, "an empty stream"
        assert all("token" in e for e in events), events[-1]
        last = events[-1]
        assert "details" in last and last["generated_text"] is not None, f"the stream did not end: {last}"
        assert last["details"]["generated_tokens"] == len(events)
        assert all(len(e.get("top_tokens", [])) == top_n for e in events)
        finish, count = last["details"]["finish_reason"], len(events)
        text = last["generated_text"][len(body["inputs"]) :] if p.get("return_full_text") else last["generated_text"]
    else:
        answer = reply.body[0] if isinstance(reply.body, list) else reply.body
        assert isinstance(answer, dict), answer
        text = answer["generated_text"]
        if p.get("return_full_text"):
            assert text.startswith(body["inputs"]), text
            text = text[len(body["inputs"]) :]
        details = answer.get("details")
        if details is None:
            stop_free(text, p.get("stop") or [])
            return
        finish, count = details["finish_reason"], details["generated_tokens"]
        assert len(details["tokens"]) == count
        assert len(details["top_tokens"]) == (count if top_n else 0)
        assert all(len(t) == top_n for t in details["top_tokens"])
        assert len(details.get("best_of_sequences") or []) == (p.get("best_of") or 1) - 1
    if asked is not None:
        assert count <= asked and (finish != "length" or count == asked), (count, finish)
    stop_free(text, p.get("stop") or [])
    if finish != "length" and not p.get("stop"):
        grammar_kept(text, grammar)


def check_openai(path: str, body: dict, reply: Reply) -> None:
    chat = path.endswith("chat/completions")
    stop = [body["stop"]] if isinstance(body["stop"], str) else body["stop"] or []
    n = body["n"]
    texts, finishes = [""] * n, [None] * n
    grammar = body.get("response_format")
    if reply.streamed:
        events = reply.body
        assert isinstance(events, list) and events and events[-1] == "[DONE]", f"the stream did not end: {events[-3:]}"
        chunks = events[:-1]
        for chunk in chunks:
            assert isinstance(chunk, dict) and len(chunk["choices"]) <= 1, chunk
            for choice in chunk["choices"]:
                i = choice["index"]
                texts[i] += (choice["delta"]["content"] or "") if chat else choice["text"]
                if choice["finish_reason"]:
                    assert finishes[i] is None, f"choice {i} finished twice"
                    finishes[i] = choice["finish_reason"]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        wants_usage = (body.get("stream_options") or {}).get("include_usage", False)
        assert len(usage) == (1 if wants_usage else 0), usage
        assert chunks[-1].get("usage") or not wants_usage, "usage is not on the last chunk"
    else:
        answer = reply.body
        assert isinstance(answer, dict) and len(answer["choices"]) == n, answer
        for choice in answer["choices"]:
            i = choice["index"]
            texts[i] = choice["message"]["content"] if chat else choice["text"]
            finishes[i] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if chat and body.get("logprobs"):
                assert all(len(t["top_logprobs"]) == (body.get("top_logprobs") or 0) for t in logprobs["content"])
            elif not chat and body.get("logprobs") is not None:
                assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
                assert all(len(t) <= body["logprobs"] + 1 for t in logprobs["top_logprobs"])
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert all(f in ("stop", "length") for f in finishes), f"choices without an end: {finishes}"
    for text, finish in zip(texts, finishes, strict=True):
        stop_free(text, stop)
        if finish == "stop" and not stop:
            grammar_kept(text, grammar)


def check(path: str, body: dict, reply: Reply) -> None:
    where = f"{path} {json.dumps(body, ensure_ascii=False)[:1500]}"
    assert reply.status < 500, f"{reply.status} {reply.body} for {where}"
    if reply.status >= 400:
        error = reply.body.get("error") if isinstance(reply.body, dict) else None
        assert isinstance(error, dict) and error.get("message"), f"{reply.status} without a JSON error: {where}"
        return
    assert reply.status == 200, where
    try:
        if path in ("/generate", "/generate_stream", "/"):
            check_tgi(body, reply)
        elif path.startswith("/v1/"):
            check_openai(path, body, reply)
    except (AssertionError, KeyError, TypeError) as exc:
        raise AssertionError(f"{exc!r} for {where}\nanswer: {str(reply.body)[:1500]}") from None


def answer_of(reply: Reply) -> str:
    assert reply.status == 200, reply.body
    body = reply.body
    assert isinstance(body, dict)
    if "generated_text" in body:
        return body["generated_text"]
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_feature_combinations_fail_alone(served: tuple[str, Limits]) -> None:
    url, limits = served
    drawn = combinations(limits)

    async def run() -> tuple[list[str], list[list[str]], list[Reply | BaseException]]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=16)) as client:
            alone = [answer_of(await send(client, path, body)) for path, body in HONEST]
            gate = asyncio.Semaphore(AT_ONCE)
            finished = asyncio.Event()

            async def combination(path: str, body: dict) -> Reply:
                async with gate:
                    return await send(client, path, body)

            async def honest(path: str, body: dict) -> list[str]:
                answers = []
                while not finished.is_set() or not answers:
                    answers.append(answer_of(await send(client, path, body)))
                return answers

            beside = [asyncio.create_task(honest(path, body)) for path, body in HONEST]
            replies = await asyncio.gather(*(combination(*c) for c in drawn), return_exceptions=True)
            finished.set()
            return alone, await asyncio.gather(*beside), replies

    alone, together, replies = asyncio.run(run())
    failures = []
    for (path, body), reply in zip(drawn, replies, strict=True):
        try:
            if isinstance(reply, BaseException):  # a connection cut mid-answer is a failure of its own
                raise AssertionError(f"{reply!r} for {path} {json.dumps(body, ensure_ascii=False)[:1500]}")
            check(path, body, reply)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)
    for (path, body), solo, answers in zip(HONEST, alone, together, strict=True):
        assert set(answers) == {solo}, (path, body, solo, answers)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
