"""plot.py draws both charts from an http_load report (unknown percentiles are skipped, not plotted as 0)."""

import json
from pathlib import Path

from plot import main


def _point(adapters: int, rate: float, tok_s: float) -> dict:
    p99 = {"p50": 0.1, "p90": 0.2, "p99": 0.3 * adapters}
    return {"adapters_in_use": adapters, "rate": rate, "requests_per_s": rate or 5.0, "output_tokens_per_s": tok_s,
            "ttft_s": p99, "itl_s": p99, "latency_s": p99 if tok_s else {"p50": None, "p90": None, "p99": None}}


def test_plots_written(tmp_path: Path) -> None:
    points = [_point(a, r, 100.0 / a) for a in (1, 8, 32) for r in (0.0, 4.0)] + [_point(128, 4.0, 0.0)]
    report = tmp_path / "sweep.json"
    report.write_text(json.dumps({"points": points}))
    assert main([str(report), "--out", str(tmp_path / "docs")]) == 0
    for name in ("throughput_vs_adapters.png", "latency_vs_load.png"):
        assert (tmp_path / "docs" / name).read_bytes()[:4] == b"\x89PNG"
