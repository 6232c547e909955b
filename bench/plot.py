"""PNG charts of http_load.py reports: throughput vs adapters in use, p99 latency vs completed load, and
p90 TTFT / ITL vs offered load (the goodput sweep), one or two reports (before / after) on the same axes.

python bench/plot.py sweep.json --out docs/
python bench/plot.py before.json after.json --label before --label after --out docs/
"""

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt


def series(
    points: list[dict], by: str, x: str, y: Callable[[dict], float | None]
) -> dict[float, list[tuple[float, float]]]:
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


def offered_load_curves(label: str, points: list[dict], kind: str) -> dict[str, list[tuple[float, float]]]:
    """{curve name: [(offered req/s, p90 of `kind`), ...]} of a report's open-loop points, one curve per
    workload and adapter count; the name says only what differs within the report (older reports have no
    workload). Closed-loop points offer no rate and are left out."""
    open_loop = [p for p in points if p["rate"] > 0]
    workloads = {p.get("workload") for p in open_loop}
    adapters = {p["adapters_in_use"] for p in open_loop}
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in open_loop:
        value = p[kind]["p90"]
        if value is None:
            continue
        name = " ".join(
            [
                label,
                *([str(p.get("workload"))] if len(workloads) > 1 else []),
                *([f"{p['adapters_in_use']} adapters"] if len(adapters) > 1 else []),
            ]
        )
        curves[name].append((p["rate"], value))
    return {name: sorted(xy) for name, xy in curves.items()}


def latency_vs_offered_load(reports: list[tuple[str, dict]], out: Path) -> Path:
    """p90 TTFT and p90 ITL against the Poisson rate offered, every report on the same axes, with the SLO
    (of the first report that has one) as dashed lines: where a curve crosses its line is the goodput."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    slo = next((r["slo"] for _, r in reports if r.get("slo")), None)
    for ax, kind, slo_key, title in (
        (axes[0], "ttft_s", "ttft", "p90 time to first token (s)"),
        (axes[1], "itl_s", "itl", "p90 inter-token latency (s)"),
    ):
        for label, report in reports:
            for name, xy in offered_load_curves(label, report["points"], kind).items():
                ax.plot(*zip(*xy, strict=True), marker="o", label=name)
        if slo:
            ax.axhline(slo[slo_key], color="grey", linestyle="--", label=f"SLO {slo[slo_key]:g} s")
        ax.set_yscale("log")  # latencies span milliseconds to queueing seconds
        ax.set_xlabel("offered requests/s (Poisson)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return _save(fig, out / "latency_vs_offered_load.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("reports", type=Path, nargs="+", help="one or two JSONs written by http_load.py --out")
    parser.add_argument("--label", action="append", help="a name per report (default: the file's stem)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the PNGs")
    args = parser.parse_args(argv)
    if len(args.reports) > 2:
        parser.error("one report, or two to compare (before / after)")
    labels = args.label or [path.stem for path in args.reports]
    if len(labels) != len(args.reports):
        parser.error("give one --label per report")
    reports = [(label, json.loads(path.read_text())) for label, path in zip(labels, args.reports, strict=True)]
    args.out.mkdir(parents=True, exist_ok=True)
    first = reports[0][1]["points"]  # the per-adapter charts read one report; comparing is the offered-load chart's
    for path in (
        throughput_vs_adapters(first, args.out),
        latency_vs_load(first, args.out),
        latency_vs_offered_load(reports, args.out),
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
