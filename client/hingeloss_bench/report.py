"""Output of a benchmark: the result table, JSON, CSV and the latency/throughput plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hingeloss_bench.stats import CellResult

# (header, attribute, format) of the result table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("req/s", "rps", "{:,.1f}"),
    ("rows/s", "rows_per_s", "{:,.0f}"),
    ("MB/s up", "mb_up_per_s", "{:,.1f}"),
    ("MB/s down", "mb_down_per_s", "{:,.1f}"),
    ("p50 ms", "latency_p50_ms", "{:.2f}"),
    ("p90 ms", "latency_p90_ms", "{:.2f}"),
    ("p99 ms", "latency_p99_ms", "{:.2f}"),
    ("max ms", "latency_max_ms", "{:.2f}"),
    ("queue ms", "queue_ms", "{:.2f}"),
    ("compute ms", "compute_ms", "{:.2f}"),
    ("batch req", "batch_requests", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def errors_text(result: CellResult) -> str:
    return ", ".join(f"{code} {count}" for code, count in result.errors.items()) or "0"


def table_rows(results: Sequence[CellResult]) -> list[list[str]]:
    """The table as text: the cell's load, the columns, then errors."""
    rows = []
    for result in results:
        load = f"c={result.concurrency}" if result.rate is None else f"{result.rate:g}/s"
        row = [f"{result.tag} {load}".strip()]
        row += [_cell(getattr(result, attr), fmt) for _, attr, fmt in COLUMNS]
        row.append(errors_text(result))
        rows.append(row)
    return rows


def render_table(results: Sequence[CellResult], title: str, console: Any = None) -> str | None:
    """Prints the table with rich when given a console wide enough for it; else returns text."""
    headers = ["cell", *(h for h, _, _ in COLUMNS), "errors"]
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    if console is not None and console.width >= sum(widths) + 3 * len(widths) + 1:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for index, header in enumerate(headers):
            if index in (0, len(headers) - 1):
                table.add_column(header, justify="left", no_wrap=True)
            else:
                table.add_column(header, justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return None
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")


def write_csv(path: Path, results: Sequence[CellResult]) -> None:
    rows = [r.flat() for r in results]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)


def write_plot(
    path: Path,
    series: Mapping[str, Sequence[CellResult]],
    size_px: tuple[int, int] = (960, 600),
    title: str = "",
) -> None:
    """p50 (solid) and p99 (dashed) latency against throughput, one colour per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dpi = 100
    figure, axes = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    try:
        for index, (name, results) in enumerate(series.items()):
            points = [r for r in results if r.ok > 0]
            if not points:
                continue
            color = f"C{index % 10}"
            throughput = [r.rps for r in points]
            axes.plot(
                throughput,
                [r.latency_p50_ms for r in points],
                "o-",
                color=color,
                label=f"{name} p50",
            )
            axes.plot(
                throughput,
                [r.latency_p99_ms for r in points],
                "s--",
                color=color,
                label=f"{name} p99",
            )
            for r in points:
                load = f"c={r.concurrency}" if r.rate is None else f"{r.rate:g}/s"
                axes.annotate(
                    load,
                    (r.rps, r.latency_p99_ms),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=color,
                )
        axes.set_xlabel("throughput (requests/s)")
        axes.set_ylabel("latency (ms)")
        if any(r.ok for rs in series.values() for r in rs):
            axes.set_yscale("log")
            # Plain numbers (0.5, 2, 40), not 4x10^0, on both major and minor ticks.
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            axes.yaxis.set_major_formatter(plain)
            axes.yaxis.set_minor_formatter(plain)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        axes.set_title(title or "latency against throughput")
        figure.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(figure)
