"""A step's grammar masks (server/engine/constraints.py's MaskFiller): filled on the engine thread alone (serial)
against with threads beside it (threads: at every step of two rows or more, a request's choices being one; auto:
where the rows' estimates say it pays, as the engine fills them), for N constrained rows of a cheap grammar (json:
JSON mode) and of a costly one (words: a regex of up to 100 words, whose masks cost 1-2 ms on SmolLM2's tokenizer).
Vocabularies: the embedded SmolLM2's (49,152 tokens), and wide128k: those and 79,104 more, each two of SmolLM2's first
2,000 words, 128,256 in all (Llama 3's size; a byte-level tokenizer of that size, its words all " w<digits>", gives
masks cheaper than SmolLM2's). Each row is a request of its own (--choices: the n=N choices of one request, copies of
one matcher that share its lexer, as the server makes them), at its own place along a valid answer; every step fills
the rows' masks, then advances each by its answer's next token. Figures: ms a step (the masks of every row), the
least of --rounds rounds that alternate the ways (another process's burst of work lands in one round). --busy keeps a
Python thread busy beside, as an event loop under load; --executor times llguidance's own LLExecutor on the rows too.

    python3 bench/masks.py                  # the engine's threads, min(cpu_count, 8): ~50 s on 2 cores
    python3 bench/masks.py --rows 4,16,32 --threads 16 --executor
    python3 bench/masks.py --vocab smollm2 --grammars words --choices

CPU figures: relative, on a machine shared with other work; the first line says its cpu_count and load.
"""

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from loraplex.embedded import embedded_checkpoint
from server.engine.constraints import MaskFiller, StepMasks, mask_words
from server.grammar import JSON_OBJECT, CompiledGrammar, GrammarMatcher, Grammars, GrammarSpec

WIDE_VOCAB = 128_256
WIDE_WORDS = 2000
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches at night "
PARTS = [{"id": i, "label": f"part {i}", "weight": i * 1.5} for i in range(4)]
GRAMMARS = {  # name -> (spec, an answer it takes)
    "json": (JSON_OBJECT, json.dumps({"name": "widget", "ok": True, "parts": PARTS}, separators=(",", ":"))),
    "words": (GrammarSpec.regex(r"(\w+\s?){1,100}"), WORDS * 2),
}


@dataclass
class Rows:
    """A step's constrained rows, each at its own place along the answer; a row that ends it starts it again."""

    grammars: list[CompiledGrammar]  # each row's
    answer: list[int]
    matchers: list[GrammarMatcher]
    places: list[int]

    @classmethod
    def start(cls, grammars: list[CompiledGrammar], answer: list[int], vocab: int) -> "Rows":
        rows = cls(grammars, answer, [g.matcher() for g in grammars], [0] * len(grammars))
        mask = torch.zeros(mask_words(vocab), dtype=torch.int32)
        for r, matcher in enumerate(rows.matchers):
            for _ in range(r * len(answer) // len(grammars)):
                matcher.fill_mask(mask)  # as in generation: a matcher taken far unmasked hit llguidance's limits
                rows.advance(r)
        return rows

    def advance(self, r: int) -> None:
        self.matchers[r].advance(self.answer[self.places[r]])
        self.places[r] += 1
        if self.places[r] == len(self.answer):
            self.matchers[r], self.places[r] = self.grammars[r].matcher(), 0


def step_ms(fill: Callable[[list[GrammarMatcher]], None], rows: Rows, steps: int) -> float:
    """Mean ms of `fill` over the rows' next `steps` steps, after two untimed (a filler's estimates start there)."""
    spent = 0.0
    for step in range(steps + 2):
        start = time.perf_counter()
        fill(rows.matchers)
        if step >= 2:
            spent += time.perf_counter() - start
        for r in range(len(rows.matchers)):
            rows.advance(r)
    return spent / steps * 1000


def wide_tokenizer(small: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """`small`'s tokens, at their ids, then tokens each of two of its first WIDE_WORDS longer than a character, up to
    WIDE_VOCAB tokens."""
    vocab = dict(small.get_vocab())  # byte-level strings, as the tokenizer spells them
    special = set(small.all_special_tokens)
    words = [w for w, _ in sorted(vocab.items(), key=lambda item: item[1]) if w not in special and len(w) > 1]
    for first, second in itertools.product(words[:WIDE_WORDS], repeat=2):
        if len(vocab) == WIDE_VOCAB:
            break
        vocab.setdefault(first + second, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(sorted(special))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=small.eos_token)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rows", default="1,4,8,16", help="constrained rows of a step, comma-separated")
    parser.add_argument("--threads", type=int, help="threads filling masks, the engine's among them (default: the "
                        "engine's, min(cpu_count, 8))")  # fmt: skip
    parser.add_argument("--grammars", default=",".join(GRAMMARS), help="comma-separated, of: json, words")
    parser.add_argument("--vocab", default="smollm2,wide128k", help="comma-separated, of: smollm2, wide128k")
    parser.add_argument("--choices", action="store_true", help="the rows are the choices of one request")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="a Python thread busy beside, as a loaded event loop")
    parser.add_argument("--executor", action="store_true", help="time llguidance's LLExecutor on the rows too")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    parser.add_argument("--out", type=Path, help="where to write the JSON results too")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a mask row is one small tensor: torch's threads would only take cores
    counts = [int(n) for n in args.rows.split(",")]
    ways = {
        "serial": MaskFiller(1),
        "threads": MaskFiller(args.threads, min_saving_s=0.0),
        "auto": MaskFiller(args.threads),
    }
    threads = ways["threads"].threads
    print(f"cpu_count {os.cpu_count()}, threads {threads}, load average {os.getloadavg()[0]:.1f}, rows: "
          f"{'choices of one request' if args.choices else 'requests'}, busy thread: {'yes' if args.busy else 'no'}",
          flush=True)  # fmt: skip
    small = AutoTokenizer.from_pretrained(embedded_checkpoint(args.cache_dir))
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass

    if args.busy:
        threading.Thread(target=busy, daemon=True).start()
    results: list[dict[str, object]] = []
    try:
        for vocab_name in args.vocab.split(","):
            tokenizer = {"smollm2": small, "wide128k": wide_tokenizer(small)}[vocab_name]
            compiler = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
            try:
                for grammar_name in args.grammars.split(","):
                    spec, text = GRAMMARS[grammar_name]
                    answer = small(text, add_special_tokens=False)["input_ids"]  # the same ids in wide128k
                    for count in counts:
                        build = partial(requests, compiler, spec, count, args.choices)
                        figures = measure(args, ways, build, answer, len(tokenizer))
                        print(f"{vocab_name} {grammar_name} {count} rows: ms a step: "
                              + ", ".join(f"{name} {ms:.3f}" for name, ms in figures.items())
                              + f" (threads: {figures['serial'] / figures['threads']:.2f}x serial's speed)",
                              flush=True)  # fmt: skip
                        results.append({"vocab": vocab_name, "grammar": grammar_name, "rows": count, **figures})
            finally:
                compiler.close()
    finally:
        stop.set()
        for filler in ways.values():
            filler.close()
    if args.out:
        args.out.write_text(json.dumps({"cpu_count": os.cpu_count(), "threads": threads, "results": results}))


def requests(compiler: Grammars, spec: GrammarSpec, count: int, choices: bool) -> list[CompiledGrammar]:
    """Each row's grammar, as the server compiles it for a request: `count` requests, or one of `count` choices."""
    if choices:
        return [asyncio.run(compiler.get(spec))] * count
    return [asyncio.run(compiler.get(spec)) for _ in range(count)]


def measure(
    args: argparse.Namespace,
    ways: dict[str, MaskFiller],
    build: Callable[[], list[CompiledGrammar]],
    answer: list[int],
    vocab: int,
) -> dict[str, float]:
    """The least ms a step of each way over the rounds, each round's rows built afresh: a matcher's copies share its
    lexer, whose limits count what it built for every copy, so rows used again would end at a limit."""
    fills: dict[str, Callable[[list[GrammarMatcher]], None]] = {
        name: (lambda matchers, filler=filler: check(filler.fill(matchers, vocab))) for name, filler in ways.items()
    }
    if args.executor:
        import llguidance
        import llguidance.torch

        executor = llguidance.LLExecutor(ways["threads"].threads)

        def together(matchers: list[GrammarMatcher]) -> None:
            bits = torch.zeros(len(matchers), mask_words(vocab), dtype=torch.int32)
            pairs = [(m._matcher, j) for j, m in enumerate(matchers)]  # llguidance's own matchers
            llguidance.torch.fill_next_token_bitmask_par(executor, pairs, bits)

        fills["executor"] = together
    best = dict.fromkeys(fills, float("inf"))
    for _ in range(args.rounds):
        for name, fill in fills.items():
            best[name] = min(best[name], step_ms(fill, Rows.start(build(), answer, vocab), args.steps))
    return best


def check(masks: StepMasks | None) -> None:
    if masks is not None and masks.failed:
        raise SystemExit(f"a row failed: {masks.failed}")


if __name__ == "__main__":
    main()
