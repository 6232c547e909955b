"""PNG charts of an http_load.py report: throughput vs adapters in use, and p99 latency vs load.

python bench/plot.py sweep.json --out docs/
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt


def series(points: list[dict], by: str, x: str, y) -> dict[float, list[tuple[float, float]]]:
    """{value of `by`: [(x, y(point)), ...] sorted by x}, skipping points where y is unknown."""
    lines: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        value = y(p)
        if value is not None:
            lines[p[by]].append((p[x], value))
    return {key: sorted(xy) for key, xy in sorted(lines.items())}


def _rate_label(rate: float) -> str:
    return f"{rate:g} req/s offered" if rate else "closed loop"


def throughput_vs_adapters(points: list[dict], out: Path) -> Path:
    fig, (tok, p99) = plt.subplots(1, 2, figsize=(11, 4))
    for rate, xy in series(points, "rate", "adapters_in_use", lambda p: p["output_tokens_per_s"]).items():
        tok.plot(*zip(*xy, strict=True), marker="o", label=_rate_label(rate))
    for rate, xy in series(points, "rate", "adapters_in_use", lambda p: p["latency_s"]["p99"]).items():
        p99.plot(*zip(*xy, strict=True), marker="o", label=_rate_label(rate))
    for ax, title in ((tok, "output tokens/s"), (p99, "p99 request latency (s)")):
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xlabel("distinct adapters in use")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "throughput_vs_adapters.png")


def latency_vs_load(points: list[dict], out: Path) -> Path:
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, title in ((ttft, "ttft_s", "p99 time to first token (s)"), (itl, "itl_s", "p99 inter-token (s)")):
        for adapters, xy in series(points, "adapters_in_use", "requests_per_s", lambda p, k=kind: p[k]["p99"]).items():
            ax.plot(*zip(*xy, strict=True), marker="o", label=f"{adapters} adapters")
        ax.set_xlabel("completed requests/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "latency_vs_load.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="JSON written by http_load.py --out")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the PNGs")
    args = parser.parse_args(argv)
    points = json.loads(args.report.read_text())["points"]
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (throughput_vs_adapters(points, args.out), latency_vs_load(points, args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
