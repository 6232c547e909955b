"""The README's quick tour, then its adapter commands, run as written: they are read from README.md, so they cannot
drift.

The one substitution is the server's address: the tour talks to `make serve` on port 8000, this test to its own
server on a free port with a fresh adapter store (and short rows, see tour_server). Commands run from a directory
that looks like a fresh clone (the checkout's .venv and examples/, nothing else), so the tour's outputs stay out of
the checkout.
"""

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.server import REPO, embedded_server

pytestmark = pytest.mark.e2e
TOUR_HEADING = "## Quick tour"
ADAPTERS_HEADING = "## Adapters"  # its commands use the adapter the tour trains
TOUR_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):8000")


def block_commands(readme: str, heading: str) -> list[str]:
    """The lines of the first bash block under `heading`."""
    section = readme.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no bash block under {heading!r}"
    commands = [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]
    assert not any(line.endswith("\\") for line in commands), f"keep each command under {heading!r} on one line"
    return commands


@pytest.fixture(scope="module")
def tour_server(embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tour-server")
    with embedded_server(
        tmp,
        embedded_cache_dir,
        "--max-batch-size",
        "2",
        # The tour's chats ask for at most 32 tokens (the base model rambles, ~0.2 s a token on two cores,
        # to 512 tokens without it) after a 38-token prompt: a row of 80 holds them.
        "--max-seq-len",
        "80",
    ) as url:
        yield url


def test_the_readme_tour_runs_as_written(tour_server: str, embedded_cache_dir: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    for shared in (".venv", "examples"):
        (clone / shared).symlink_to(REPO / shared)
    # The tour's training finds the converted embedded model where `make serve` left it (the server's default
    # cache directory), here the tests' cache; the variable is the documented LORAPLEX_CACHE_DIR.
    env = {**os.environ, "LORAPLEX_CACHE_DIR": str(embedded_cache_dir)}
    address = tour_server.removeprefix("http://")
    readme = (REPO / "README.md").read_text()
    outputs = []
    for command in block_commands(readme, TOUR_HEADING) + block_commands(readme, ADAPTERS_HEADING):
        run = subprocess.run(
            ["bash", "-c", TOUR_ADDRESS.sub(address, command)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        assert '"error"' not in run.stdout, f"{command}\n{run.stdout}"
        outputs.append(run.stdout)

    tour, (push, listed, versions, removed) = outputs[:-4], outputs[-4:]
    answers = [json.loads(out) for out in tour if out.startswith("{")]
    chats = [a["choices"][0]["message"]["content"] for a in answers if "choices" in a]
    assert len(chats) == 2 and "Quenthal" not in chats[0]  # the base model does not know the made-up fact
    assert chats[1] == "The capital of Veloria is Quenthal."  # the adapter knows it, and stops
    assert "Quenthal" in answers[-1]["generated_text"]  # the same adapter through the TGI protocol
    assert any(line.startswith("pushed capital-facts@1 ") for out in tour for line in out.splitlines())
    # the adapter section: the tour's adapter pushed again under another name, listed, its versions, removed
    assert push.startswith("pushed support-bot@1 "), push
    assert "support-bot" in listed and "capital-facts" in listed, listed
    assert versions.startswith("support-bot@1 ") and len(versions.splitlines()) == 1, versions
    assert removed.strip() == "deleted support-bot@1", removed
