"""Parsers for the deployment files, so tests compare them with the code instead of repeating values."""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "ENV"
    args: str  # everything after the keyword, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comments dropped, backslash continuations joined (enough for our Dockerfile)."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [Instruction(kw.upper(), rest.strip()) for kw, _, rest in (line.strip().partition(" ") for line in logical)]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage: what the image that runs is made of."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def env_assignments(instructions: list[Instruction]) -> dict[str, str]:
    """ENV KEY=value pairs (later ones win), as the image sees them."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(ins.args))
    return env


def loraplex_variables(text: str) -> set[str]:
    return set(re.findall(r"\bLORAPLEX_[A-Z0-9_]+", text))
