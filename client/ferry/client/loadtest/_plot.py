"""Latency percentiles against throughput over a sweep, as a PNG.

matplotlib is an optional extra (``ferry-serve[plot]``) and is imported only here, only when a
plot is asked for. The figure is drawn on an Agg canvas directly rather than through pyplot, so
that plotting from a library never switches the caller's global matplotlib backend.
"""

from __future__ import annotations

from pathlib import Path

from ferry.client.loadtest._report import LoadTestReport

SERIES = (("p50", "o-"), ("p90", "s--"), ("p95", "^-."), ("p99", "v:"))


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def plot_report(report: LoadTestReport, path: str | Path) -> Path:
    """Draw p50/p90/p95/p99 latency (ms) against achieved throughput, one point per level."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(
            "plotting needs matplotlib: pip install 'ferry-serve[plot]' (or drop --plot)"
        ) from None
    path = Path(path)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [lv.throughput for lv in report.levels]
    for key, style in SERIES:
        ax.plot(xs, [lv.latency_ms[key] for lv in report.levels], style, label=key)
    if report.levels:
        head = report.levels[0]
        unit = "c=" if head.loop == "closed" else "r="
        for lv, x in zip(report.levels, xs, strict=True):
            ax.annotate(
                f"{unit}{lv.level:g}",
                (x, lv.latency_ms["p50"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
        ax.set_title(
            f"{report.model}: {head.loop} loop, {head.mode}, {head.protocol}, batch {head.batch_size}"
        )
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
