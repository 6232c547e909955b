"""The worker process in which server/grammar.py checks a grammar before it compiles it: the part of a compile that
no llguidance limit bounds runs here first, where it can be killed when it overruns.

It imports llguidance alone (no torch, no tokenizer), so it starts in a fraction of a second. Its one argument is
the bytes of address space it may use. Protocol, one JSON string per line: it writes "ready" once started; then
for each grammar read from stdin (as llguidance.LLMatcher.grammar_from_* wrote it) it writes "" when the grammar
is valid, else llguidance's error."""

import json
import resource
import signal
import sys

import llguidance


def limits() -> llguidance.LLParserLimits:
    # llguidance's defaults bound the work per grammar and per token; errors name the problem, not the parser
    # state (which would echo the grammar back)
    return llguidance.LLParserLimits(verbose_errors=False)


def main() -> None:
    # Ctrl-C in a terminal reaches the server's whole group: the server ends this worker itself (a kill, or the end
    # of its stdin), so here it only printed a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Past its limit an allocation fails and llguidance aborts the process: the grammar that needed so much ends
    # this worker alone, and server/grammar.py refuses it
    memory = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    checking = limits()
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        print(json.dumps(llguidance.LLMatcher.validate_grammar(json.loads(line), None, limits=checking)), flush=True)


if __name__ == "__main__":
    main()
