r"""PEFT's matching of a regex target_modules / exclude_modules (re.fullmatch of each module's name), run on a
client's pattern with bounded work.

Python's re backtracks: `(.*)*x` takes 0.2 s against a 22-character module name and twice as long for each character
more (minutes at 31, days at 45). The pattern is still run by re itself, because only re decides what re matches, and
a module set other than PEFT's serves answers PEFT never gives. The linear-time engines at hand read another
language: llguidance's regexes (Rust's syntax) take `[[a]]` as a nested class where re reads a class then `]`, have
no lookarounds (`.*(?<!v_proj)`: every module but the v projections) and match only through a tokenizer; RE2 (a
native dependency) refuses lookarounds and `\Z`. The `regex` package, installed, bounds its time, but it is another
backtracking engine, with its own reading of some patterns. So re runs in a child process of this interpreter,
without site-packages or environment, with its memory bounded, and is killed at a deadline: a pattern that overruns it
is refused. The child's start (15-35 ms) is paid only by configs with a regex: PEFT's save_pretrained writes a list
unless it was given a string. A child that cannot be started, or ends without an answer, is the server's passing state
(out of processes or memory), not the pattern's: the upload (or load) is answered 503, to be retried."""

import json
import logging
import subprocess
import sys

from adapters.errors import InvalidAdapterConfig, RegexCheckUnavailable, reason

log = logging.getLogger(__name__)

# An honest pattern matches a model's module names in microseconds; the bound is the child's start on a loaded
# machine, many times over. It is taken at every load of a stored adapter as well as at its upload.
TIMEOUT_S = 2.0
# re's backtracking state grows with the pattern's nesting; the child's interpreter maps ~13 MB
MEMORY_BYTES = 256 << 20
_NAMES = 'e.g. ["q_proj", "v_proj"]'
_INSTEAD = f"e.g. '.*\\.(q_proj|v_proj)', or list the module names, {_NAMES}"

# The child's whole program: the standard library only. A pattern that reaches the memory cap while matching (re's
# backtracking state: a MemoryError, the child is not killed), or that re cannot compile or fails on otherwise (a
# recursion limit), is named; any other end of the child is the server's failure.
_CHILD = """
import json, re, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
patterns, names = json.load(sys.stdin)
matched = {}
for key, pattern in patterns.items():
    try:
        compiled = re.compile(pattern)
        matched[key] = [name for name in names if compiled.fullmatch(name)]
    except MemoryError:
        print(json.dumps({"exhausted": key}))
        sys.exit()
    except Exception as exc:
        print(json.dumps({"refused": key, "error": f"{type(exc).__name__}: {exc}"}))
        sys.exit()
print(json.dumps({"matched": matched}))
"""


def fullmatches(patterns: dict[str, str], names: list[str]) -> dict[str, frozenset[str]]:
    """For each config key, the `names` that its pattern matches whole, as re.fullmatch. Raises InvalidAdapterConfig
    for a pattern re refuses, and for patterns that do not finish within TIMEOUT_S or MEMORY_BYTES; raises
    RegexCheckUnavailable when no child could answer. Their length is bounded by the caller
    (adapters.validate.check_config)."""
    keys = " and ".join(patterns)
    try:
        child = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD, str(MEMORY_BYTES)],
            input=json.dumps([patterns, names]),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise InvalidAdapterConfig(
            f"the regex of {keys} did not match {len(names)} module names within {TIMEOUT_S:g} s: PEFT matches it "
            "with Python's re, whose time grows exponentially with nested repetition such as (.*)*; write it without "
            f"nested repetition, {_INSTEAD}"
        ) from None
    except OSError as exc:  # no process: the host's process or memory limits (EAGAIN, ENOMEM), or no interpreter
        log.warning("the process matching the regex of %s could not be started: %s", keys, exc)
        raise RegexCheckUnavailable(_unavailable(keys, f"could not be started ({reason(exc)})")) from exc
    if child.returncode != 0 or not child.stdout:
        # killed by a signal (the kernel's out-of-memory killer, an operator), or its interpreter failed to start:
        # the pattern's own failures, the memory cap's included, are answers
        ended = f"signal {-child.returncode}" if child.returncode < 0 else f"status {child.returncode}"
        log.warning("the process matching the regex of %s ended by %s: %s", keys, ended, child.stderr[-2000:])
        raise RegexCheckUnavailable(_unavailable(keys, f"ended without an answer ({ended})"))
    answer = json.loads(child.stdout)
    if "exhausted" in answer:
        raise InvalidAdapterConfig(
            f"the regex of {answer['exhausted']} took more than {MEMORY_BYTES >> 20} MiB of memory to match "
            f"{len(names)} module names: PEFT matches it with Python's re, whose state grows with repetition such as "
            f"(?:.?){{100000000}}; write it without large or nested repetition, {_INSTEAD}"
        )
    if "refused" in answer:
        raise InvalidAdapterConfig(
            f"{answer['refused']} is not a regular expression Python's re can match ({answer['error']}), and PEFT "
            f"matches it with re: fix the regex, or list the module names, {_NAMES}"
        )
    return {key: frozenset(matched) for key, matched in answer["matched"].items()}


def _unavailable(keys: str, what: str) -> str:
    return (
        f"the server could not check the regex of {keys} now: the process that matches it {what}; retry in a "
        f"moment, or list the module names, {_NAMES}, which need no process"
    )
