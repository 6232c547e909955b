"""How long the engine's decode steps take while the tokenizer works beside it, on the server's threads (as
before) and in the tokenizer's worker processes (server/tokenizer_workers.py): the embedded model on the CPU,
--rows requests decoding, and two threads (the tokenizer pool's) doing one kind of job without pause, as one
client flooding the server with such requests keeps them busy. Jobs: chats of --messages empty messages, chats of
8, the prompt "hi" (what /tokenize of "hi" costs), and decoding --ids ids (/detokenize; 1,000 by default).

    python3 bench/tokenizer_flood.py --out tokenizer_flood.json

CPU figures are relative: on a machine of two cores the flood's processes still take CPU from the engine.
"""

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.tokenizer_pool import THREADS
from server.tokenizer_workers import TokenizerWorkers


def step_ms(engine: Engine, rows: int, tokens: int) -> float:
    """Mean ms of the decode steps of `rows` requests generating `tokens` tokens each."""
    for i in range(rows):
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        engine.submit(GenerationRequest([5, 6, 7, 8 + i], params), lambda event: None)
    engine.step()  # the prefill
    start, steps = time.perf_counter(), 0
    while engine.step():
        steps += 1
    return (time.perf_counter() - start) / steps * 1000


def while_flooded(template: Callable[[], object], measure: Callable[[], float]) -> float:
    """measure() while THREADS threads call template() without pause."""
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            template()

    threads = [threading.Thread(target=flood) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        return measure()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rows", type=int, default=4, help="requests decoding")
    parser.add_argument("--tokens", type=int, default=24, help="tokens each generates")
    parser.add_argument("--messages", type=int, default=1024, help="empty messages in each long chat of the flood")
    parser.add_argument("--ids", type=int, default=1000, help="ids in each decoding job of the flood")
    parser.add_argument("--jobs", help="the kinds of job to flood with, comma-separated (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine thread's own: the flood's threads have the other cores
    # the server's switch interval for its process (Runtime.start): the engine's thread waits for the interpreter
    # lock behind the flood's threads up to this long each time it takes it back
    sys.setswitchinterval(Settings.model_fields["switch_interval_ms"].default / 1000)
    base = load_base_model(None, cache_dir=args.cache_dir, device="cpu")
    tokenizer = base.tokenizer
    config = EngineConfig(max_batch_size=args.rows, max_active_adapters=1, max_lora_rank=8, max_seq_len=256,
                          max_prefill_tokens=64)  # fmt: skip
    engine = Engine(base.model, tokenizer, config)
    workers = TokenizerWorkers(tokenizer, processes=THREADS)
    long_chat, short_chat = ([{"role": "user", "content": ""}] * n for n in (args.messages, 8))
    ids = [i % 30_000 + 100 for i in range(args.ids)]

    def chat(messages: list[dict[str, str]]) -> object:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    jobs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {  # (on the threads, in the workers)
        f"chat_of_{args.messages}": (lambda: chat(long_chat), lambda: workers.chat(long_chat)),
        "chat_of_8": (lambda: chat(short_chat), lambda: workers.chat(short_chat)),
        "encode_hi": (lambda: tokenizer("hi")["input_ids"], lambda: workers.encode("hi")),
        f"decode_{args.ids}": (lambda: tokenizer.decode(ids), lambda: workers.decode(ids)),
    }

    def measure() -> float:
        return step_ms(engine, args.rows, args.tokens)

    results: dict[str, float] = {}

    def record(name: str, ms: float) -> None:
        results[name] = ms
        print(f"{name}: {ms:.1f} ms a decode step of {args.rows} rows", flush=True)

    try:
        step_ms(engine, args.rows, 4)  # warm-up
        record("alone_ms", measure())
        for name in args.jobs.split(",") if args.jobs else jobs:
            on_threads, in_workers = jobs[name]
            record(f"{name}_on_threads_ms", while_flooded(on_threads, measure))
            record(f"{name}_in_processes_ms", while_flooded(in_workers, measure))
    finally:
        workers.close()
    args.out.write_text(json.dumps({"device": "cpu", "rows": args.rows, "messages": args.messages, **results}))


if __name__ == "__main__":
    main()
