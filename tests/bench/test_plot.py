"""plot.py draws its charts from one http_load report, or two on the same axes (unknown percentiles are
skipped, not plotted as 0; older reports without workloads or an SLO still draw)."""

import json
from pathlib import Path

import pytest
from plot import main, offered_load_curves

CHARTS = ("throughput_vs_adapters.png", "latency_vs_load.png", "latency_vs_offered_load.png")


def _point(adapters: int, rate: float, tok_s: float, workload: str | None = None) -> dict:
    p99 = {"p50": 0.1, "p90": 0.25 * (1 + rate), "p99": 0.3 * adapters}
    point = {
        "adapters_in_use": adapters,
        "rate": rate,
        "requests_per_s": rate or 5.0,
        "output_tokens_per_s": tok_s,
        "ttft_s": p99,
        "itl_s": p99,
        "latency_s": p99 if tok_s else {"p50": None, "p90": None, "p99": None},
    }
    return point | ({"workload": workload} if workload else {})


def _write(path: Path, report: dict) -> str:
    path.write_text(json.dumps(report))
    return str(path)


def test_plots_written(tmp_path: Path) -> None:
    points = [_point(a, r, 100.0 / a) for a in (1, 8, 32) for r in (0.0, 4.0)] + [_point(128, 4.0, 0.0)]
    report = _write(tmp_path / "sweep.json", {"points": points})
    assert main([report, "--out", str(tmp_path / "docs")]) == 0
    for name in CHARTS:
        assert (tmp_path / "docs" / name).read_bytes()[:4] == b"\x89PNG"


def test_before_and_after_on_the_same_axes(tmp_path: Path) -> None:
    before = _write(tmp_path / "before.json", {"points": [_point(8, r, 50.0) for r in (1.0, 2.0, 4.0, 0.0)]})
    after = _write(
        tmp_path / "after.json",
        {"slo": {"ttft": 1.0, "itl": 0.05}, "points": [_point(32, r, 90.0, "mixed") for r in (1.0, 4.0, 8.0)]},
    )
    assert main([before, after, "--label", "before", "--label", "after", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "latency_vs_offered_load.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main([before, after, "--label", "only one"])


def test_offered_load_curves_skip_closed_loops_and_name_what_differs() -> None:
    points = [
        _point(8, 1.0, 1.0, "mixed"),
        _point(8, 2.0, 1.0, "mixed"),
        _point(8, 0.0, 1.0, "mixed"),
        _point(8, 1.0, 1.0, "decode"),
        _point(32, 1.0, 1.0, "decode"),
    ]
    points[1]["itl_s"] = {"p50": None, "p90": None, "p99": None}  # 1-token outputs: no ITL
    assert offered_load_curves("after", points, "ttft_s") == {
        "after mixed 8 adapters": [(1.0, 0.5), (2.0, 0.75)],
        "after decode 8 adapters": [(1.0, 0.5)],
        "after decode 32 adapters": [(1.0, 0.5)],
    }
    assert offered_load_curves("x", points[:2], "itl_s") == {"x": [(1.0, 0.5)]}
