"""bench/engine.py --tiny runs end to end on CPU, so the benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine.py"


def test_bench_tiny_runs(tmp_path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert results["engine_32_lora_tok_s"] > 0 and results["baseline_mixed_tok_s"] > 0
