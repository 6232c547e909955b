import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_tiny_runs(tmp_path: Path):
    """The GPU benchmark's --tiny CPU mode, in its own process as it is run for real, so it cannot rot."""
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, "bench/train.py", "--tiny", "--steps", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| seed recipe (HF Trainer, pad 512) |" in proc.stdout
    report = json.loads(out.read_text())
    assert [c["targets"] for c in report["cases"]] == ["q_proj,v_proj"] * 5 + ["all-linear (default)"]
    assert report["cases"][3]["name"].endswith(", no gradient checkpointing")
    assert report["cases"][4]["name"].endswith(", checkpointing 50% of the layers")
    assert all(c["tokens_per_s"] > 0 and c["real_tokens"] > 0 for c in report["cases"])
