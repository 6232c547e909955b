"""Load a running loraplex server over HTTP: throughput, time to first token and inter-token latency while
requests spread over many adapters (S-LoRA style), plus the adapter loads/evictions the server counted.

python bench/http_load.py --url http://127.0.0.1:8000 --adapters-dir /tmp/adapters --upload \\
    --adapters-in-use 1,8,32 --rate 4 --duration 30 --out results.json
python bench/http_load.py --smoke --serve "--base-model random:tiny --device cpu"   # CI: fails loudly

Each point of the sweep (every --adapters-in-use x --rate) runs for --duration seconds. --rate 0 is a
closed loop (--concurrency clients, each sends its next request when the last one ends); otherwise
arrivals are Poisson at --rate requests/s with at most --concurrency in flight. Prompt lengths are in
bytes, which is tokens for `random:` base models (byte-level tokenizer). Markdown summary on stdout.
"""

import argparse
import asyncio
import json
import math
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PERCENTILES = (50, 90, 99)
METRIC_PREFIX = "loraplex_adapter_"
READY_TIMEOUT_S = 600.0  # an 8B base model loads in a few minutes at worst


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the point starts (Poisson) or 0 (closed loop)
    adapter: str | None
    prompt: str
    max_new_tokens: int


@dataclass
class Result:
    status: int  # HTTP status; 0: the connection failed, 299: the stream ended without a final event
    started: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    latency: float = 0.0
    error: str | None = None


# ---- workload ---------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """'64' or '32:128' -> inclusive (low, high)."""
    low, _, high = text.partition(":")
    return int(low), int(high or low)


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

    def next(self, at: float = 0.0) -> Planned:
        weights = adapter_weights(len(self.adapters), self.zipf)
        # random letters and spaces: no shared prefix between requests, and ASCII so bytes == characters
        prompt = "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz    ", k=self.rng.randint(*self.prompt_len)))
        return Planned(at, self.rng.choices(self.adapters, weights)[0], prompt, self.rng.randint(*self.output_len))

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
    body = {"inputs": item.prompt,
            "parameters": {"adapter_id": item.adapter, "max_new_tokens": item.max_new_tokens, "details": True}}
    result = Result(status=0, started=time.perf_counter() if arrived is None else arrived)
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
                finished = finished or event.get("generated_text") is not None
            if not finished:
                result.status, result.error = 299, result.error or "the stream ended without its final event"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency = time.perf_counter() - result.started
    return result


async def run_point(client: httpx.AsyncClient, workload: Workload, concurrency: int, rate: float,
                    duration: float) -> tuple[list[Result], float]:
    """Run one sweep point; (results, wall seconds from the first send to the last answer)."""
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def poisson(item: Planned) -> Result:
        arrived = start + item.at
        await asyncio.sleep(max(0.0, arrived - time.perf_counter()))
        async with slots:
            return await send(client, item, arrived)

    async def closed_loop() -> list[Result]:
        done = [await send(client, workload.next())]  # at least one request per client, however short the point
        while time.perf_counter() - start < duration:
            done.append(await send(client, workload.next()))
        return done

    if rate > 0:
        results = list(await asyncio.gather(*map(poisson, workload.poisson(rate, duration))))
    else:
        per_client = await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
        results = [r for done in per_client for r in done]
    return results, time.perf_counter() - start


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
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(str(r.status) for r in results if r not in ok)),
        "first_errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": latency_stats([x for r in ok for x in r.itl]),
        "latency_s": latency_stats([r.latency for r in ok]),
    }


# ---- server side: metrics, adapters, a server of our own --------------------------------------------------


def parse_metrics(text: str, prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for samples whose name starts with `prefix`."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(prefix):
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
        files = {"config": (path / "adapter_config.json").read_bytes(),
                 "weights": (path / "adapter_model.safetensors").read_bytes()}
        response = await client.post("/v1/adapters", data={"name": path.name}, files=files, timeout=300)
        if response.status_code not in (200, 201, 409):  # 409: already there from an earlier run
            raise SystemExit(f"uploading {path.name} failed: {response.status_code} {response.text[:300]}")
        names.append(path.name)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(serve_args: str) -> tuple[subprocess.Popen, str]:
    """`python -m loraplex serve ARGS --port <free>`; returns the process and its URL once /ready is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex", "serve", *shlex.split(serve_args), "--host", "127.0.0.1",
           "--port", str(port)]
    process = subprocess.Popen(cmd)
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


async def bench(args: argparse.Namespace, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        await check_ready(client)
        names = await upload_adapters(client, args.adapters_dir) if args.upload else []
        if args.adapters_dir and not names:
            names = sorted(p.name for p in args.adapters_dir.iterdir() if p.is_dir())
        rng = random.Random(args.seed)
        points = []
        for in_use in args.adapters_in_use:
            if in_use > len(names):
                raise SystemExit(f"--adapters-in-use {in_use} but only {len(names)} adapters are available")
            adapters: list[str | None] = list(names[:in_use]) if in_use else [None]
            workload = Workload(rng, adapters, args.zipf, args.prompt_len, args.output_len)
            for rate in args.rate:
                before = await read_metrics(client)
                results, wall = await run_point(client, workload, args.concurrency, rate, args.duration)
                counters = counter_deltas(before, await read_metrics(client))
                point = {"adapters_in_use": in_use, "rate": rate, **summarize(results, wall),
                         "adapter_counters": counters}
                points.append(point)
                print(f"adapters={in_use} rate={rate or 'closed'}: {point['ok']}/{point['requests']} ok, "
                      f"{point['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
        return {"url": url, "registered_adapters": len(names), "config": _config_of(args), "points": points}


def _config_of(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "key"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown(report: dict) -> str:
    lines = [
        "| adapters | rate | ok/sent | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | errors "
        "| adapter counters |",
        "|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for p in report["points"]:
        ttft, itl = ("/".join(_ms(p[kind][f"p{q}"]) for q in PERCENTILES) for kind in ("ttft_s", "itl_s"))
        counters = ", ".join(  # counts only; load seconds stay in the JSON
            f"{k.removeprefix(METRIC_PREFIX)} +{v:g}" for k, v in p["adapter_counters"].items()
            if v and k.split("{")[0].endswith("_total")
        )
        lines.append(
            f"| {p['adapters_in_use']} | {p['rate'] or 'closed'} | {p['ok']}/{p['requests']} "
            f"| {p['requests_per_s']:.2f} | {p['output_tokens_per_s']:.1f} | {ttft} | {itl} "
            f"| {p['errors'] or '-'} | {counters or '-'} |"
        )
    return "\n".join(lines)


def failures(report: dict) -> list[str]:
    """What makes a smoke run fail: any failed request, or a point that streamed no token at all."""
    problems = []
    for p in report["points"]:
        if p["errors"]:
            problems.append(f"adapters={p['adapters_in_use']}: failed requests {p['errors']}: {p['first_errors']}")
        if p["output_tokens"] == 0:
            problems.append(f"adapters={p['adapters_in_use']}: no tokens came back")
    return problems


def csv_of(kind: type):
    return lambda text: [kind(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="ARGS", help="start `loraplex serve ARGS` on a free port, stop it after")
    parser.add_argument("--key", help="Bearer key (an admin key when uploading)")
    parser.add_argument("--adapters-dir", type=Path, help="PEFT directories (bench/random_adapters.py writes them)")
    parser.add_argument("--upload", action="store_true", help="upload --adapters-dir first, named after the dirs")
    parser.add_argument("--adapters-in-use", type=csv_of(int), default=[0],
                        help="distinct adapters the requests spread over, one point each; 0: base model only")
    parser.add_argument("--rate", type=csv_of(float), default=[0.0], help="requests/s (Poisson), 0: closed loop")
    parser.add_argument("--concurrency", type=int, default=16, help="clients / most requests in flight")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per point")
    parser.add_argument("--zipf", type=float, default=0.0, help="adapter popularity exponent; 0: uniform")
    parser.add_argument("--prompt-len", type=parse_range, default=(64, 256), help="bytes, N or MIN:MAX")
    parser.add_argument("--output-len", type=parse_range, default=(32, 128), help="max_new_tokens, N or MIN:MAX")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the full report as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="a few short requests; exit 1 if any failed or no token came back")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.upload and args.adapters_dir is None:
        parser.error("--upload needs --adapters-dir")
    if args.smoke:
        # a stalled server fails the run within seconds instead of holding CI for the default timeout
        args.concurrency, args.duration, args.prompt_len, args.output_len = 2, 2.0, (8, 16), (4, 8)
        args.timeout = min(args.timeout, 20.0)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that the server we started is stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    process, url = start_server(args.serve) if args.serve else (None, args.url)
    try:
        report = asyncio.run(bench(args, url))
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
