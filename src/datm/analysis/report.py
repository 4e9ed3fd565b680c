"""Reports comparing run directories: BLEU / chrF++ tables laid out as in the paper, plots, and
paired-bootstrap significance marks against a baseline run.

Reads run directories only (plan.json, scores.json, translations/), so it works on results produced
on another machine.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Figures are drawn on an Agg canvas directly (no pyplot): no global state, never a window.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from datm import artifacts
from datm.analysis.view import RunError, RunView
from datm.artifacts import RunDir
from datm.errors import DatmError
from datm.eval.evaluate import read_lines
from datm.eval.results import BootstrapResult, RunScores
from datm.eval.significance import DEFAULT_SEED, Paired, Statistics
from datm.languages import FAMILIES, FAMILY_NAMES, XX_EN, Direction

METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++", "comet": "COMET"}
DECIMALS = {"bleu": 2, "chrf": 2, "comet": 4}
SIGNIFICANT = 0.05
BETTER, WORSE = "†", "‡"
MISSING = "–"
PLOT_DPI = 100


class ReportError(DatmError):
    pass


@dataclass(frozen=True)
class Run:
    path: Path
    label: str
    strategy: str | None
    scores: RunScores


# ----------------------------------------------------------------------------------- reading


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    view = RunView(run_dir)
    try:
        scores = view.scores()
        plan = view.plan
    except RunError as e:
        raise ReportError(str(e)) from None
    strategy = (plan.strategy if plan is not None else None) or scores.strategy
    label = f"{run_dir.name} ({strategy})" if strategy else run_dir.name
    return Run(run_dir, label, strategy, scores)


def _translation_file(run: Run, direction: str, kind: str) -> list[str]:
    path = RunDir(run.path).translations(direction).of(kind)
    if not path.is_file():
        raise ReportError(
            f"{path} is missing; significance against the baseline needs each run's translations"
        )
    return read_lines(path)


# ----------------------------------------------------------------------------------- tables


def _direction_columns(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Every direction any run has, per family, in the order the runs list them."""
    out: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for run in runs:
        for key in run.scores.directions:
            family = Direction.parse(key).family
            if key not in out[family]:
                out[family].append(key)
    return out


def _avg_key(family: str) -> str:
    return f"avg:{family}"


def _significance(
    runs: Sequence[Run], baseline: Run, common: list[str], n_samples: int
) -> dict[str, dict[str, dict[str, BootstrapResult]]]:
    """label -> metric -> direction -> paired bootstrap result (baseline = system a). Each system's
    per-segment statistics are computed once per metric and direction."""
    out: dict[str, dict[str, dict[str, BootstrapResult]]] = {}
    refs = {d: _translation_file(baseline, d, "ref") for d in common}
    base_hyps = {d: _translation_file(baseline, d, "hyp") for d in common}
    base_stats: dict[tuple[str, str], tuple[Statistics, np.ndarray]] = {}
    for run in runs:
        if run.path == baseline.path:
            continue
        out[run.label] = {"bleu": {}, "chrf": {}}
        for d in common:
            if _translation_file(run, d, "ref") != refs[d]:
                raise ReportError(
                    f"{RunDir(run.path).translations(d).ref} differs from the baseline's "
                    f"{RunDir(baseline.path).translations(d).ref}; runs must be scored on the same test set"
                )
            hyps = _translation_file(run, d, "hyp")
            for metric in ("bleu", "chrf"):
                if (metric, d) not in base_stats:
                    stats = Statistics(metric, Direction.parse(d).tgt)
                    base_stats[metric, d] = (
                        stats,
                        stats.segments(base_hyps[d], refs[d], "hypotheses (system a)"),
                    )
                stats, base = base_stats[metric, d]
                paired = Paired(stats, base, stats.segments(hyps, refs[d], "hypotheses (system b)"))
                out[run.label][metric][d] = paired.bootstrap(n_samples, DEFAULT_SEED)
    return out


def _mark(result: BootstrapResult | None) -> str:
    if result is None or not result.significant(SIGNIFICANT):
        return ""
    return BETTER if result.delta > 0 else WORSE


def build_tables(runs: Sequence[Run], baseline: Run | None = None, n_samples: int = 1000) -> dict[str, Any]:
    """The report's data (what report.json holds): per metric, one row per run, one cell per
    direction and per family average, with best-in-column flags and significance marks."""
    columns = _direction_columns(runs)
    every = [d for f in FAMILIES for d in columns[f]]
    common = [d for d in every if all(d in r.scores.directions for r in runs)]
    significance = _significance(runs, baseline, common, n_samples) if baseline is not None else {}
    base_path = baseline.path if baseline is not None else None
    has_comet = any(s.comet is not None for r in runs for s in r.scores.directions.values())
    metrics = ["bleu", "chrf"] + (["comet"] if has_comet else [])
    tables: dict[str, Any] = {}
    for metric in metrics:
        rows = []
        for run in runs:
            cells: dict[str, dict[str, Any]] = {}
            for family in FAMILIES:
                for d in columns[family]:
                    value = run.scores.value(d, metric)
                    result = significance.get(run.label, {}).get(metric, {}).get(d)
                    cells[d] = {"value": value, "mark": _mark(result)}
                    if result is not None:
                        cells[d]["p_value"] = result.p_value
                if columns[family]:
                    mean = _mean(run, columns[family], common, metric)
                    cells[_avg_key(family)] = {"value": mean, "mark": ""}
            rows.append({"run": run.label, "cells": cells})
        _flag_best(rows, metric)
        tables[metric] = {"name": METRIC_NAMES[metric], "rows": rows}
    column_order = []
    for family in FAMILIES:
        if columns[family]:
            column_order += columns[family] + [_avg_key(family)]
    return {
        "runs": [
            {"label": r.label, "path": str(r.path), "strategy": r.strategy, "baseline": r.path == base_path}
            for r in runs
        ],
        "baseline": baseline.label if baseline is not None else None,
        "n_samples": n_samples,
        "directions": columns,
        "common_directions": common,
        "columns": column_order,
        "tables": tables,
        "significance": {
            label: {m: {d: r.to_json() for d, r in by_d.items()} for m, by_d in by_m.items()}
            for label, by_m in significance.items()
        },
        "signatures": {r.label: r.scores.all_signatures() for r in runs},
    }


def _mean(run: Run, directions: list[str], common: list[str], metric: str) -> float | None:
    """Mean over the directions every run has (so all rows average the same directions)."""
    values = [run.scores.value(d, metric) for d in directions if d in common]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _flag_best(rows: list[dict[str, Any]], metric: str) -> None:
    """Bold the best value per column (ties at the printed precision all count), when 2+ runs have one."""

    def shown(cell: dict[str, Any]) -> float | None:
        return None if cell["value"] is None else round(cell["value"], DECIMALS[metric])

    for key in rows[0]["cells"] if rows else []:
        values = [shown(r["cells"][key]) for r in rows if r["cells"][key]["value"] is not None]
        best = max(values) if len(values) > 1 else None
        for r in rows:
            r["cells"][key]["best"] = best is not None and shown(r["cells"][key]) == best


# ----------------------------------------------------------------------------------- rendering


def _header(key: str) -> str:
    if key.startswith("avg:"):
        return f"{FAMILY_NAMES[key[4:]]} Avg"
    return key


def _cell_text(cell: dict[str, Any], metric: str, bold: tuple[str, str]) -> str:
    if cell["value"] is None:
        return MISSING
    text = f"{cell['value']:.{DECIMALS[metric]}f}"
    if cell.get("best"):
        text = f"{bold[0]}{text}{bold[1]}"
    return text + cell["mark"]


def _legend(data: dict[str, Any]) -> list[str]:
    some_missing = len(data["common_directions"]) < sum(map(len, data["directions"].values()))
    lines = [
        "Best value per column in bold. Avg = mean over the directions of that family"
        + (" that every run has." if some_missing else "."),
        f"{MISSING} = the run has no score for that direction.",
    ]
    if data["baseline"] is not None:
        lines.append(
            f"{BETTER} / {WORSE} = significantly better / worse than the baseline {data['baseline']} "
            f"(paired bootstrap, {data['n_samples']} resamples, p < {SIGNIFICANT}); "
            "only directions every run has are tested."
        )
    return lines


def _signature_lines(data: dict[str, Any]) -> list[str]:
    seen: dict[str, str] = {}
    for sigs in data["signatures"].values():
        for metric, sig in sigs.items():
            seen.setdefault(f"{metric}: {sig}", metric)
    return sorted(seen)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(data: dict[str, Any], title: str, plots: dict[str, str]) -> str:
    out = [f"# {title}", ""]
    for metric, table in data["tables"].items():
        out += [f"## {table['name']}", ""]
        out.append("| Run | " + " | ".join(_header(c) for c in data["columns"]) + " |")
        out.append("|---|" + "---:|" * len(data["columns"]))
        for row in table["rows"]:
            label = _md_escape(row["run"]) + (" (baseline)" if row["run"] == data["baseline"] else "")
            cells = [_cell_text(row["cells"][c], metric, ("**", "**")) for c in data["columns"]]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += [line + "  " for line in _legend(data)] + [""]
    for metric, filename in plots.items():
        out += [f"![{METRIC_NAMES[metric]} by direction]({filename})", ""]
    out += ["## Metric signatures", ""] + [f"- `{s}`" for s in _signature_lines(data)] + [""]
    return "\n".join(out)


_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; }
td { text-align: right; } td:first-child { text-align: left; }
th.avg, td.avg { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
.legend { font-size: 0.9em; color: #444; }
"""


def render_html(data: dict[str, Any], title: str, pngs: dict[str, bytes]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for metric, table in data["tables"].items():
        out.append(f"<h2>{esc(table['name'])}</h2><table><tr><th>Run</th>")
        for c in data["columns"]:
            out.append(f'<th class="{"avg" if c.startswith("avg:") else "dir"}">{esc(_header(c))}</th>')
        out.append("</tr>")
        for row in table["rows"]:
            label = esc(row["run"]) + (" (baseline)" if row["run"] == data["baseline"] else "")
            out.append(f"<tr><td>{label}</td>")
            for c in data["columns"]:
                text = _cell_text(row["cells"][c], metric, ("<b>", "</b>"))
                out.append(f'<td class="{"avg" if c.startswith("avg:") else "dir"}">{text}</td>')
            out.append("</tr>")
        out.append("</table>")
    out.append('<p class="legend">' + "<br>".join(esc(line) for line in _legend(data)) + "</p>")
    for metric, png in pngs.items():
        encoded = base64.b64encode(png).decode("ascii")
        alt = esc(METRIC_NAMES[metric]) + " by direction"
        out.append(f'<img alt="{alt}" src="data:image/png;base64,{encoded}">')
    out.append("<h2>Metric signatures</h2><ul>")
    out += [f"<li><code>{esc(s)}</code></li>" for s in _signature_lines(data)]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- plots


def plot_metric(data: dict[str, Any], metric: str) -> Figure:
    """Grouped bar chart: one group per direction (XX→En, then En→XX), one bar per run."""
    if metric not in data["tables"]:
        have = list(data["tables"])
        raise ReportError(f"cannot plot {metric!r}: the runs have no such score (have {have})")
    directions = [d for f in FAMILIES for d in data["directions"][f]]
    rows = data["tables"][metric]["rows"]
    width = 0.8 / max(1, len(rows))
    fig = Figure(figsize=(max(8.0, 3.5 + 0.25 * len(directions) * len(rows)), 4.0), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        xs = [
            j + (i - (len(rows) - 1) / 2) * width
            for j, d in enumerate(directions)
            if row["cells"][d]["value"] is not None
        ]
        heights = [row["cells"][d]["value"] for d in directions if row["cells"][d]["value"] is not None]
        ax.bar(xs, heights, width=width, label=row["run"])
    n_xx = len(data["directions"][XX_EN])
    if n_xx and n_xx < len(directions):
        ax.axvline(n_xx - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(directions)), directions, rotation=90 if len(directions) > 12 else 0)
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title(f"{METRIC_NAMES[metric]} by direction (XX→En, then En→XX)")
    # Right of the axes, so the legend never hides a bar.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def _write_plots(data: dict[str, Any], out: Path, metrics: Sequence[str]) -> dict[str, bytes]:
    pngs = {}
    for metric in metrics:
        pngs[metric] = _png(plot_metric(data, metric))
        artifacts.atomic_write_bytes(out / f"{metric}_by_direction.png", pngs[metric])
    return pngs


# ----------------------------------------------------------------------------------- entry points


def write_report(
    runs: Sequence[Path],
    out: Path,
    baseline: Path | str | None = None,
    metric_for_plots: Sequence[str] = ("bleu", "chrf"),
    n_samples: int = 1000,
) -> Path:
    """Compare run directories: report.md, report.html (self-contained), report.json and one PNG per
    plotted metric, written into `out`. Returns the path of report.md."""
    out = Path(out)
    if not runs and baseline is None:
        raise ReportError("no run directories given")
    loaded = [load_run(r) for r in runs]
    base_path = Path(baseline).resolve() if baseline is not None else None
    if base_path is not None and not any(r.path.resolve() == base_path for r in loaded):
        loaded.insert(0, load_run(base_path))  # a baseline not among the runs still gets its row, first
    _disambiguate(loaded)
    base = next((r for r in loaded if r.path.resolve() == base_path), None)
    data = build_tables(loaded, base, n_samples=n_samples)
    pngs = _write_plots(data, out, metric_for_plots)
    title = "datm report: " + ", ".join(r.label for r in loaded)
    files = {m: f"{m}_by_direction.png" for m in pngs}
    artifacts.atomic_write_json(out / "report.json", data)
    artifacts.atomic_write_text(out / "report.html", render_html(data, title, pngs))
    artifacts.atomic_write_text(out / "report.md", render_markdown(data, title, files))
    return out / "report.md"


def _disambiguate(runs: list[Run]) -> None:
    """Two runs with the same directory name and strategy would share a row label; use full paths."""
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            runs[i] = Run(
                run.path,
                f"{run.path} ({run.strategy})" if run.strategy else str(run.path),
                run.strategy,
                run.scores,
            )


def run_report(run_dir: Path) -> Path:
    """The single-run report: RUN/report.md plus the BLEU and chrF++ plots next to it."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    data = build_tables([run])
    pngs = _write_plots(data, run_dir, ("bleu", "chrf"))
    files = {m: f"{m}_by_direction.png" for m in pngs}
    from datm.merge.select import report_section

    text = render_markdown(data, f"datm run: {run.label}", files)
    selection = report_section(run_dir)  # merges chosen on the dev set (merge: auto), if any
    path = RunDir(run_dir).report
    artifacts.atomic_write_text(path, text + ("\n" + selection if selection else ""))
    return path
