"""The deployment files, parsed once per session."""

import pytest
import yaml
from dockerfiles import REPO, Instruction, parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def service(compose: dict) -> dict:
    (only,) = compose["services"].values()
    return only
