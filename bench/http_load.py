"""Load a running loraplex server over HTTP: throughput, time to first token and inter-token latency while
requests spread over many adapters (S-LoRA style), plus the adapter loads/evictions the server counted.

python bench/http_load.py --url http://127.0.0.1:8000 --adapters-dir /tmp/adapters --upload \\
    --adapters-in-use 1,8,32 --rate 4 --duration 30 --out results.json
python bench/http_load.py --serve "--base-model random:llama3-8b ..." --workload mixed --goodput --out g.json
python bench/http_load.py --smoke --serve "--base-model random:tiny --device cpu"   # CI: fails loudly

Workloads (--workload, a comma list runs each in turn against one server) set the prompt length, the output
length and the clients; explicit --prompt-len / --output-len / --concurrency override them:
  mixed    prompts 128-512 tokens, 64-128 new tokens, 32 clients (chat / RAG-like traffic)
  decode   prompt 128, 128 new tokens, 32 clients
  prefill  prompt 512, 1 new token, 32 clients (prompt tokens/s is the figure)
  single   prompt 128, 128 new tokens, 1 client (idle-server latency)
--shared-prefix N begins every prompt for an adapter with the same N tokens (a task's instructions), the rest of
each prompt its own; the server's count of prompt tokens it found in its KV cache is reported beside the adapter
counters.

Lengths are in tokens of the served model. Prompts come from --tokenizer: `bytes` (the default, and what
`random:` base models use: one token per byte, no special tokens) or a transformers tokenizer (a local
directory or hub id; with --serve, the served --base-model when it is not `random:`), whose encoding with
special tokens, as the server encodes, is checked to have exactly the length asked for. The server's own
count (details.prompt_tokens of each stream) is compared too: mismatches are counted per point and warned
about. The API has no ignore_eos, so a request may stop before its max_new_tokens: output tokens are those the
server streamed (details.generated_tokens), never the requested ones, and early stops are counted.

Each point of the sweep (every workload x --adapters-in-use x --rate) runs for --duration seconds. --rate 0 is
a closed loop (--concurrency clients, each sends its next request when the last one ends); otherwise arrivals
are Poisson at --rate requests/s with at most --concurrency in flight, and TTFT counts from the arrival.

--goodput: the highest Poisson rate whose p90 TTFT <= --slo-ttft and p90 ITL <= --slo-itl with no failed
request. With --rate, those rates are run; without, a search from --rate-start doubles the rate until a point
misses the SLO, then bisects --bisect times between the best passing and the lowest failing rate. Open loop
means arrivals do not wait for answers, so in-flight requests are not capped (unless --concurrency is given).
Each point also records the CPU cores that the load generator and (with --serve, from /proc) the server kept
busy: a load generator near one core measures its own delays too (one process streams ~5,000 tokens/s at most),
so --processes N splits a point's clients over N processes; a server near one core is bound by Python.
Markdown summary on stdout; --out writes everything as JSON (bench/plot.py draws it).
"""

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

PERCENTILES = (50, 90, 99)
SHARD_STREAMS = 8  # requests in flight per client of the load generator (open_clients)
LOADGEN_BUSY = 0.8  # cores of this process past which a point's latencies are partly the load generator's
# the server counters a point reports: adapter loads and evictions, prompt tokens found in the KV cache
METRIC_PREFIXES = ("loraplex_adapter_", "loraplex_prompt_tokens_cached")
READY_TIMEOUT_S = 600.0  # an 8B base model loads in a few minutes at worst
# a goodput sweep is open loop: this only guards the client's sockets, far above any server's batch
GOODPUT_IN_FLIGHT = 1024
PROMPT_ALPHABET = "abcdefghijklmnopqrstuvwxyz    "  # ASCII, so bytes == characters; spaces make words


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the point starts (Poisson) or 0 (closed loop)
    adapter: str | None
    prompt: str
    max_new_tokens: int
    prompt_tokens: int  # the length the prompt was built to, in the served model's tokens
    temperature: float = 0.0  # 0: greedy


@dataclass
class Result:
    status: int  # HTTP status; 0: the connection failed, 299: the stream ended without a final event
    started: float
    requested_tokens: int = 0
    planned_prompt_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None  # the server's count, from the final event's details
    finish_reason: str | None = None
    latency: float = 0.0
    error: str | None = None


# ---- workloads and prompts --------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """'64' or '32:128' -> inclusive (low, high)."""
    low, _, high = text.partition(":")
    return int(low), int(high or low)


@dataclass(frozen=True)
class Shape:
    """What a named workload fixes: prompt and output lengths in tokens (inclusive ranges) and clients."""

    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    concurrency: int


WORKLOADS: dict[str, Shape] = {
    "mixed": Shape((128, 512), (64, 128), 32),
    "decode": Shape((128, 128), (128, 128), 32),
    "prefill": Shape((512, 512), (1, 1), 32),
    "single": Shape((128, 128), (128, 128), 1),
}
UNNAMED = Shape((64, 256), (32, 128), 16)  # without --workload: the lengths earlier reports were measured with


def resolve_shape(
    name: str | None,
    prompt_len: tuple[int, int] | None,
    output_len: tuple[int, int] | None,
    concurrency: int | None,
    goodput: bool = False,
) -> Shape:
    """A workload's shape with the explicit flags (not None) on top. A goodput sweep is open loop, so unless
    --concurrency is given its in-flight cap is GOODPUT_IN_FLIGHT, not the workload's client count."""
    base = WORKLOADS[name] if name else UNNAMED
    if concurrency is None:
        concurrency = GOODPUT_IN_FLIGHT if goodput else base.concurrency
    return Shape(prompt_len or base.prompt_len, output_len or base.output_len, concurrency)


class Prompts(Protocol):
    added: int  # tokens the server adds around a prompt's own (BOS, ...)

    def make(self, rng: random.Random, tokens: int, prefix: str = "") -> str:
        """`prefix` and random text after it: a prompt of `tokens` tokens as the server counts them."""
        ...


class BytePrompts:
    """`random:` base models: one token per byte and no special tokens, so N ASCII characters are N tokens."""

    added = 0

    def make(self, rng: random.Random, tokens: int, prefix: str = "") -> str:
        return prefix + "".join(rng.choices(PROMPT_ALPHABET, k=tokens - len(prefix)))


class TokenizerPrompts:
    """Prompts of exactly N tokens of a transformers tokenizer, counted as the server counts them (encoded
    with the special tokens it adds, e.g. BOS). Random letters give no shared prefix between requests."""

    ATTEMPTS = 8

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # tokens the tokenizer adds around any text (BOS, ...): the prompt's own tokens are the rest
        self.added = self.count("a") - len(tokenizer("a", add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def make(self, rng: random.Random, tokens: int, prefix: str = "") -> str:
        # at most one token per character, and real tokenizers merge random letters ~2-3 to a token:
        # 4 characters per token leaves room to extend the cut
        ids = self.tokenizer("".join(rng.choices(PROMPT_ALPHABET, k=4 * tokens + 16)), add_special_tokens=False)[
            "input_ids"
        ]
        keep = tokens - (self.count(prefix) if prefix else self.added)
        # decoding a cut token list and encoding it again can merge across the cut (and the prefix's seam): correct
        # by the difference
        for _ in range(self.ATTEMPTS):
            if not 0 < keep <= len(ids):
                break
            text = prefix + self.tokenizer.decode(ids[:keep], clean_up_tokenization_spaces=False)
            got = self.count(text)
            if got == tokens:
                return text
            keep += tokens - got
        raise ValueError(f"cannot build a prompt of exactly {tokens} tokens with this tokenizer")


def serve_base_model(serve_args: str) -> str | None:
    """--base-model of a `loraplex serve` argument string (or its environment default); None: not given."""
    args = shlex.split(serve_args)
    for i, arg in enumerate(args):
        if arg == "--base-model" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--base-model="):
            return arg.partition("=")[2]
    return os.environ.get("LORAPLEX_BASE_MODEL") or None


def tokenizer_source(tokenizer: str | None, serve_args: str | None) -> str:
    """`bytes` or a transformers tokenizer to load: --tokenizer, else the --serve base model unless `random:`."""
    if tokenizer:
        return tokenizer
    base = serve_base_model(serve_args) if serve_args else None
    return "bytes" if base is None or base.startswith("random:") else base


def load_prompts(source: str) -> Prompts:
    if source == "bytes":
        return BytePrompts()
    from transformers import AutoTokenizer  # only here: the byte path needs no transformers import

    return TokenizerPrompts(AutoTokenizer.from_pretrained(source))


def adapter_weights(count: int, zipf: float) -> list[float]:
    """Popularity of adapter i: uniform when zipf == 0, else proportional to 1 / (i + 1)^zipf."""
    return [1.0 / (i + 1) ** zipf for i in range(count)]


@dataclass
class Workload:
    """Draws requests: adapter by popularity, prompt and output lengths uniform in their ranges."""

    rng: random.Random
    adapters: list[str | None]
    zipf: float
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    prompts: Prompts = field(default_factory=BytePrompts)
    temperature: float = 0.0  # of every request; 0: greedy
    # the first tokens of every prompt for an adapter, the same each time: its task's instructions (--shared-prefix)
    shared_prefix: int = 0
    _prefixes: dict[str | None, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.shared_prefix and self.prompt_len[0] <= self.shared_prefix + self.prompts.added:
            raise ValueError(f"--shared-prefix {self.shared_prefix} leaves no tokens of their own to prompts of "
                             f"{self.prompt_len[0]}: lower it, or raise --prompt-len")  # fmt: skip

    def next(self, at: float = 0.0) -> Planned:
        weights = adapter_weights(len(self.adapters), self.zipf)
        length = self.rng.randint(*self.prompt_len)
        adapter = self.rng.choices(self.adapters, weights)[0]
        prefix = self._prefixes.get(adapter, "")
        if self.shared_prefix and not prefix:  # seeded by the adapter alone: the same in every process of a point
            prefix = self.prompts.make(random.Random(f"prefix-{adapter}"), self.shared_prefix + self.prompts.added)
            self._prefixes[adapter] = prefix
        prompt, new_tokens = self.prompts.make(self.rng, length, prefix), self.rng.randint(*self.output_len)
        return Planned(at, adapter, prompt, new_tokens, length, self.temperature)

    def poisson(self, rate: float, duration: float) -> list[Planned]:
        """Arrivals at `rate` requests/s over `duration` seconds."""
        items, now = [], 0.0
        while (now := now + self.rng.expovariate(rate)) < duration:
            items.append(self.next(now))
        return items


# ---- one request ------------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, item: Planned, arrived: float | None = None) -> Result:
    """POST /generate_stream and time every SSE token event. `arrived`: when an open-loop request was due;
    TTFT and latency count from then, so time spent waiting for a free client is not hidden."""
    parameters = {"adapter_id": item.adapter, "max_new_tokens": item.max_new_tokens, "details": True}
    if item.temperature:
        parameters |= {"do_sample": True, "temperature": item.temperature}
    body = {"inputs": item.prompt, "parameters": parameters}
    result = Result(
        status=0,
        started=time.perf_counter() if arrived is None else arrived,
        requested_tokens=item.max_new_tokens,
        planned_prompt_tokens=item.prompt_tokens,
    )
    last = result.started
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    result.error = str(event["error"])
                    break
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - result.started
                else:
                    result.itl.append(now - last)
                last = now
                result.tokens += 1
                if event.get("generated_text") is not None:
                    finished = True
                    details = event.get("details") or {}
                    # the server's counts are the truth: an event may in principle carry more than one token
                    result.tokens = details.get("generated_tokens", result.tokens)
                    result.prompt_tokens = details.get("prompt_tokens")
                    result.finish_reason = details.get("finish_reason")
            if not finished:
                result.status, result.error = 299, result.error or "the stream ended without its final event"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency = time.perf_counter() - result.started
    return result


async def open_clients(
    stack: contextlib.AsyncExitStack,
    url: str,
    headers: dict[str, str],
    timeout: float,
    in_flight: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[httpx.AsyncClient]:
    """Clients for `in_flight` requests at once, one per SHARD_STREAMS of them. One client's connection pool scans
    all its connections at every request and release: with 128 streams in one pool that scan was three quarters of
    the load generator's CPU (~185 us a streamed token), and the load generator measured its own delays."""
    limits = httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4)
    return [
        await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits, transport=transport)
        )
        for _ in range(max(1, math.ceil(in_flight / SHARD_STREAMS)))
    ]


async def run_point(
    clients: list[httpx.AsyncClient], workload: Workload, concurrency: int, rate: float, duration: float
) -> tuple[list[Result], float]:
    """Run one sweep point, its requests spread over `clients` in turn (open_clients); (results, wall seconds from
    the first send to the last answer)."""
    slots = asyncio.Semaphore(concurrency)
    # Poisson arrivals (prompts included) are drawn before the clock starts: tokenizing is not load
    arrivals = workload.poisson(rate, duration) if rate > 0 else []
    start = time.perf_counter()

    async def poisson(i: int, item: Planned) -> Result:
        arrived = start + item.at
        await asyncio.sleep(max(0.0, arrived - time.perf_counter()))
        async with slots:
            return await send(clients[i % len(clients)], item, arrived)

    async def closed_loop(client: httpx.AsyncClient) -> list[Result]:
        done = [await send(client, workload.next())]  # at least one request per client, however short the point
        while time.perf_counter() - start < duration:
            done.append(await send(client, workload.next()))
        return done

    if rate > 0:
        results = list(await asyncio.gather(*(poisson(i, item) for i, item in enumerate(arrivals))))
    else:
        per_client = await asyncio.gather(*(closed_loop(clients[i % len(clients)]) for i in range(concurrency)))
        results = [r for done in per_client for r in done]
    return results, time.perf_counter() - start


def share(total: int, parts: int, i: int) -> int:
    """Part `i` of `total` split into `parts` as evenly as possible."""
    return total // parts + (i < total % parts)


@dataclass(frozen=True)
class PointJob:
    """One load-generating process's part of a point: its clients, its share of the arrival rate."""

    url: str
    headers: dict[str, str]
    timeout: float
    workload: Workload
    concurrency: int
    rate: float
    duration: float


def run_job(job: PointJob) -> tuple[list[Result], float, float]:
    """A PointJob in this process, with a client of its own: (results, wall seconds, CPU seconds)."""

    async def run() -> tuple[list[Result], float]:
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_clients(stack, job.url, job.headers, job.timeout, job.concurrency)
            return await run_point(clients, job.workload, job.concurrency, job.rate, job.duration)

    cpu = time.process_time()
    results, wall = asyncio.run(run())
    return results, wall, time.process_time() - cpu


async def run_point_in(pool: ProcessPoolExecutor, processes: int, job: PointJob) -> tuple[list[Result], float, float]:
    """`job` split over `processes` load-generating processes (each its own event loop and client, so that many
    streams are not measured through one process's delays): their results, the longest wall, their CPU seconds.
    A Poisson process split so is still one at the whole rate; each part draws from its own seed."""
    loop = asyncio.get_running_loop()
    parts = [
        replace(job, workload=replace(job.workload, rng=random.Random(job.workload.rng.random())),
                concurrency=share(job.concurrency, processes, i), rate=job.rate / processes)
        for i in range(processes)
    ]  # fmt: skip
    done = await asyncio.gather(*(loop.run_in_executor(pool, run_job, part) for part in parts if part.concurrency))
    return [r for results, _, _ in done for r in results], max(d[1] for d in done), sum(d[2] for d in done)


async def warm_up(client: httpx.AsyncClient, workload: Workload, count: int, concurrency: int) -> None:
    """Unrecorded requests, one for each adapter in use and `count` of the workload: first-time costs (kernel
    compilation for new shapes, each adapter's load from the store) stay out of the first point. A count below the
    adapters in use had left loads from disk in it: at 32 adapters and 16 warm-up requests, 20 loads at 3 server
    cores in a goodput search's first point, whose miss then ended the search below the rate the server held."""
    slots = asyncio.Semaphore(concurrency)

    async def one(item: Planned) -> Result:
        async with slots:
            return await send(client, item)

    items = [replace(workload.next(), adapter=adapter) for adapter in workload.adapters]
    await asyncio.gather(*(one(item) for item in [*items, *(workload.next() for _ in range(count))]))


# ---- statistics -------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_stats(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.status == 200]
    tokens = sum(r.tokens for r in ok)
    # the server's prompt count where it sent one; the planned length otherwise (an old server)
    prompt_tokens = sum(r.planned_prompt_tokens if r.prompt_tokens is None else r.prompt_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(str(r.status) for r in results if r not in ok)),
        "first_errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall else 0.0,
        "requested_output_tokens": sum(r.requested_tokens for r in ok),
        "stopped_early": sum(r.tokens < r.requested_tokens for r in ok),
        "finish_reasons": dict(Counter(r.finish_reason for r in ok if r.finish_reason)),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": prompt_tokens / wall if wall else 0.0,
        "prompt_length_mismatches": sum(r.prompt_tokens not in (None, r.planned_prompt_tokens) for r in ok),
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": latency_stats([x for r in ok for x in r.itl]),
        "latency_s": latency_stats([r.latency for r in ok]),
    }


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds process `pid` has used, all its threads (Linux's /proc); None without a pid or /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() if pid else []
    except OSError:
        return None
    # utime and stime, fields 14 and 15 of stat(5), the 12th and 13th after the command's closing parenthesis
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None


def cpu_per_s(before: tuple[float, float | None], after: tuple[float, float | None], wall: float) -> dict:
    """CPU cores the load generator (this process) and the server kept busy over a point. A load generator
    near one core (asyncio runs on one) measures its own delays as much as the server's; a server near one
    core is bound by Python (the engine thread and the event loop share one interpreter lock)."""
    client = (after[0] - before[0]) / wall if wall else 0.0
    server = None if after[1] is None or before[1] is None or not wall else (after[1] - before[1]) / wall
    return {"client_cpu_per_s": client, "server_cpu_per_s": server}


# ---- goodput ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    ttft: float  # p90 time to first token, seconds
    itl: float  # p90 inter-token latency, seconds


def meets_slo(point: dict, slo: Slo) -> bool:
    """No failed request, at least one answered, p90 TTFT and p90 ITL within the SLO. A point without
    inter-token gaps (1-token outputs) has no ITL to miss."""
    ttft, itl = point["ttft_s"]["p90"], point["itl_s"]["p90"]
    return (
        point["ok"] > 0
        and not point["errors"]
        and ttft is not None
        and ttft <= slo.ttft
        and (itl is None or itl <= slo.itl)
    )


def goodput(verdicts: list[tuple[float, bool]]) -> float | None:
    """The highest offered rate that met the SLO below every rate that missed it: a pass above a miss is
    noise, not capacity. (rate, met) pairs of open-loop points; None when no rate passed."""
    first_miss = min((rate for rate, met in verdicts if not met), default=math.inf)
    return max((rate for rate, met in verdicts if met and rate < first_miss), default=None)


def next_rate(verdicts: list[tuple[float, bool]], start: float, bisect: int, rate_max: float) -> float | None:
    """The automatic search: `start`, doubled while every point meets the SLO (up to rate_max), then `bisect`
    halvings of the gap between the best passing and the lowest failing rate. None: the search is done."""
    if not verdicts:
        return start
    misses = [rate for rate, met in verdicts if not met]
    if not misses:
        top = max(rate for rate, _ in verdicts)
        return None if top >= rate_max else min(2 * top, rate_max)
    first_miss_at = next(i for i, (_, met) in enumerate(verdicts) if not met)
    if len(verdicts) - 1 - first_miss_at >= bisect:
        return None
    return ((goodput(verdicts) or 0.0) + min(misses)) / 2


# ---- server side: metrics, adapters, a server of our own --------------------------------------------------


def parse_metrics(text: str, prefixes: tuple[str, ...] = METRIC_PREFIXES) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for samples whose name starts with one of `prefixes`."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


COUNTER_SUFFIXES = ("_total", "_count", "_sum")  # counters, and histograms' counts and sums (e.g. load seconds)


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Increases over a point of the counter-like samples; gauges have no meaningful delta."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.split("{")[0].endswith(COUNTER_SUFFIXES)}


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    return parse_metrics(response.text) if response.status_code == 200 else {}


async def check_ready(client: httpx.AsyncClient) -> None:
    try:
        response = await client.get("/ready")
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach the server at {client.base_url}: {exc}") from exc
    if response.status_code != 200:
        raise SystemExit(f"the server is not ready: {response.status_code} {response.text[:300]}")


async def upload_adapters(client: httpx.AsyncClient, directory: Path) -> list[str]:
    """POST every PEFT directory under `directory` as an adapter named after it; returns the names."""
    names = []
    for path in sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file()):
        files = {
            "config": (path / "adapter_config.json").read_bytes(),
            "weights": (path / "adapter_model.safetensors").read_bytes(),
        }
        response = await client.post("/v1/adapters", data={"name": path.name}, files=files, timeout=300)
        if response.status_code not in (200, 201, 409):  # 409: already there from an earlier run
            raise SystemExit(f"uploading {path.name} failed: {response.status_code} {response.text[:300]}")
        names.append(path.name)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(serve_args: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m loraplex serve ARGS --port <free>`, its output into `log` when given; returns the process and
    its URL once /ready is 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loraplex",
        "serve",
        *shlex.split(serve_args),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    out = None if log is None else log.open("w")
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)
    if out is not None:
        out.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before it was ready: {cmd}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- the run ----------------------------------------------------------------------------------------------


def sweep_rates(
    listed: list[float] | None, verdicts: list[tuple[float, bool]], start: float, bisect: int, rate_max: float
) -> Iterator[float]:
    """The listed rates in order, or else the goodput search, which reads the verdicts that the caller
    appends after each point."""
    if listed is not None:
        yield from listed
        return
    while (rate := next_rate(verdicts, start, bisect, rate_max)) is not None:
        yield rate


async def bench(
    args: argparse.Namespace,
    url: str,
    prompts: Prompts,
    transport: httpx.AsyncBaseTransport | None = None,
    server_pid: int | None = None,
) -> dict:
    """Every point of the run; `transport`: an in-process app instead of the network (the tests' fakes);
    `server_pid`: the server process started with --serve, whose CPU time each point records."""
    shapes = {
        name: resolve_shape(name, args.prompt_len, args.output_len, args.concurrency, args.goodput)
        for name in args.workload or [None]
    }
    in_flight = max(shape.concurrency for shape in shapes.values())
    slo = Slo(args.slo_ttft, args.slo_itl)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    async with contextlib.AsyncExitStack() as stack:
        # spawned, not forked: this process runs an event loop and the client's threads
        spawn = multiprocessing.get_context("spawn")
        pool = stack.enter_context(ProcessPoolExecutor(args.processes, spawn)) if args.processes > 1 else None
        clients = await open_clients(stack, url, headers, args.timeout, in_flight, transport)
        client = clients[0]  # for the server's state (ready, uploads, metrics) and the warm-up
        await check_ready(client)
        names = await upload_adapters(client, args.adapters_dir) if args.upload else []
        if args.adapters_dir and not names:
            names = sorted(p.name for p in args.adapters_dir.iterdir() if p.is_dir())
        rng = random.Random(args.seed)
        points, goodputs = [], []
        for name, shape in shapes.items():
            for in_use in args.adapters_in_use:
                if in_use > len(names):
                    raise SystemExit(f"--adapters-in-use {in_use} but only {len(names)} adapters are available")
                adapters: list[str | None] = list(names[:in_use]) if in_use else [None]
                workload = Workload(
                    rng,
                    adapters,
                    args.zipf,
                    shape.prompt_len,
                    shape.output_len,
                    prompts,
                    args.temperature,
                    args.shared_prefix,
                )
                if args.warmup:
                    await warm_up(client, workload, args.warmup, shape.concurrency)
                verdicts: list[tuple[float, bool]] = []
                for rate in sweep_rates(args.rate, verdicts, args.rate_start, args.bisect, args.rate_max):
                    before = await read_metrics(client)
                    cpu = (time.process_time(), process_cpu_s(server_pid))
                    if pool is None:
                        results, wall = await run_point(clients, workload, shape.concurrency, rate, args.duration)
                        workers_cpu = 0.0
                    else:
                        job = PointJob(url, headers, args.timeout, workload, shape.concurrency, rate, args.duration)
                        results, wall, workers_cpu = await run_point_in(pool, args.processes, job)
                    after = (time.process_time() + workers_cpu, process_cpu_s(server_pid))
                    cpu_used = cpu_per_s(cpu, after, wall)
                    counters = counter_deltas(before, await read_metrics(client))
                    point = {
                        "workload": name,
                        "adapters_in_use": in_use,
                        "rate": rate,
                        "concurrency": shape.concurrency,
                        "processes": args.processes,
                        **summarize(results, wall),
                        **cpu_used,
                        "adapter_counters": counters,
                    }
                    if args.goodput:
                        point["meets_slo"] = meets_slo(point, slo)
                        if rate > 0:  # a closed loop offers no rate
                            verdicts.append((rate, point["meets_slo"]))
                    points.append(point)
                    _progress(point)
                if args.goodput:
                    goodputs.append({"workload": name, "adapters_in_use": in_use, "rate": goodput(verdicts)})
        return {
            "url": url,
            "registered_adapters": len(names),
            "tokenizer": args.tokenizer,
            "workloads": {name or "": vars(shape) for name, shape in shapes.items()},
            "slo": vars(slo) if args.goodput else None,
            "goodput": goodputs,
            "config": _config_of(args),
            "points": points,
        }


def _progress(point: dict) -> None:
    verdict = {True: ", meets the SLO", False: ", misses the SLO"}.get(point.get("meets_slo"), "")
    print(
        f"workload={point['workload'] or '-'} adapters={point['adapters_in_use']} "
        f"rate={_rate(point['rate'])}: {point['ok']}/{point['requests']} ok, "
        f"{point['output_tokens_per_s']:.1f} tok/s{verdict}",
        file=sys.stderr,
    )
    busiest = point["client_cpu_per_s"] / point["processes"]  # its clients are split evenly over them
    if busiest > LOADGEN_BUSY:
        print(
            f"WARNING: each load-generating process kept {busiest:.0%} of a core busy: its own delays are in these "
            "latencies: split the clients over more --processes",
            file=sys.stderr,
        )
    if point["prompt_length_mismatches"]:
        print(
            f"WARNING: the server counted another prompt length than planned in "
            f"{point['prompt_length_mismatches']} requests: pass the served model's --tokenizer",
            file=sys.stderr,
        )


def _config_of(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "key"}


def _rate(rate: float) -> str:
    return f"{rate:g}" if rate else "closed"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown(report: dict) -> str:
    lines = [
        "| workload | adapters | offered req/s | ok/sent | req/s | out tok/s | prompt tok/s | TTFT p50/p90/p99 ms "
        "| ITL p50/p90/p99 ms | SLO | errors | adapter counters | CPU client/server |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        ttft, itl = ("/".join(_ms(p[kind][f"p{q}"]) for q in PERCENTILES) for kind in ("ttft_s", "itl_s"))
        counters = ", ".join(  # counts only; load seconds stay in the JSON
            f"{k.removeprefix('loraplex_')} +{v:g}"
            for k, v in p["adapter_counters"].items()
            if v and k.split("{")[0].endswith("_total")
        )
        slo = {True: "met", False: "missed"}.get(p.get("meets_slo"), "-")
        lines.append(
            f"| {p.get('workload') or '-'} | {p['adapters_in_use']} | {_rate(p['rate'])} "
            f"| {p['ok']}/{p['requests']} | {p['requests_per_s']:.2f} | {p['output_tokens_per_s']:.1f} "
            f"| {p.get('prompt_tokens_per_s', 0.0):.0f} | {ttft} | {itl} | {slo} | {p['errors'] or '-'} "
            f"| {counters or '-'} | {_cores(p.get('client_cpu_per_s'))}/{_cores(p.get('server_cpu_per_s'))} |"
        )
    if report.get("slo"):
        slo = report["slo"]
        lines.append("")
        for g in report["goodput"]:
            rate = "none (no rate met the SLO)" if g["rate"] is None else f"{g['rate']:g} req/s"
            lines.append(
                f"goodput, workload {g['workload'] or '-'}, {g['adapters_in_use']} adapters: {rate} "
                f"(p90 TTFT <= {slo['ttft']:g} s, p90 ITL <= {slo['itl'] * 1000:g} ms, no errors)"
            )
    return "\n".join(lines)


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def failures(report: dict) -> list[str]:
    """What makes a smoke run fail: any failed request, a point that streamed no token at all, or prompts
    whose length the server counted differently from the one they were built to."""
    problems = []
    for p in report["points"]:
        if p["errors"]:
            problems.append(f"adapters={p['adapters_in_use']}: failed requests {p['errors']}: {p['first_errors']}")
        if p["output_tokens"] == 0:
            problems.append(f"adapters={p['adapters_in_use']}: no tokens came back")
        if p.get("prompt_length_mismatches"):
            problems.append(
                f"adapters={p['adapters_in_use']}: {p['prompt_length_mismatches']} prompts of "
                "another length than planned"
            )
    return problems


def csv_of(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",")]


def workload_name(text: str) -> str:
    if text not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"unknown workload {text!r}; one of {', '.join(WORKLOADS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="ARGS", help="start `loraplex serve ARGS` on a free port, stop it after")
    parser.add_argument("--server-log", type=Path, help="with --serve: the server's output goes to this file")
    parser.add_argument("--key", help="Bearer key (an admin key when uploading)")
    parser.add_argument("--adapters-dir", type=Path, help="PEFT directories (bench/random_adapters.py writes them)")
    parser.add_argument("--upload", action="store_true", help="upload --adapters-dir first, named after the dirs")
    parser.add_argument(
        "--adapters-in-use",
        type=csv_of(int),
        default=[0],
        help="distinct adapters the requests spread over, one point each; 0: base model only",
    )
    parser.add_argument(
        "--workload",
        type=csv_of(workload_name),
        help=f"named lengths and clients, a comma list: {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--rate",
        type=csv_of(float),
        help="requests/s (Poisson), 0: closed loop (default); with --goodput, omit to search",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help=f"clients / most requests in flight (default: the workload's, else {UNNAMED.concurrency};"
        f" with --goodput {GOODPUT_IN_FLIGHT})",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per point")
    parser.add_argument("--warmup", type=int, default=0, help="unrecorded requests before each workload's points")
    parser.add_argument("--zipf", type=float, default=0.0, help="adapter popularity exponent; 0: uniform")
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="tokens that begin every prompt for an adapter, the same each time (a task's instructions); the rest "
        "of each prompt is random",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="every request samples at this temperature (as most traffic does); 0: greedy",
    )
    parser.add_argument("--prompt-len", type=parse_range, help="tokens, N or MIN:MAX (default: the workload's)")
    parser.add_argument("--output-len", type=parse_range, help="max_new_tokens, N or MIN:MAX (default: the workload's)")
    parser.add_argument(
        "--tokenizer",
        help="`bytes` or a transformers tokenizer (directory or hub id) to build prompts with "
        "(default: the --serve base model's, bytes for random: models or --url)",
    )
    parser.add_argument("--goodput", action="store_true", help="judge every point against the SLO, report goodput")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="p90 time to first token, seconds")
    parser.add_argument("--slo-itl", type=float, default=0.05, help="p90 inter-token latency, seconds")
    parser.add_argument("--rate-start", type=float, default=1.0, help="first rate of the goodput search, req/s")
    parser.add_argument("--rate-max", type=float, default=256.0, help="the goodput search doubles no further")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps of the goodput search")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generating processes a point's clients are split over (one Python process streams a few "
        "thousand tokens/s at most: a point whose client CPU nears one core wants more)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the full report as JSON")
    parser.add_argument(
        "--smoke", action="store_true", help="a few short requests; exit 1 if any failed or no token came back"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.upload and args.adapters_dir is None:
        parser.error("--upload needs --adapters-dir")
    if args.server_log and not args.serve:
        parser.error("--server-log needs --serve")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.rate_start <= 0:
        parser.error("--rate-start must be above 0")
    if args.rate is None and not args.goodput:
        args.rate = [0.0]
    if args.smoke:
        # a stalled server fails the run within seconds instead of holding CI for the default timeout
        args.concurrency, args.duration, args.prompt_len, args.output_len = 2, 2.0, (8, 16), (4, 8)
        args.timeout = min(args.timeout, 20.0)
    args.tokenizer = tokenizer_source(args.tokenizer, args.serve)
    prompts = load_prompts(args.tokenizer)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that the server we started is stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    process, url = start_server(args.serve, args.server_log) if args.serve else (None, args.url)
    try:
        report = asyncio.run(bench(args, url, prompts, server_pid=process.pid if process else None))
    finally:
        if process is not None:
            stop_server(process)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    problems = failures(report)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if args.smoke and problems else 0


if __name__ == "__main__":
    sys.exit(main())
