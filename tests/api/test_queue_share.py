"""What every client shares, through a real server (uvicorn in process, a tiny model): past
--max-queue-per-adapter an adapter's request gets 429 adapter_queue_full, in the server's error shape with
Retry-After, while a request for another adapter is still queued and answered; past --max-requests-per-client a
client's request, or tokenizer job, gets 429 client_share_full while another client's is served; past the tokenizer's
backlog a job gets 429 tokenizer_busy, charged what it costs the tokenizer."""

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app, wait_ready
from peft_dirs import make_peft_dir

from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app
from server.engine import Engine
from server.runtime import Runtime
from server.tokenizer_pool import THREADS, TokenizerPool, chat_work, text_work


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Runtime]]:
    tmp = tmp_path_factory.mktemp("queue-share")
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(
        adapter_dir=tmp / "store",
        cache_dir=tmp,
        device="cpu",
        max_seq_len=64,
        max_batch_size=1,
        max_queue=4,
        max_queue_per_adapter=2,
    )
    app = create_app(settings, base=base)
    with serve_app(app) as url:
        wait_ready(url)
        for seed, name in enumerate(("flood", "other")):
            peft = make_peft_dir(tmp / name, seed=seed)
            files = {"config": (peft / CONFIG_FILE).read_bytes(), "weights": (peft / WEIGHTS_FILE).read_bytes()}
            assert httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files).status_code == 201
        yield url, app.state.runtime


def paused(engine: Engine) -> tuple[threading.Event, Callable[[], None]]:
    """Hold the engine thread before its next step (so submitted requests stay queued) until the event is set;
    the callable puts the engine's own step back."""
    go = threading.Event()
    step = engine.step

    def held() -> bool:
        go.wait()
        return step()

    engine.step = held  # type: ignore[method-assign]
    return go, lambda: delattr(engine, "step")


def generate(url: str, adapter: str | None) -> httpx.Response:
    parameters = {"max_new_tokens": 2, **({"adapter_id": adapter} if adapter else {})}
    return httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": parameters}, timeout=60)


def until(condition: Callable[[], bool], seconds: float = 30, never: str = "the requests never queued") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, never
        time.sleep(0.01)


Send = Callable[[], httpx.Response]


def flood_then_other(engine: Engine, flood: list[Send], refused: Send, other: Send) -> tuple[httpx.Response, list]:
    """With the engine held: the flood's requests queued, then `refused` sent (answered at once: refused), then
    `other` queued; the engine let go: (refused's answer, the queued requests' answers)."""
    go, restore = paused(engine)
    queued: list[Future[httpx.Response]] = []
    try:
        with ThreadPoolExecutor(4) as pool:  # the refused request is sent on one too: queued, it would wait
            queued += [pool.submit(send) for send in flood]
            until(lambda: engine.num_waiting == len(flood))
            answer = pool.submit(refused).result(timeout=10)
            queued.append(pool.submit(other))
            until(lambda: engine.num_waiting == len(flood) + 1)
            go.set()
            return answer, [future.result() for future in queued]
    finally:
        go.set()
        restore()


def test_an_adapter_past_its_share_gets_429_while_another_adapter_is_served(server: tuple[str, Runtime]) -> None:
    url, engine = server[0], server[1].engine
    flood = functools.partial(generate, url, "flood")
    refused, answers = flood_then_other(engine, [flood, flood], flood, functools.partial(generate, url, "other"))
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "adapter_queue_full" and error["type"] == "invalid_request_error", error
    assert "adapter flood@" in error["message"] and "--max-queue-per-adapter" in error["message"], error
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert engine.waiting_counts() == {}
    assert generate(url, "flood").status_code == 200  # its share is free again


def held_threads(pool: TokenizerPool) -> threading.Event:
    """Every thread of the tokenizer's held by a job of one byte until the event is set, so that the jobs sent
    meanwhile wait (as `paused` holds the engine)."""
    go = threading.Event()

    async def hold() -> None:
        await asyncio.gather(*(pool.run(1, go.wait) for _ in range(THREADS)))

    threading.Thread(target=asyncio.run, args=(hold(),), daemon=True).start()
    until(lambda: pool.backlog_bytes == THREADS, never="the tokenizer's threads were never held")
    return go


def test_chats_are_charged_the_messages_they_render(server: tuple[str, Runtime]) -> None:
    """Chats of 1,024 empty messages (27 ms of templating each on the embedded model, and no text at all) sent while
    the tokenizer's threads are busy: each is charged its messages, so the backlog takes as many as its budget holds
    and refuses the rest at once with 429 tokenizer_busy, while an honest prompt sent beside them still fits and is
    answered as alone once the threads go on. Charged by their text, they cost nothing: none was ever refused."""
    url, runtime = server
    pool = runtime.inference.tokenizing
    chat = {"messages": [{"role": "user", "content": ""}] * 1024}
    fits = (pool.budget_bytes - THREADS) // chat_work(1024, 0)
    alone = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, timeout=60).json()
    go = held_threads(pool)
    try:
        with ThreadPoolExecutor(fits + 6) as senders:
            chats = [senders.submit(httpx.post, f"{url}/tokenize", json=chat, timeout=60) for _ in range(fits + 5)]
            until(lambda: sum(f.done() for f in chats) == 5, never="no chat past the budget was refused")
            honest = senders.submit(httpx.post, f"{url}/tokenize", json={"prompt": "hi"}, timeout=60)
            waiting = THREADS + fits * chat_work(1024, 0) + text_work(2)
            until(lambda: pool.backlog_bytes == waiting, never="the honest prompt never reached the tokenizer")
            refused = [f for f in chats if f.done()]
            go.set()
            answered = [f.result() for f in chats if f not in refused]
    finally:
        go.set()
    for response in (f.result() for f in refused):
        assert response.status_code == 429 and response.headers["retry-after"] == "1", response.text
        assert response.json()["error"]["code"] == "tokenizer_busy", response.text
    # templated, 1,024 messages are more tokens than max_seq_len 64: refused once the work was done
    assert {(r.status_code, r.json()["error"]["code"]) for r in answered} == {(422, "prompt_too_long")}
    assert honest.result().json() == alone


@contextmanager
def keyed_server(model_dir: Path, tmp: Path, **limits: int) -> Iterator[tuple[str, Runtime]]:
    """A server with two inference keys (two clients) and an admin key, one adapter stored, and `limits`."""
    base = load_base_model(str(model_dir), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32)
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=64, max_batch_size=1,
                        api_key=["flood-key", "other-key"], admin_key=["admin-key"], **limits)  # fmt: skip
    app = create_app(settings, base=base)
    with serve_app(app) as url:
        wait_ready(url)
        peft = make_peft_dir(tmp / "adapter")
        files = {"config": (peft / CONFIG_FILE).read_bytes(), "weights": (peft / WEIGHTS_FILE).read_bytes()}
        uploaded = httpx.post(f"{url}/v1/adapters", data={"name": "adapter"}, files=files,
                              headers={"Authorization": "Bearer admin-key"})  # fmt: skip
        assert uploaded.status_code == 201, uploaded.text
        yield url, app.state.runtime


@pytest.fixture(scope="module")
def keyed(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Runtime]]:
    with keyed_server(tiny_model_dirs["llama"], tmp_path_factory.mktemp("client-share"), max_queue=8,
                      max_requests_per_client=2) as server:  # fmt: skip
        yield server


def generate_as(url: str, key: str, stream: bool = False) -> httpx.Response:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    return httpx.post(f"{url}/generate_stream" if stream else f"{url}/generate", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})  # fmt: skip


def test_a_client_past_its_share_gets_429_while_another_client_is_served(keyed: tuple[str, Runtime]) -> None:
    """--max-requests-per-client 2: a key with two requests queued (both on the base model, a stream among them)
    gets 429 client_share_full for a third, while another key's request is queued and answered; the share frees as
    the requests end. The per-adapter share cannot tell these clients apart: they name the same model."""
    url, runtime = keyed
    engine = runtime.engine
    flood = functools.partial(generate_as, url, "flood-key")
    refused, answers = flood_then_other(
        engine, [flood, functools.partial(generate_as, url, "flood-key", True)], flood,
        functools.partial(generate_as, url, "other-key"),
    )  # fmt: skip
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "client_share_full" and "--max-requests-per-client" in error["message"], error
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert all(generate_as(url, "flood-key").status_code == 200 for _ in range(3))  # its share is free again


@pytest.fixture(scope="module")
def shared_queue(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Runtime]]:
    """No per-client share: only the queue's own sharing stands between the two keys."""
    with keyed_server(tiny_model_dirs["llama"], tmp_path_factory.mktemp("shared-queue"), max_queue=3) as server:
        yield server


def test_a_full_queue_gives_another_client_a_place_and_the_floods_newest_hears_429(
    shared_queue: tuple[str, Runtime],
) -> None:
    """--max-queue 3, filled by one key (its newest a stream): another key's request still gets in, as the flood's
    newest gives its place and hears 429 queue_full (a status, not a stream that fails: it never started), saying
    why. The other key's answer is as alone; its second request, which would leave the two at 2 and 2, is a plain
    429 queue_full. Before, any request past a full queue was refused, whoever filled it."""
    url, runtime = shared_queue
    engine = runtime.engine
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 4, "adapter_id": "adapter"}}
    alone = post_as(url, "other-key", "/generate", body)
    assert alone.status_code == 200, alone.text
    go, restore = paused(engine)
    try:
        with ThreadPoolExecutor(4) as pool:
            flood: list[Future[httpx.Response]] = []
            for stream in (False, False, True):  # one at a time: the stream is the newest
                flood.append(pool.submit(generate_as, url, "flood-key", stream))
                until(lambda: engine.num_waiting == len(flood))
            other = pool.submit(post_as, url, "other-key", "/generate", body)
            until(lambda: engine.waiting_counts() == {None: 2, "adapter@1": 1})  # the newest gave its place
            refused = generate_as(url, "other-key")
            go.set()
            answers = [future.result() for future in flood]
    finally:
        go.set()
        restore()
    assert [r.status_code for r in answers] == [200, 200, 429], [r.text for r in answers]
    gave = answers[2].json()["error"]
    assert gave["code"] == "queue_full" and "gave its place to another client" in gave["message"], gave
    assert answers[2].headers["retry-after"] == "1"
    assert other.result().json() == alone.json()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full", refused.text
    assert "gave its place" not in refused.json()["error"]["message"]


def test_an_adapters_full_share_gives_another_client_a_place_for_it(
    shared_queue: tuple[str, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-queue 3 and --max-queue-per-adapter 2: one key's two base-model requests (its newest a stream) hold the
    base model's whole share. Another key's base-model request still gets in, as the flood's newest gives its place
    and hears 429 adapter_queue_full (a status, not a broken stream), saying why; the other key's answer is as alone,
    its second base-model request (1 and 1) a plain 429 adapter_queue_full, while the flood's request for another
    adapter is queued and answered. Before, every other key's base-model request was refused until the flood
    drained, however the queue itself was shared."""
    url, runtime = shared_queue
    engine = runtime.engine
    alone = generate_as(url, "other-key")
    assert alone.status_code == 200, alone.text
    monkeypatch.setattr(runtime.scheduler, "max_queue_per_adapter", 2)
    submit, queued = engine.submit, []  # the requests queued: no count tells the other key's apart

    def counted(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        submit(*args, **kwargs)
        queued.append(args[0].request_id)

    monkeypatch.setattr(engine, "submit", counted)
    go, restore = paused(engine)
    try:
        with ThreadPoolExecutor(4) as pool:
            flood: list[Future[httpx.Response]] = []
            for stream in (False, True):  # one at a time: the stream is the newest
                flood.append(pool.submit(generate_as, url, "flood-key", stream))
                until(lambda: engine.num_waiting == len(flood))
            other = pool.submit(generate_as, url, "other-key")
            until(lambda: len(queued) == 3)  # the flood's newest gave its place
            refused = generate_as(url, "other-key")
            body = {"inputs": "hi", "parameters": {"max_new_tokens": 4, "adapter_id": "adapter"}}
            flood.append(pool.submit(post_as, url, "flood-key", "/generate", body))
            until(lambda: engine.waiting_counts() == {None: 2, "adapter@1": 1})
            go.set()
            answers = [future.result() for future in flood]
    finally:
        go.set()
        restore()
    assert [r.status_code for r in answers] == [200, 429, 200], [r.text for r in answers]
    gave = answers[1].json()["error"]
    assert gave["code"] == "adapter_queue_full" and "gave its place to another client" in gave["message"], gave
    assert "the base model" in gave["message"] and answers[1].headers["retry-after"] == "1"
    assert other.result().json() == alone.json()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "adapter_queue_full", refused.text
    assert "gave its place" not in refused.json()["error"]["message"]
    assert engine.waiting_counts() == {}


def test_a_full_tokenizer_backlog_gives_another_client_a_place(shared_queue: tuple[str, Runtime]) -> None:
    """No per-client share: one key's costly chats fill the tokenizer's backlog while its threads are held (the
    rest refused at once: no client holds more than it). Another key's /tokenize still gets in, as the flood's
    newest chat gives its place and hears 429 tokenizer_busy, saying why; the other key's answer is as alone.
    Before, it was refused with tokenizer_busy until the flood drained."""
    url, runtime = shared_queue
    pool = runtime.inference.tokenizing
    fits = (pool.budget_bytes - THREADS) // chat_work(1024, 0)
    # each chat a little costlier, so that what `fits` of them leave (< fits bytes) holds no other job
    text = (pool.budget_bytes - THREADS) // fits - chat_work(1024, 0)
    chat = {"messages": [{"role": "user", "content": "x" * text}] + [{"role": "user", "content": ""}] * 1023}
    alone = post_as(url, "other-key", "/tokenize", {"prompt": "hi"})
    go = held_threads(pool)
    try:
        with ThreadPoolExecutor(fits + 2) as senders:
            flood = [senders.submit(post_as, url, "flood-key", "/tokenize", chat) for _ in range(fits + 1)]
            until(lambda: sum(f.done() for f in flood) == 1, never="no chat past the budget was refused")
            refused = [f.result() for f in flood if f.done()]
            other = senders.submit(post_as, url, "other-key", "/tokenize", {"prompt": "hi"})
            until(lambda: sum(f.done() for f in flood) == 2, never="no chat gave its place")
            gave = [f.result() for f in flood if f.done() and f.result() not in refused]
            go.set()
            answered = [f.result() for f in flood]
    finally:
        go.set()
    assert other.result().json() == alone.json()
    assert [r.json()["error"]["code"] for r in refused + gave] == ["tokenizer_busy"] * 2
    assert "gave its place" not in refused[0].json()["error"]["message"]
    assert "gave its place to another client's" in gave[0].json()["error"]["message"], gave[0].text
    assert sum(r.status_code == 429 for r in answered) == 2  # the rest were tokenized (and refused as too long)
    assert pool.backlog_bytes == 0


def post_as(url: str, key: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})


TOKENIZER_REQUESTS = [
    ("/tokenize", {"prompt": "hi"}),
    ("/tokenize", {"inputs": "hi"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}),
    ("/detokenize", {"tokens": [72, 73]}),
]


def test_a_client_at_its_share_is_refused_before_its_text_is_tokenized(keyed: tuple[str, Runtime]) -> None:
    """--max-requests-per-client 2: a key with two requests queued is refused its /tokenize and /detokenize requests
    too (they take the tokenizer's threads every client shares), and its prompts before they are tokenized: a prompt
    too long for max_seq_len 64 hears client_share_full, not the prompt_too_long its tokens would have told. Another
    key's tokenizer requests are answered meanwhile, and the key's own once its requests end."""
    url, runtime = keyed
    engine = runtime.engine
    too_long = [
        ("/generate", {"inputs": "x" * 100}),
        ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "x" * 100}]}),
    ]
    go, restore = paused(engine)
    try:
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(generate_as, url, "flood-key") for _ in range(2)]
            until(lambda: engine.num_waiting == 2)
            refused = [post_as(url, "flood-key", path, body) for path, body in TOKENIZER_REQUESTS + too_long]
            others = [post_as(url, "other-key", path, body) for path, body in TOKENIZER_REQUESTS]
            go.set()
            assert [f.result().status_code for f in queued] == [200, 200]
    finally:
        go.set()
        restore()
    for response in refused:
        assert response.status_code == 429 and response.headers["retry-after"] == "1", response.text
        assert response.json()["error"]["code"] == "client_share_full", response.text
    assert [r.status_code for r in others] == [200] * len(TOKENIZER_REQUESTS), [r.text for r in others]
    again = [post_as(url, "flood-key", path, body) for path, body in TOKENIZER_REQUESTS]
    assert [r.json() for r in again] == [r.json() for r in others]
    assert post_as(url, "flood-key", *too_long[0]).json()["error"]["code"] == "prompt_too_long"


def test_one_clients_tokenizing_flood_leaves_the_tokenizer_to_the_others(keyed: tuple[str, Runtime]) -> None:
    """--max-requests-per-client 2: one key's flood of costly templating (chats of 1,024 messages, 20 ms of work
    each), sent while another key's requests are in flight, holds at most two jobs of the tokenizer's: the rest are
    refused at once with client_share_full, none fills the tokenizer's backlog (tokenizer_busy, which would refuse
    the other key too), and the other key's answers are as alone."""
    url, _ = keyed
    chat = [{"role": "user", "content": "x"}] * 1024  # more tokens than max_seq_len: refused once templated
    flood = [("/tokenize", {"messages": chat}), ("/v1/chat/completions", {"model": "llama", "messages": chat})]
    honest = [
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4}}),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/detokenize", {"tokens": [72, 73]}),
    ]

    def one_by_one() -> list[dict]:  # within the other key's own share
        return [post_as(url, "other-key", path, body).json() for path, body in honest]

    alone = one_by_one()
    with ThreadPoolExecutor(33) as pool:
        flooding = [pool.submit(post_as, url, "flood-key", *flood[i % 2]) for i in range(32)]
        together = pool.submit(lambda: [answer for _ in range(3) for answer in one_by_one()])
        assert together.result() == alone * 3
        refused = [f.result() for f in flooding]
    codes = [(r.status_code, r.json()["error"]["code"]) for r in refused]
    assert set(codes) <= {(422, "prompt_too_long"), (429, "client_share_full")}, codes
    assert (429, "client_share_full") in codes and (422, "prompt_too_long") in codes, codes


def slow_schema(tag: str) -> dict:
    """A JSON schema whose translation takes the grammar compiler to its deadline: 500 patternProperties, checked
    pairwise for overlaps (a minute)."""
    return {"type": "object", "patternProperties": {f"^p{i}_{tag}[a-z]*$": {} for i in range(500)}}


def past_two_waiting(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """The flood key's two /generate requests of `bodies` sent, each to wait seconds before the queue (for a compile,
    a load); while they wait, the key's third request is 429 client_share_full and another key's is answered.
    Returns the two's answers."""
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post_as, url, "flood-key", "/generate", body) for body in bodies]
        time.sleep(1)  # they start waiting within milliseconds; a probe sent before could take one's place
        refused = generate_as(url, "flood-key")
        other = generate_as(url, "other-key")
        answers = [f.result() for f in waiting]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "client_share_full", refused.text
    assert other.status_code == 200, other.text
    return answers


def test_a_clients_grammars_count_against_its_share_while_they_compile(keyed: tuple[str, Runtime]) -> None:
    """--max-requests-per-client 2: a key whose two requests' grammars are compiling (schemas that hold the compiler
    to its check's deadline, 2.5 s) is refused a third request, while another key's request is answered; the slow
    grammars end as 422s and the key's share is free again."""
    url, _ = keyed
    grammars = [{"type": "json", "value": slow_schema(str(k))} for k in range(2)]
    bodies = [{"inputs": "hi", "parameters": {"max_new_tokens": 2, "grammar": grammar}} for grammar in grammars]
    answers = past_two_waiting(url, bodies)
    assert [r.status_code for r in answers] == [422, 422], [r.text for r in answers]
    assert generate_as(url, "flood-key").status_code == 200


def test_a_clients_requests_count_against_its_share_while_their_adapter_loads(
    keyed: tuple[str, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-requests-per-client 2: a key whose two requests wait for their adapter to load from the store (a slow
    disk: each read takes 2 s) is refused a third request, while another key's request is answered; both requests
    are answered once the adapter is loaded."""
    url, runtime = keyed
    store = runtime.registry.store
    read_weights = store.read_weights

    def slow_read(manifest):  # type: ignore[no-untyped-def]
        time.sleep(2)
        return read_weights(manifest)

    monkeypatch.setattr(store, "read_weights", slow_read)  # no request named the adapter before: it is read now
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": "adapter"}}
    answers = past_two_waiting(url, [body, body])
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]


@pytest.fixture(scope="module")
def one_mix_place(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Runtime]]:
    """--max-active-adapters 2: one place for a mix (half the slots)."""
    with keyed_server(tiny_model_dirs["llama"], tmp_path_factory.mktemp("mix-place"), max_active_adapters=2) as server:
        yield server


def mix_as(url: str, key: str, weight: float) -> httpx.Response:
    mix = {"ids": ["adapter"], "weights": [weight]}
    body = {"model": "llama", "prompt": "hi", "max_tokens": 4, "temperature": 0, "merged_adapters": mix}
    return post_as(url, key, "/v1/completions", body)


def mix_place_held(url: str, engine: Engine, late: Send | None = None) -> tuple[httpx.Response, httpx.Response | None]:
    """With the engine held: the flood key's mix request (weight 0.5) queued, holding the only mix place; the other
    key's new mix (0.7) sent, refused at once; then `late` sent. The engine let go: (the refusal, late's answer)."""
    go, restore = paused(engine)
    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(mix_as, url, "flood-key", 0.5)
            until(lambda: engine.num_waiting == 1)
            refused = mix_as(url, "other-key", 0.7)
            answer = pool.submit(late) if late is not None else None
            until(lambda: answer is None or answer.done() or engine.num_waiting == 2)
            go.set()
            assert held.result().status_code == 200, held.result().text
            return refused, answer.result() if answer is not None else None
    finally:
        go.set()
        restore()


def test_a_mix_place_that_frees_goes_to_the_client_waiting_for_one(one_mix_place: tuple[str, Runtime]) -> None:
    """One key's mix request holds the only mix place (queued behind a held engine): another key's new mix is
    refused with 429 too_many_adapter_mixes, and waits. When the first key's request ends, its own next new mix is
    refused (the other key waits for the place), and the other key's retry takes the place: its answer is the one
    the same request gets alone. The first key, refused since, is next. Before, the first key took the place
    again, and could keep it for good."""
    url, runtime = one_mix_place
    refused, _ = mix_place_held(url, runtime.engine)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_many_adapter_mixes" and "held by requests" in error["message"], error
    again = mix_as(url, "flood-key", 0.6)
    assert again.status_code == 429, again.text
    assert "other clients holding no more wait" in again.json()["error"]["message"], again.text
    answer = mix_as(url, "other-key", 0.7)
    assert answer.status_code == 200, answer.text
    assert mix_as(url, "flood-key", 0.6).status_code == 200  # refused since, it is next: before another new mix
    alone = mix_as(url, "other-key", 0.7)  # nobody waits now
    assert alone.status_code == 200 and answer.json()["choices"] == alone.json()["choices"], alone.text


def test_a_client_cannot_keep_its_mix_place_by_overlapping_requests_on_it(one_mix_place: tuple[str, Runtime]) -> None:
    """One key's mix request holds the only mix place (queued behind a held engine) and another key waits for it: the
    first key's next request on the same mix is refused with 429 too_many_adapter_mixes, as its new mix would be.
    Before, it joined the held mix, so the place never freed: a key that always has one more request on its mix
    queued kept the place from every other key for good. Once the first request ends, the waiting key's retry takes
    the place, and with nobody waiting requests on a held mix join it again."""
    url, runtime = one_mix_place
    # before, the late request queued behind the first
    refused, joined = mix_place_held(url, runtime.engine, functools.partial(mix_as, url, "flood-key", 0.5))
    assert refused.status_code == 429, refused.text
    assert joined.status_code == 429 and joined.headers["retry-after"] == "1", joined.text
    error = joined.json()["error"]
    assert error["code"] == "too_many_adapter_mixes" and "keep its place" in error["message"], error
    assert mix_as(url, "other-key", 0.7).status_code == 200
    assert mix_as(url, "flood-key", 0.5).status_code == 200
