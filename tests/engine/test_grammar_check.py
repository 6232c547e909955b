"""The grammar check's worker process when the server holds many files: a server with a thousand connections
open holds a thousand descriptors, and the next pipe it opens is numbered past them."""

import asyncio
import os
import resource
from collections.abc import Iterator

import pytest

from loraplex.synthetic import BYTE_VOCAB
from server.grammar import Grammars, GrammarSpec

HELD = 1100  # past select()'s FD_SETSIZE, 1024


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HELD + 256:
        pytest.skip(f"this machine allows {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HELD + 256), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(HELD)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_grammars_compile_while_the_server_holds_a_thousand_files(tokenizer, many_descriptors: None) -> None:
    """The worker's pipes are numbered past 1024: its answer is still waited for (select() refused such a
    descriptor, and every grammar after it failed until a restart)."""
    grammars = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    try:
        for pattern in ("[a-z]+", "(yes|no)"):
            assert asyncio.run(grammars.get(GrammarSpec.regex(pattern))).matcher() is not None
    finally:
        grammars.close()
