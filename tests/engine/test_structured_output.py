"""Structured output in the batched engine: constrained rows (JSON schema, regex; base model and adapters,
greedy and sampled) always parse and validate, in the same batch as unconstrained rows that still equal PEFT;
a failing matcher ends its request alone; grammars are bounded, cached and refused with a readable reason."""

import asyncio
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from enginekit import Collector, final_logprobs, greedy, make_engine, reference_generate, request, run_to_end

from loraplex.synthetic import BYTE_VOCAB
from server.client_share import current_client, prefix_salt
from server.engine import SamplingParams
from server.engine.constraints import MaskFiller, mask_words
from server.engine.errors import GrammarDeadEnd, GrammarFailed
from server.grammar import (
    CHECK_MEMORY_BYTES,
    COMPILE_THREADS,
    JSON_OBJECT,
    MAX_GRAMMAR_CHARS,
    MAX_SCHEMA_DEPTH,
    CompiledGrammar,
    GrammarBusy,
    GrammarMatcher,
    Grammars,
    GrammarSpec,
    InvalidGrammar,
    _chars_past,
    _failure,
    _PlainTextTokenizer,
)

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "ok", "size", "tags"],
    "additionalProperties": False,
}
PATTERN = r"(yes|no), [0-9]{1,3}( [a-z]{2,4}){0,2}\."


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])


def compiled(grammars: Grammars, spec: GrammarSpec):
    return asyncio.run(grammars.get(spec))


def assert_takes(grammar: CompiledGrammar, tokenizer, text: str, refused: str | None = None) -> None:
    """A fresh matcher of `grammar` takes `text`'s tokens to a finished state, and refuses `refused`'s first token."""
    matcher = grammar.matcher()
    for token in tokenizer(text)["input_ids"]:
        matcher.advance(token)
    assert matcher.is_finished()
    if refused is not None:
        with pytest.raises(ValueError):
            grammar.matcher().advance(tokenizer(refused)["input_ids"][0])


def text_of(sink: Collector, tokenizer, request_id: str) -> str:
    return tokenizer.decode(sink.tokens(request_id), skip_special_tokens=True)


def test_constrained_rows_validate_beside_unconstrained_rows_equal_to_peft(family_setup, tokenizer, grammars) -> None:
    base, adapters = family_setup("llama")
    schema, regex = compiled(grammars, GrammarSpec.json_schema(SCHEMA)), compiled(grammars, GrammarSpec.regex(PATTERN))
    sampled = SamplingParams(max_new_tokens=96, temperature=1.0, seed=7)
    plan = [  # (adapter, grammar, sampling): constrained and free rows interleaved, base and adapters
        (None, schema, greedy(96)),
        (adapters[0], None, greedy(NEW_TOKENS)),
        (adapters[1], schema, greedy(96)),
        (None, None, greedy(NEW_TOKENS)),
        (adapters[2], regex, greedy(48)),
        (None, regex, sampled),
        (adapters[3], schema, sampled),
        (adapters[1], regex, SamplingParams(max_new_tokens=48, seed=3)),
    ]
    engine = make_engine(base, tokenizer, max_seq_len=160)
    sink = Collector()
    prompt = tokenizer("answer in the format asked")["input_ids"]
    for i, (adapter, grammar, sampling) in enumerate(plan):
        req = request(prompt, sampling, adapter, f"r{i}")
        req.grammar = grammar.matcher() if grammar else None
        engine.submit(req, sink)
    run_to_end(engine)
    for i, (adapter, grammar, _) in enumerate(plan):
        rid = f"r{i}"
        if grammar is None:
            assert sink.tokens(rid) == reference_generate(base, adapter, prompt, NEW_TOKENS)[0]
            continue
        assert sink.finish(rid) == "stop", text_of(sink, tokenizer, rid)
        text = text_of(sink, tokenizer, rid)
        if grammar is regex:
            assert re.fullmatch(PATTERN, text), text
        else:
            jsonschema.validate(json.loads(text), SCHEMA)


def test_properties_are_generated_in_their_declared_order(tokenizer, grammars) -> None:
    """As OpenAI and vLLM generate them: a schema of "reasoning" then "answer" asks for the reasoning first."""
    properties = {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}}
    for names in (["zeta", "alpha"], ["alpha", "zeta"]):
        schema = {"type": "object", "properties": {name: properties[name] for name in names}, "required": names,
                  "additionalProperties": False}  # fmt: skip
        grammar = compiled(grammars, GrammarSpec.json_schema(schema))
        assert_takes(grammar, tokenizer, f'{{"{names[0]}":1,"{names[1]}":2}}')
        matcher = grammar.matcher()
        for token in tokenizer('{"')["input_ids"]:  # the byte tokenizer: a token a character
            matcher.advance(token)
        with pytest.raises(ValueError):
            matcher.advance(tokenizer(names[1])["input_ids"][0])


def test_json_object_takes_any_object_and_nothing_else(tokenizer, grammars) -> None:
    assert_takes(compiled(grammars, JSON_OBJECT), tokenizer, '{"a":[1,{"b":null}],"c":"x"}', refused="[")


@pytest.mark.parametrize("pattern", [r"<\|eos\|>", r"a<\|bos\|>b", r"<\|pad\|><\|eos\|>"])
def test_a_grammar_spelling_a_special_tokens_text_is_written_in_plain_tokens(tokenizer, grammars, pattern) -> None:
    """The text of a special token, when a grammar forces it, is plain text: every token the mask allows is one the
    matcher takes (the special token itself, which the mask once offered, made the matcher refuse it)."""
    matcher = compiled(grammars, GrammarSpec.regex(pattern)).matcher()
    row = torch.zeros((BYTE_VOCAB + 31) // 32, dtype=torch.int32)
    out: list[int] = []
    while not matcher.is_finished():
        assert len(out) < 32, tokenizer.decode(out)
        matcher.fill_mask(row)
        bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:BYTE_VOCAB]
        allowed = bits.nonzero()[:, 0].tolist()
        # the end of the sequence, once the text is complete, is the only special token a mask may allow
        assert set(allowed) & set(tokenizer.all_special_ids) <= {tokenizer.eos_token_id}, tokenizer.decode(out)
        out.append(allowed[-1])  # the forced text's token (above the special ids), or the end alone
        matcher.advance(out[-1])
    assert re.fullmatch(pattern, tokenizer.decode(out, skip_special_tokens=True))


class Failing:
    """A matcher that allows every token, then fails at its `at`-th mask (or refuses every token)."""

    family = None

    def __init__(self, at: int, allow_none: bool = False, refuse: bool = False) -> None:
        self.at, self.allow_none, self.refuse, self.calls = at, allow_none, refuse, 0

    def fill_mask(self, row: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == self.at:
            if not self.allow_none:
                raise RuntimeError("matcher broke")
            return  # the row stays all zeros: no token allowed
        row.fill_(-1)

    def advance(self, token: int) -> None:
        if self.refuse:
            raise ValueError("no")

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        (Failing(3), GrammarFailed),
        (Failing(2, allow_none=True), GrammarDeadEnd),
        (Failing(1, refuse=True), GrammarFailed),
    ],
    ids=["raises", "allows-none", "refuses"],
)
def test_a_failing_matcher_ends_its_request_alone(family_setup, tokenizer, failing, error) -> None:
    """A matcher that breaks or refuses the token its mask allowed is the server's fault (GrammarFailed, 5xx); one
    that allows no token is a grammar that cannot go on (GrammarDeadEnd, 4xx). Either ends its request alone."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("hello world")["input_ids"]
    broken = request(prompt, greedy(NEW_TOKENS), adapters[0], "broken")
    broken.grammar = failing
    engine.submit(broken, sink)
    for i, adapter in enumerate([None, adapters[0]]):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    run_to_end(engine)
    assert sink.finish("broken") == "error"
    assert type(sink.events["broken"][-1].error) is error
    assert len(sink.tokens("broken")) == (0 if failing.refuse else failing.at - 1)
    for i, adapter in enumerate([None, adapters[0]]):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, NEW_TOKENS)[0]
    assert engine.num_running == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_grammar_that_allows_only_tokens_min_tokens_holds_back_is_a_dead_end(
    family_setup, tokenizer, grammars, temperature
) -> None:
    """A grammar whose next token can only be one of the request's stop tokens (here "a" of the regex "ab", sent as a
    stop_token_ids token) while min_tokens holds them back: the request ends alone as the grammar's dead end (a client
    error, saying min_tokens), not as logits that are not finite (a server fault: every token at -inf drew NaN). The
    same grammar with the stop token past min_tokens answers "a" and stops there; the rows beside answer as alone."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("hello world")["input_ids"]
    grammar = compiled(grammars, GrammarSpec.regex("ab"))
    (a,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    for rid, min_tokens in (("held", 1), ("free", 0)):
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=temperature, seed=1, min_tokens=min_tokens,
                                  stop_token_ids=frozenset({a}))  # fmt: skip
        constrained = request(prompt, sampling, None, rid)
        constrained.grammar = grammar.matcher()
        engine.submit(constrained, sink)
    for i, adapter in enumerate([None, adapters[0]]):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    run_to_end(engine)
    error = sink.events["held"][-1].error
    assert sink.finish("held") == "error" and type(error) is GrammarDeadEnd, error
    assert "min_tokens" in str(error) and sink.tokens("held") == []
    assert sink.tokens("free") == [a] and sink.finish("free") == "stop"
    for i, adapter in enumerate([None, adapters[0]]):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, NEW_TOKENS)[0]
    assert engine.num_running == 0


def test_a_grammar_complete_before_min_tokens_ends_the_answer_there(family_setup, tokenizer, grammars) -> None:
    """min_tokens holds back the end of sequence, but once the grammar is complete nothing else may follow: the
    answer ends there ("stop", its text the grammar's whole match), short of min_tokens, and not as an error."""
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("hello world")["input_ids"]
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS - 1)  # EOS held back
    constrained = request(prompt, sampling, None, "complete")
    constrained.grammar = compiled(grammars, GrammarSpec.regex("ab")).matcher()
    engine.submit(constrained, sink)
    run_to_end(engine)
    assert sink.finish("complete") == "stop"
    assert tokenizer.decode(sink.tokens("complete")) == "ab" and len(sink.tokens("complete")) < NEW_TOKENS - 1


def test_a_grammar_fixing_a_long_run_has_none_of_it_tokenized_and_the_rows_beside_answer_as_alone(
    family_setup, tokenizer, grammars, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a grammar fixes its next bytes for a long way, llguidance forced them: at every mask it had the whole run
    tokenized, on the engine thread, through the tokenizer's Python (the interpreter lock held), though a mask
    allows one token. 10 characters of regex (a{100000}) cost 33 ms a token of each such row on SmolLM2's tokenizer,
    and every other request's step waited. With forcing off nothing is tokenized at a mask; the answer is the run's,
    and the rows beside answer as alone."""
    tokenized: list[int] = []  # the tokens of each text tokenized
    tokenize = _PlainTextTokenizer.__call__

    def counted(self: _PlainTextTokenizer, text: str | bytes) -> list[int]:
        ids = tokenize(self, text)
        tokenized.append(len(ids))
        return ids

    monkeypatch.setattr(_PlainTextTokenizer, "__call__", counted)
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompt = tokenizer("hello world")["input_ids"]
    grammar = compiled(grammars, GrammarSpec.regex("a{50000}"))
    for i in range(2):
        constrained = request(prompt, greedy(NEW_TOKENS), None, f"c{i}")
        constrained.grammar = grammar.matcher()
        engine.submit(constrained, sink)
    for i, adapter in enumerate([None, adapters[0]]):
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapter, f"r{i}"), sink)
    tokenized.clear()
    run_to_end(engine)
    for i in range(2):
        assert text_of(sink, tokenizer, f"c{i}") == "a" * NEW_TOKENS
    for i, adapter in enumerate([None, adapters[0]]):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, NEW_TOKENS)[0]
    assert not tokenized, tokenized  # the run is 50,000 tokens of the byte vocabulary


# After a free choice (a boolean), a 16 KB const in 100 arrays of 100: 160 MB of fixed bytes
FIXING_160_MB = """
import asyncio, torch
from loraplex.synthetic import byte_tokenizer
from server.engine.constraints import mask_words
from server.grammar import Grammars, GrammarSpec

tokenizer = byte_tokenizer()
grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
rows = {"type": "array", "minItems": 100, "maxItems": 100, "items": {"const": "x" * 16000}}
table = {"type": "array", "minItems": 100, "maxItems": 100, "items": rows}
schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": table}, "required": ["a", "b"]}

async def main():
    matcher = (await grammars.get(GrammarSpec.json_schema(schema))).matcher()
    mask = torch.zeros(mask_words(len(tokenizer)), dtype=torch.int32)
    for token in tokenizer.encode('{"a":true,"b":[["xx', add_special_tokens=False):
        matcher.fill_mask(mask)
        matcher.advance(token)
    # this process's own peak (VmHWM: getrusage's also holds the forking parent's, kept across exec), in MB
    print(next(int(line.split()[1]) >> 10 for line in open("/proc/self/status") if line.startswith("VmHWM:")))

asyncio.run(main())
"""


def test_a_grammar_fixing_megabytes_after_a_free_choice_costs_a_mask_what_any_does() -> None:
    """llguidance computed all the bytes a grammar fixes ahead at the mask (forcing): 160 MB fixed after a boolean
    took 6 s and 3 GB of memory on the engine thread at the mask after the boolean, which no check before the answer
    sees. Forcing off, the process that compiles the grammar and makes its masks peaks at a few hundred MB, most of it
    Python and torch (3.2 GB before)."""
    peak = subprocess.run([sys.executable, "-c", FIXING_160_MB], capture_output=True, text=True, check=True, cwd=REPO)
    assert int(peak.stdout) < 1000, f"{peak.stdout.strip()} MB at the peak"


class FewBytes:
    """A tokenizer as llguidance reads it (TokenizerWrapper) whose tokens spell ASCII letters only, as a vocabulary
    without byte tokens may: a grammar can ask for a character that no token spells."""

    eos_token_id, bos_token_id, special_token_ids = 0, None, [0]
    tokens = [b"<eos>"] + [bytes([c]) for c in range(97, 123)]

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        return [self.tokens.index(bytes([b])) for b in data if bytes([b]) in self.tokens]


def test_a_grammar_no_token_can_continue_is_a_dead_end_and_a_refused_token_a_mismatch() -> None:
    """llguidance allows "b" after "a" for (ab€|abé), then no token spells what must follow: that is the grammar's
    dead end (GrammarDeadEnd, a client error). A token refused although allowed would be a mismatch (ValueError)."""
    import llguidance

    few = FewBytes()
    vocab = len(few.tokens)
    ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(few), n_vocab=vocab, eos_token=[0])
    grammar = llguidance.LLMatcher.grammar_from_regex("(ab€|abé)")

    def matcher() -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0))

    row = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    dead = matcher()
    for letter in "ab":
        dead.fill_mask(row)
        dead.advance(few.tokens.index(letter.encode()))
    with pytest.raises(GrammarDeadEnd, match="no token of this model can continue"):
        dead.fill_mask(row)
    with pytest.raises(ValueError, match="doesn't satisfy the grammar"):
        matcher().advance(few.tokens.index(b"z"))


def test_a_parser_limit_is_the_grammars_fault_at_compile_and_at_any_token(grammars) -> None:
    """600 optional properties (a 17 KB schema, within the caps): taking "{" makes a parser row past llguidance's
    limit. The compile takes a first token, so the client hears it before generation (InvalidGrammar); a limit hit
    later is a dead end (a client error) in llguidance's capitalised spelling too, not a server fault."""
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(600)},
              "additionalProperties": False}  # fmt: skip
    with pytest.raises(InvalidGrammar, match="needs more work here than its limits allow"):
        compiled(grammars, GrammarSpec.json_schema(schema))
    for spelling in ("Parser Error: Current row has 2399 items; max is 2000", "lexer error: too many states"):
        assert isinstance(_failure(spelling), GrammarDeadEnd)
    assert type(_failure('Parser Error: token "z" doesn\'t satisfy the grammar')) is ValueError  # a mismatch


def test_a_matcher_panic_reaches_the_client_without_its_backtrace() -> None:
    """llguidance's panics go on with a backtrace naming its build paths: the request's error stops before it (the
    operator's log has it all); a dead end is still told apart by its first line."""
    for backtrace in ("\nstack backtrace:\n   0: /build/llg/src/x.rs", "\n\nStack backtrace:\n   0: /build/x.rs"):
        error = _failure(f"panic: index out of bounds\nat the 3rd token{backtrace}")
        assert isinstance(error, ValueError) and str(error) == "panic: index out of bounds\nat the 3rd token"
        assert isinstance(_failure(f"NoExtensionBias{backtrace}"), GrammarDeadEnd)


def test_masks_touch_constrained_rows_only() -> None:
    filler = MaskFiller()
    assert filler.fill([None, None], 40) is None  # no constrained row: no work, no tensors
    only_5 = Failing(0)
    only_5.fill_mask = lambda row: row.copy_(torch.tensor([1 << 5, 0], dtype=torch.int32))  # type: ignore[method-assign]
    masks = filler.fill([None, only_5, None], 40)
    assert masks is not None and masks.rows == [1] and not masks.failed
    logits = torch.randn(3, 40)
    logits[2, 0] = float("inf")  # a hostile value in another row stays in that row
    out = final_logprobs(logits, [SamplingParams()] * 3, [None] * 3, masks.allowed(40, logits.device))
    assert out[1].argmax() == 5 and torch.isinf(out[1]).sum() == 39 and out[1, 5] == 0
    reference = final_logprobs(logits, [SamplingParams()] * 3, [None] * 3)
    assert torch.equal(out[[0, 2]].nan_to_num(), reference[[0, 2]].nan_to_num())


def test_bad_grammars_are_refused_with_the_reason(grammars) -> None:
    with pytest.raises(InvalidGrammar, match="Invalid type: foo"):
        compiled(grammars, GrammarSpec.json_schema({"type": "foo"}))
    with pytest.raises(InvalidGrammar, match="backreferences are not supported"):
        compiled(grammars, GrammarSpec.regex(r"(a)\1"))
    for unfinished in ("x\\", "x\\\\\\"):  # llguidance dropped a lone last backslash: r"x\" ran as "x"
        with pytest.raises(InvalidGrammar, match="ends in a lone backslash"):
            GrammarSpec.regex(unfinished)
    assert GrammarSpec.regex("x\\\\").text == "x\\\\"  # an escaped backslash is one
    with pytest.raises(InvalidGrammar, match="not valid JSON"):
        GrammarSpec.json_schema("{not json")
    with pytest.raises(InvalidGrammar, match=f"at most {MAX_GRAMMAR_CHARS}"):
        GrammarSpec.regex("a" * (MAX_GRAMMAR_CHARS + 1))
    with pytest.raises(InvalidGrammar, match=f"at most {MAX_GRAMMAR_CHARS}"):
        GrammarSpec.json_schema({"enum": ["x" * MAX_GRAMMAR_CHARS]})
    # refused by a count that stops past the limit, before any walk of the whole schema
    with pytest.raises(InvalidGrammar, match=f"over {MAX_GRAMMAR_CHARS}"):
        GrammarSpec.json_schema({"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(10**5)}})
    deep: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidGrammar, match="nests"):
        GrammarSpec.json_schema(deep)
    # llguidance clamped these to the one integer 2**63 - 1, an answer outside the schema, whether the bounds sit
    # beside the integer type or reach it through allOf or $ref (the negative ones crashed its compiler)
    huge = {"minimum": 2**64, "maximum": 2**64 + 5}
    for integer in (
        {"type": ["integer", "null"], **huge},
        {"allOf": [{"type": "integer"}, huge]},
        {"type": "integer", "allOf": [huge]},
        {"$defs": {"i": {"type": "integer"}}, "allOf": [{"$ref": "#/$defs/i"}, huge]},
        {"allOf": [{"type": "integer"}, {"minimum": -(2**64) - 5, "maximum": -(2**64)}]},
    ):
        with pytest.raises(InvalidGrammar, match="outside 64-bit integers"):
            GrammarSpec.json_schema({"type": "object", "properties": {"n": integer}})
    compiled(grammars, GrammarSpec.json_schema({"type": "integer", "minimum": -(2**62), "maximum": 2**62}))


def pattern_properties(count: int, tag: str = "") -> GrammarSpec:
    """A schema whose translation no llguidance limit bounds: `count` patternProperties, checked pairwise for
    overlaps (a minute for 500)."""
    return GrammarSpec.json_schema(
        {"type": "object", "patternProperties": {f"^p{i}_{tag}[a-z]*$": {} for i in range(count)}}
    )


def allowed_tokens(row: torch.Tensor) -> list[int]:
    """The token ids a mask row [W] int32 allows."""
    return ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().nonzero().flatten().tolist()


def test_a_request_that_exhausts_its_lexer_breaks_no_other_request_on_that_grammar(smollm2) -> None:
    """On the embedded model's tokenizer, a request of a word-list regex steered onto tokens that run its lexer past
    llguidance's limits ends alone (a dead end). Before, every request's matcher was a copy of one cached matcher, and
    copies share their lexer, which stays in error: the honest request running beside it failed at its next token,
    and every later request on that grammar, from any client, at its first."""
    grammars = Grammars(smollm2, len(smollm2), [smollm2.eos_token_id])
    spec = GrammarSpec.regex(r"(\w+\s?){1,1000}")
    row = torch.zeros(mask_words(len(smollm2)), dtype=torch.int32)
    honest_text = smollm2("hello world and more", add_special_tokens=False)["input_ids"]

    def take(matcher: GrammarMatcher, tokens: list[int]) -> None:
        for token in tokens:
            matcher.fill_mask(row)
            assert token in allowed_tokens(row)
            matcher.advance(token)

    running = compiled(grammars, spec).matcher()
    take(running, honest_text[:2])
    hostile, rng = compiled(grammars, spec).matcher(), random.Random(1)
    with pytest.raises(GrammarDeadEnd, match="more work here than its limits allow"):
        for _ in range(200):  # a client's logit_bias can steer its output onto any tokens the mask allows
            hostile.fill_mask(row)
            hostile.advance(rng.choice([t for t in allowed_tokens(row) if t != smollm2.eos_token_id]))
    take(running, honest_text[2:])
    take(compiled(grammars, spec).matcher(), honest_text)
    grammars.close()


def test_compiles_are_cached_by_compact_text_and_bounded_in_time(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    compiles = []
    compile_once = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, spec: compiles.append(spec) or compile_once(self, spec))
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], capacity=2)
    schema = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    first = compiled(grammars, schema)
    same = compiled(grammars, GrammarSpec.json_schema('{"type": "object",  "properties": {"a": {"type": "integer"}}}'))
    assert compiles == [schema]  # whitespace does not matter
    assert same is not first  # each request has a matcher of its own, its lexer its own
    compiled(grammars, GrammarSpec.regex("a+"))
    compiled(grammars, GrammarSpec.regex("b+"))  # evicts the schema (least recently used)
    compiled(grammars, schema)
    assert compiles.count(schema) == 2
    # a pattern that backtracking matchers take exponential time on: a grammar, no backtracking
    matcher = compiled(grammars, GrammarSpec.regex(r"(a+)+$")).matcher()
    for token in tokenizer("a" * 40)["input_ids"]:
        matcher.advance(token)
    slow = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], timeout_s=0.4)
    with pytest.raises(InvalidGrammar, match="did not compile within"):
        compiled(slow, pattern_properties(500))
    grammars.close()
    slow.close()


def test_compiles_and_refusals_are_shared_only_under_one_salt(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile kept (or a refusal remembered) answers sooner, which would tell one client which schemas, patterns
    and choices another sent (measured on the tiny model over HTTP: 31 ms against 50 for a 40-property schema, and
    a remembered refusal answers at once where a slow schema takes its check's seconds): they are shared only under
    the salt the prefix cache's prompts are (an API key's digest, and a cache_salt), as they were between keys."""
    compiles = []
    compile_once = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, spec: compiles.append(spec) or compile_once(self, spec))
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    schema, bad = GrammarSpec.regex("(secret|words)"), GrammarSpec.regex("(")

    async def salted(salt: str | None, spec: GrammarSpec) -> CompiledGrammar | BaseException:
        prefix_salt.set(salt)  # in its own task, so in a context of its own
        try:
            return await grammars.get(spec)
        except InvalidGrammar as exc:
            return exc

    for salt in ("key:a", "key:b", "key:a/chat-1", None, "key:a"):
        for spec in (schema, bad):
            asyncio.run(salted(salt, spec))
    assert compiles == [schema, bad] * 4  # once under each salt; the last, key:a again, from what it kept
    grammars.close()


def test_one_clients_new_grammars_evict_its_own_compiles_not_anothers(
    tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full cache forgets the least recently used grammar of the client whose turns made the most: one client
    sending new grammars (here one pattern under a new cache_salt each time, as cheap to send) recycles its own
    entries, and another client's kept compile still answers at once. With plain LRU, `capacity` new grammars of
    one client evicted every other client's, each then paying its compile again (a slow schema: its check's seconds)."""
    compiles = []
    compile_once = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, spec: compiles.append(spec) or compile_once(self, spec))
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], capacity=3)
    honest, flood = GrammarSpec.regex(PATTERN), GrammarSpec.regex("(a|b)+")

    async def as_client(client: str, salt: str, spec: GrammarSpec) -> CompiledGrammar:
        current_client.set(client)  # in its own task, so in a context of its own
        prefix_salt.set(salt)
        return await grammars.get(spec)

    asyncio.run(as_client("honest", "key:honest", honest))
    for k in range(8):
        asyncio.run(as_client("flood", f"key:flood/{k}", flood))
    assert_takes(asyncio.run(as_client("honest", "key:honest", honest)), tokenizer, "no, 42 ab cd.")
    assert compiles == [honest] + [flood] * 8  # the honest grammar once: kept
    for k in (6, 7):  # the flood's two most recent are kept too
        asyncio.run(as_client("flood", f"key:flood/{k}", flood))
    assert len(compiles) == 9
    grammars.close()


def test_slow_grammars_cannot_starve_an_honest_one(tokenizer) -> None:
    """Schemas whose translation no llguidance limit bounds (patternProperties, checked pairwise for overlaps: a
    minute for 500) hold every compile thread; they are stopped at their deadline, and an honest grammar sent while
    they run compiles within its time and constrains correctly."""
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], timeout_s=4.0)
    slow = [pattern_properties(500, tag=str(k)) for k in range(COMPILE_THREADS)]

    async def send() -> tuple[list[BaseException | CompiledGrammar], CompiledGrammar]:
        hostile = [asyncio.create_task(grammars.get(spec)) for spec in slow]
        await asyncio.sleep(0.5)  # they run
        honest = await grammars.get(GrammarSpec.regex(PATTERN))
        return await asyncio.gather(*hostile, return_exceptions=True), honest

    refused, honest = asyncio.run(send())
    assert all(isinstance(r, InvalidGrammar) and "did not compile within" in str(r) for r in refused), refused
    assert_takes(honest, tokenizer, "no, 42 ab cd.", refused="maybe")
    grammars.close()


def test_a_flood_of_one_slow_grammar_costs_one_check(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests for a grammar already compiling wait for that compile, and a refused grammar sent again is refused
    at once: a client sending one slow schema many times holds one compile thread once, and an honest grammar sent
    meanwhile compiles (before, each copy held a thread for its check, and the honest one timed out in the queue)."""
    compiles = []
    compile_once = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, spec: compiles.append(spec) or compile_once(self, spec))
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], timeout_s=2.0)
    slow = pattern_properties(500)

    async def flood() -> tuple[list[BaseException | CompiledGrammar], CompiledGrammar]:
        hostile = [asyncio.create_task(grammars.get(slow)) for _ in range(4 * COMPILE_THREADS)]
        await asyncio.sleep(0.1)
        honest = await grammars.get(GrammarSpec.regex(PATTERN))
        return await asyncio.gather(*hostile, return_exceptions=True), honest

    refused, honest = asyncio.run(flood())
    assert all(isinstance(r, InvalidGrammar) and "did not compile within" in str(r) for r in refused), refused
    assert_takes(honest, tokenizer, "no, 42 ab cd.", refused="maybe")
    with pytest.raises(InvalidGrammar, match="did not compile within"):
        compiled(grammars, slow)  # sent again: the remembered refusal
    assert compiles == [slow, GrammarSpec.regex(PATTERN)]
    grammars.close()


class HeldCompiles:
    """Grammars whose compiles of regexes beginning "held" hold their thread until `release` is set (any other
    compile takes `own_s` first), recording the order compiles start in; `ask` gets a grammar as a client."""

    def __init__(self, tokenizer, monkeypatch: pytest.MonkeyPatch, timeout_s: float, own_s: float = 0.0) -> None:
        self.release, self.order = threading.Event(), []
        compile_now = Grammars._compile

        def held(grammars: Grammars, spec: GrammarSpec) -> CompiledGrammar:
            self.order.append(spec.text)
            if spec.text.startswith("held"):
                self.release.wait(10)
            else:
                time.sleep(own_s)
            return compile_now(grammars, spec)

        monkeypatch.setattr(Grammars, "_compile", held)
        self.grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], timeout_s=timeout_s)

    async def ask(self, client: str, spec: GrammarSpec) -> CompiledGrammar:
        current_client.set(client)  # in its own task, so in a context of its own
        return await self.grammars.get(spec)


def test_a_grammar_that_never_got_a_thread_is_busy_not_slow(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grammar whose deadline passes while every compile thread works on others' grammars hears 429 (retry), not
    that it is too slow; once the threads are free it compiles."""
    held = HeldCompiles(tokenizer, monkeypatch, timeout_s=1.0)
    grammars, release = held.grammars, held.release

    async def crowd() -> None:
        holding = [asyncio.create_task(grammars.get(GrammarSpec.regex(f"held{k}"))) for k in range(COMPILE_THREADS)]
        await asyncio.sleep(0.1)
        with pytest.raises(GrammarBusy, match="busy") as busy:
            await grammars.get(GrammarSpec.regex(PATTERN))
        assert busy.value.http_status == 429
        release.set()
        await asyncio.gather(*holding, return_exceptions=True)  # held past their own deadline: refused for time

    asyncio.run(crowd())
    assert_takes(compiled(grammars, GrammarSpec.regex(PATTERN)), tokenizer, "no, 42 ab cd.")
    grammars.close()


def test_a_grammar_that_got_a_thread_late_is_not_refused_as_slow(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grammar whose compile starts shortly before its deadline, once other clients' grammars leave a thread, is
    waited for (its check stops it within its own time): it was refused as one that 'did not compile within 2 s:
    simplify it', a 422 for a grammar that took a fraction of that, because of what others sent."""
    held = HeldCompiles(tokenizer, monkeypatch, timeout_s=2.0, own_s=1.5)  # its own compile: 1.5 s from its thread
    grammars, release, as_client = held.grammars, held.release, held.ask

    async def crowd() -> CompiledGrammar:
        holding = [
            asyncio.create_task(as_client(f"c{k}", GrammarSpec.regex(f"held{k}"))) for k in range(COMPILE_THREADS)
        ]
        await asyncio.sleep(0.1)
        honest = asyncio.create_task(as_client("honest", GrammarSpec.regex(PATTERN)))  # its deadline: at ~2.1 s
        await asyncio.sleep(1.4)
        release.set()  # a thread is free at ~1.5 s; the compile takes 1.5 s of its own
        answer = await honest
        await asyncio.gather(*holding)
        return answer

    assert_takes(asyncio.run(crowd()), tokenizer, "no, 42 ab cd.")
    grammars.close()


@pytest.mark.parametrize("flood_asks_too", [False, True], ids=["own-grammar", "shared-grammar"])
def test_one_clients_flood_of_grammars_holds_anothers_for_a_job_of_its_own_at_most(
    flood_asks_too: bool, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compile threads serve the clients in turn: a grammar sent while another client has eight queued and two
    running is compiled next but one, not after the eight (in one queue it waited past its deadline: 429). So is a
    grammar the flooding client queued too, behind its own: a compile is shared by every request that asks for it
    while it waits, and it waits in the turn of each of their clients (queued in the first client's turn alone, it
    waited behind the whole flood, so the fair turns did not hold for it); it is compiled once."""
    held = HeldCompiles(tokenizer, monkeypatch, timeout_s=5.0)
    grammars, release, order, as_client = held.grammars, held.release, held.order, held.ask

    async def crowd() -> CompiledGrammar:
        flood = [asyncio.create_task(as_client("flood", GrammarSpec.regex(f"held{k}"))) for k in range(10)]
        if flood_asks_too:
            flood.append(asyncio.create_task(as_client("flood", GrammarSpec.regex(PATTERN))))  # behind its own ten
        await asyncio.sleep(0.1)  # two run, the others wait
        honest = asyncio.create_task(as_client("honest", GrammarSpec.regex(PATTERN)))
        await asyncio.sleep(0.1)
        release.set()
        answer = await honest
        await asyncio.gather(*flood)
        return answer

    honest = asyncio.run(crowd())
    assert order.index(PATTERN) <= COMPILE_THREADS + 1 and order.count(PATTERN) == 1, order  # in its turn, once
    assert_takes(honest, tokenizer, "no, 42 ab cd.", refused="maybe")
    grammars.close()


def test_a_grammar_outgrowing_the_check_memory_is_refused_and_the_next_compiles(tokenizer) -> None:
    """The check worker runs under an address-space limit: a schema whose translation outgrows it (2 allOf x 10
    anyOf branches each merging a 300-property object: 160 MB) ends the worker alone and is refused, and the next
    grammar compiles in a fresh one. The server's workers run under CHECK_MEMORY_BYTES."""
    string = [{"type": "string", "pattern": f"^[a-z]{{{i % 9 + 1}}}x$"} for i in range(300)]
    merged = {"type": "object", "properties": {f"p{i}": schema for i, schema in enumerate(string)}}
    branches = [
        [
            {"allOf": [{"$ref": "#/$defs/merged"}, {"properties": {k: {"type": "integer"}}, "required": [k]}]}
            for k in (f"k{i}_{j}" for j in range(10))
        ]
        for i in range(2)
    ]
    hog = GrammarSpec.json_schema({"$defs": {"merged": merged}, "allOf": [{"anyOf": anyof} for anyof in branches]})
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id], check_memory_bytes=96 << 20)
    with pytest.raises(InvalidGrammar, match="stopped on it"):
        compiled(grammars, hog)
    assert_takes(compiled(grammars, GrammarSpec.regex(PATTERN)), tokenizer, "no, 42 ab cd.")
    grammars.close()

    served = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    compiled(served, GrammarSpec.regex("a+"))  # starts a worker
    children = Path(f"/proc/{os.getpid()}/task").glob("*/children")
    workers = [
        int(pid)
        for path in children
        for pid in path.read_text().split()
        if b"server.grammar_check" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert workers and all(
        resource.prlimit(pid, resource.RLIMIT_AS) == (CHECK_MEMORY_BYTES, CHECK_MEMORY_BYTES) for pid in workers
    )
    served.close()


def test_a_ctrl_c_leaves_the_check_worker_to_the_server(tokenizer) -> None:
    """Ctrl-C in a terminal sends SIGINT to the server's whole process group: the check worker ignores it (the server
    ends it), instead of dying with a KeyboardInterrupt traceback and failing the next grammar's check."""
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    compiled(grammars, GrammarSpec.regex("a+"))  # starts a worker
    workers = [checker._worker for checker in grammars._all_checkers if checker._worker is not None]
    assert workers
    for worker in workers:
        worker.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert [worker.poll() for worker in workers] == [None] * len(workers)  # alive: no KeyboardInterrupt ended them
    assert_takes(compiled(grammars, GrammarSpec.regex(PATTERN)), tokenizer, "no, 42 ab cd.")
    grammars.close()


def test_the_early_size_count_never_passes_a_schemas_compact_json() -> None:
    """_chars_past counts a lower bound of a value's compact JSON: a schema within the limit is never refused by it,
    whatever its keys, strings, numbers and nesting; one character under its length it may be."""
    rng = random.Random(0)

    def value(depth: int) -> object:
        kind = rng.random()
        if depth < 4 and kind < 0.3:
            keys = ("k" * rng.randint(0, 3) + str(rng.randint(0, 99)) for _ in range(rng.randint(0, 5)))
            return {key: value(depth + 1) for key in keys}
        if depth < 4 and kind < 0.5:
            return [value(depth + 1) for _ in range(rng.randint(0, 5))]
        return rng.choice([0, 12345, -1.5, True, False, None, "", "abc", 'é\n"q'])

    for _ in range(5000):
        item = value(0)
        assert not _chars_past(item, len(json.dumps(item, separators=(",", ":"), ensure_ascii=False))), item
