"""A weighted mix of adapters served as one derived LoRA equals PEFT's add_weighted_adapter "cat" (the exact
weighted sum of the deltas), in a batch beside its components and the base model."""

import asyncio
import copy
import threading

import pytest
import torch
from enginekit import (
    Collector,
    greedy,
    greedy_log_softmax,
    make_engine,
    reference_generate,
    request,
    run_to_end,
    token_logprobs,
)
from peft import PeftModel

from adapters.bounds import MAX_GAIN, check_magnitudes
from adapters.lora import LoraModule, LoraWeights
from server import mixing
from server.client_share import current_client, current_request
from server.engine import GenerationRequest
from server.mixing import InvalidMix, MixCache, TooManyMixes, mix_key, mix_lora

NEW_TOKENS = 8
WEIGHTS = (0.7, -0.4)


def peft_mix_generate(base, adapters, weights, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[0].path, adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter.path, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], list(weights), "mix", combination_type="cat")
    model.set_adapter("mix")
    tokens, log_softmax = greedy_log_softmax(model, prompt, NEW_TOKENS)
    return tokens, token_logprobs(tokens, log_softmax)


def test_a_mix_equals_peft_weighted_adapter_cat(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    parts = [adapters[0], adapters[1]]  # q/v rank 2, and every projection rank 8 with rsLoRA: they overlap on q/v
    mixed = mix_lora([(a.weights, w) for a, w in zip(parts, WEIGHTS, strict=True)])
    assert mixed.rank == 10
    key = mix_key([a.key for a in parts], WEIGHTS)
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("mix these adapters")["input_ids"]
    engine.submit(GenerationRequest(prompt, greedy(NEW_TOKENS), key, mixed, request_id="mix"), sink)
    for i, adapter in enumerate([*parts, None]):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    run_to_end(engine)
    tokens, logprobs = peft_mix_generate(base, parts, WEIGHTS, prompt)
    assert sink.tokens("mix") == tokens
    assert sink.logprobs("mix") == pytest.approx(logprobs, abs=1e-4)
    alone = [reference_generate(base, adapter, prompt, NEW_TOKENS)[0] for adapter in [*parts, None]]
    assert [sink.tokens(f"r{i}") for i in range(3)] == alone  # the components beside it are unchanged
    assert tokens not in alone


def test_mix_keys_are_deterministic() -> None:
    assert mix_key(["a@1", "b@2"], (0.5, 0.5)) == "mix:a@1*0.5+b@2*0.5"
    assert mix_key(["a@1", "b@2"], (0.5, 0.5)) != mix_key(["b@2", "a@1"], (0.5, 0.5))


def test_the_mixes_alive_at_once_are_bounded_until_requests_release_them() -> None:
    """Mix weights are any floats, so clients could ask for endless distinct mixes, each up to a max-rank adapter
    in memory: past the bound on mixes alive (cached, held by a request, being built) a new one is a 429 until a
    request releases one; a mix in use is shared, and a build refused for its rank holds nothing."""
    lora = LoraWeights({"m": LoraModule(torch.randn(2, 4), torch.randn(4, 2), 1.0)})
    dropped: list[str] = []
    cache = MixCache(max_lora_rank=3, prepare=lambda w: w, on_drop=dropped.append, capacity=2, max_live=3)

    def mix(weight: float):  # type: ignore[no-untyped-def]
        return cache.acquire(f"mix:a*{weight}", [("a", lora, weight)])

    async def run() -> None:
        held = [await mix(w) for w in (1.0, 2.0, 3.0)]  # the cache keeps two; the first is held by its request
        assert dropped == ["mix:a*1.0"]
        with pytest.raises(TooManyMixes) as refused:
            await mix(4.0)
        assert refused.value.http_status == 429 and "retry" in str(refused.value)
        shared, release_shared = await mix(3.0)
        assert shared is held[2][0]
        held[0][1]()
        held[0][1]()  # once, however often called
        with pytest.raises(InvalidMix):  # rank 4 over 3
            await cache.acquire("mix:a*1+b*1", [("a", lora, 1.0), ("b", lora, 1.0)])
        await mix(4.0)  # the first mix is gone: the cache drops the second, which its request still holds
        with pytest.raises(TooManyMixes):
            await mix(5.0)
        held[1][1]()
        await mix(5.0)
        release_shared()

    asyncio.run(run())


def test_requests_asking_for_a_mix_being_built_share_its_one_build() -> None:
    """The n choices of one request ask for the same new mix at once: one build, one place among the mixes in use
    (max_in_use 1 here: each waiter counted as a mix of its own was a 429 for every n > 1), the same weights for
    all. A waiter that goes away (its choices cancelled) stops neither the build nor the others' wait, and the mix
    is cached for the next request; a build that fails fails each waiter and holds nothing."""
    lora = LoraWeights({"m": LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0)})
    builds = []
    gate = threading.Event()

    def prepare(mixed: LoraWeights) -> LoraWeights:
        builds.append(mixed)
        gate.wait(10)
        return mixed

    cache = MixCache(max_lora_rank=1, prepare=prepare, on_drop=lambda _: None, capacity=4, max_in_use=1)

    async def run() -> None:
        components = [("a", lora, 0.5)]
        waiters = [asyncio.ensure_future(cache.acquire("mix:a*0.5", components)) for _ in range(8)]
        await asyncio.sleep(0.1)
        waiters[0].cancel()  # one choice goes away mid-build
        gate.set()
        done = await asyncio.gather(*waiters[1:])
        assert len(builds) == 1 and all(mixed is builds[0] for mixed, _ in done)
        with pytest.raises(TooManyMixes):  # one mix in use: another is refused until it is released
            await cache.acquire("mix:a*2", [("a", lora, 2.0)])
        for _, release in done:
            release()
        mixed, release = await cache.acquire("mix:a*0.5", components)  # cached: no second build
        assert mixed is builds[0] and len(builds) == 1
        release()
        too_large = [("a", lora, 1.0), ("b", lora, 1.0)]  # rank 2 over 1
        refused = await asyncio.gather(*(cache.acquire("mix:ab", too_large) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(error, InvalidMix) for error in refused)
        await cache.acquire("mix:a*2", [("a", lora, 2.0)])  # the failed build holds no place

    asyncio.run(run())


def test_a_mix_is_held_to_the_bound_every_uploaded_adapter_obeys() -> None:
    """Each component passes the upload bound, but the weights multiply it: eight near the bound at |100| would
    reach 800 times it, two at weight 1 twice it. Such a mix is a 422 naming the fix, and holds nothing; the same
    adapter at a smaller weight mixes."""
    near = LoraWeights({"m": LoraModule(torch.full((1, 4), 60.0), torch.full((4, 1), 240.0), 1.0)})
    check_magnitudes(near)  # |A| 240, |sB| 240, gain 57600: an adapter the store accepts
    cache = MixCache(max_lora_rank=8, prepare=lambda w: w, on_drop=lambda _: None, capacity=2, max_live=2)
    loud = [(f"a{i}", near, 100.0 if i % 2 else -100.0) for i in range(8)]

    async def run() -> None:
        for i, components in enumerate((loud, [("a0", near, 1.0), ("a1", near, 1.0)])):
            with pytest.raises(InvalidMix) as refused:
                await cache.acquire(f"mix:refused{i}", components)
            assert refused.value.http_status == 422 and "lower the weights" in str(refused.value)
            assert f"{MAX_GAIN:g}" in str(refused.value)
        for weight in (0.5, -0.25):  # the refusals took no live mix: both fit in max_live 2
            await cache.acquire(f"mix:a0*{weight}", [("a0", near, weight)])

    asyncio.run(run())


def test_a_place_a_mix_frees_goes_to_the_client_waiting_not_to_the_one_holding_every_place(monkeypatch) -> None:
    """Mix places (max_in_use 4) are shared between clients. With nobody waiting one client may take all four;
    another is then refused (429) and waits: when one of the first client's requests ends, the first client's next
    new mix is refused (a client holding fewer waits for the free place) and the waiting client's retry takes it.
    Once no one waits, or a refused client has not come back within MIX_WAIT_S, any client takes a free place."""
    monkeypatch.setattr(mixing, "MIX_WAIT_S", 0.5)
    lora = LoraWeights({"m": LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0)})
    cache = MixCache(max_lora_rank=8, prepare=lambda w: w, on_drop=lambda _: None, capacity=16, max_in_use=4)

    async def acquire(client: str, weight: int):  # type: ignore[no-untyped-def]
        current_client.set(client)
        return (await cache.acquire(f"mix:a*{weight}", [("a", lora, float(weight))]))[1]

    async def run() -> None:
        hog = [await acquire("hog", weight) for weight in range(1, 5)]  # nobody waits: every place
        with pytest.raises(TooManyMixes, match="held by requests"):
            await acquire("other", 10)
        hog.pop()()
        with pytest.raises(TooManyMixes, match="other clients holding no more wait") as refused:
            await acquire("hog", 5)
        assert refused.value.http_status == 429
        await acquire("other", 10)  # the freed place: the other client no longer waits
        hog.pop()()
        hog.append(await acquire("hog", 6))  # nobody waits: the hog takes a free place again
        with pytest.raises(TooManyMixes, match="held by requests"):
            await acquire("third", 20)
        hog.pop()()
        await asyncio.sleep(0.6)  # the third client did not come back within MIX_WAIT_S
        await acquire("hog", 7)

    asyncio.run(run())


def test_a_request_on_a_held_mix_is_refused_while_others_wait_but_the_runs_of_one_request_join(monkeypatch) -> None:
    """One place (max_in_use 1), held by a client's request; another client is refused and waits. The first client's
    new request on its held mix is refused too (joining would keep the place taken for as long as it overlaps
    requests), while the later runs of the request holding it (its choices, started one after another) join it.
    Once the waiting client has the place, or no one waits, requests on a held mix join it."""
    lora = LoraWeights({"m": LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0)})
    cache = MixCache(max_lora_rank=8, prepare=lambda w: w, on_drop=lambda _: None, capacity=16, max_in_use=1)

    async def acquire(client: str, request: object, weight: int):  # type: ignore[no-untyped-def]
        current_client.set(client)
        current_request.set(request)
        return (await cache.acquire(f"mix:a*{weight}", [("a", lora, float(weight))]))[1]

    async def run() -> None:
        first = object()
        holds = [await acquire("hog", first, 1)]
        with pytest.raises(TooManyMixes, match="held by requests"):
            await acquire("other", object(), 2)
        holds.append(await acquire("hog", first, 1))  # the same request's next choice
        with pytest.raises(TooManyMixes, match="keep its place") as refused:
            await acquire("hog", object(), 1)
        assert refused.value.http_status == 429
        for release in holds:
            release()
        other = await acquire("other", object(), 2)
        await acquire("other", object(), 2)  # nobody waits: a request on a held mix joins it
        other()

    asyncio.run(run())


def test_mixes_held_at_once_are_bounded_below_the_device_slots() -> None:
    """Each mix a request holds takes a device slot while it runs: with max_in_use 2 (half of 4 slots) a third
    distinct mix is a 429 while two are held, whatever the cache could keep; another request on a held mix is not
    refused, and a release frees a place."""
    lora = LoraWeights({"m": LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0)})
    cache = MixCache(max_lora_rank=8, prepare=lambda w: w, on_drop=lambda _: None, capacity=8, max_in_use=2)

    async def run() -> None:
        _, first = await cache.acquire("mix:a*1", [("a", lora, 1.0)])
        await cache.acquire("mix:a*2", [("a", lora, 2.0)])
        with pytest.raises(TooManyMixes, match="held by requests") as refused:
            await cache.acquire("mix:a*3", [("a", lora, 3.0)])
        assert refused.value.http_status == 429
        _, again = await cache.acquire("mix:a*1", [("a", lora, 1.0)])  # a mix already held: no new slot
        first()
        with pytest.raises(TooManyMixes):  # mix:a*1 is still held by the second request
            await cache.acquire("mix:a*3", [("a", lora, 3.0)])
        again()
        await cache.acquire("mix:a*3", [("a", lora, 3.0)])

    asyncio.run(run())
