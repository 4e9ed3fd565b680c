"""Asymmetry analysis: where does joint training help (synergy) and where does it hurt (conflict)?

Compares run directories of the same languages and test data (reads plan.json and translations/
only, so it works on runs made elsewhere):

- per direction, Δ = score(joint) − score(separate), where "joint" is a multilingual or group run,
  with a 95% paired-bootstrap interval over the test segments (`datm.significance`);
  Δ < 0 with an interval excluding 0 is a `conflict`, Δ > 0 likewise a `synergy`, anything else
  `neutral`;
- per family (XX→En, En→XX), the mean Δ over its directions with a bootstrap interval (see
  `_Comparison.family` for how the families are resampled);
- with a merged and an unmerged run (e.g. datm and dat, or separate_merged and separate), the merge
  degradation score(merged) − score(unmerged) per direction that the merged run serves from a merge
  its unmerged counterpart does not, and per family (the paper finds merging hurts En→XX more).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datm import artifacts
from datm.analysis.results import Analysis, DeltaRow, FamilyDelta, MergeDegradation, RunRef
from datm.analysis.view import RunError, RunView
from datm.errors import DatmError
from datm.eval.evaluate import read_lines, score_bleu, score_chrf
from datm.eval.results import BootstrapResult
from datm.eval.significance import Paired, interval, resample
from datm.languages import EN_XX, FAMILIES, FAMILY_NAMES, XX_EN, Direction, by_family
from datm.plan import Plan

FAMILY_COLOURS = {XX_EN: "tab:blue", EN_XX: "tab:orange"}
METRICS = ("chrf", "bleu")
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++"}


class AnalysisError(DatmError):
    pass


@dataclass(frozen=True)
class RunTexts:
    """What the analysis reads from one run directory."""

    role: str  # separate | joint | merged | unmerged
    path: Path
    plan: Plan | None
    refs: dict[str, list[str]]  # direction -> reference lines
    hyps: dict[str, list[str]]  # direction -> hypothesis lines

    @property
    def strategy(self) -> str | None:
        return self.plan.strategy if self.plan is not None else None


# ----------------------------------------------------------------------------------- reading


def load_run_texts(path: str | Path, role: str) -> RunTexts:
    """A run's references and hypotheses; its directions are its plan's routes (or, without a
    plan.json, the translations/*.hyp.txt files it has)."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"{role} run {path} is not a directory")
    view = RunView(path)
    run = view.dir
    try:
        plan = view.plan
    except RunError as e:
        raise AnalysisError(str(e)) from None
    directions = list(plan.routes) if plan is not None else run.translated()
    if not directions:
        raise AnalysisError(
            f"{role} run {path}: no plan.json and no translations/*.hyp.txt; nothing to compare"
        )
    refs, hyps = {}, {}
    for d in directions:
        try:
            Direction.parse(d)
        except ValueError as e:
            raise AnalysisError(f"{role} run {path}: {e}") from None
        for kind, into in (("ref", refs), ("hyp", hyps)):
            file = run.translations(d).of(kind)
            if not file.is_file():
                raise AnalysisError(
                    f"{role} run {path}: direction {d} has no {file}; translate the run first"
                )
            into[d] = read_lines(file)
        if len(hyps[d]) != len(refs[d]):
            raise AnalysisError(
                f"{role} run {path}: direction {d} has {len(hyps[d])} hypotheses "
                f"but {len(refs[d])} references"
            )
        if not refs[d]:
            raise AnalysisError(f"{role} run {path}: direction {d} has no test segments")
    return RunTexts(role, path, plan, refs, hyps)


def check_comparable(runs: Sequence[RunTexts]) -> None:
    """Every run covers the same directions, with identical references."""
    first = runs[0]
    for run in runs[1:]:
        for a, b in ((first, run), (run, first)):
            missing = [d for d in a.refs if d not in b.refs]
            if missing:
                raise AnalysisError(
                    f"{b.role} run {b.path} lacks direction {missing[0]}, which {a.role} run {a.path} has; "
                    "the runs must cover the same directions"
                )
        for d, refs in first.refs.items():
            if run.refs[d] != refs:
                line = next(
                    (i + 1 for i, (x, y) in enumerate(zip(refs, run.refs[d], strict=False)) if x != y),
                    min(len(refs), len(run.refs[d])) + 1,
                )
                raise AnalysisError(
                    f"{run.role} run {run.path}: translations/{d}.ref.txt differs from {first.role} run "
                    f"{first.path} (first difference at line {line}); the runs must share the test set"
                )


# ----------------------------------------------------------------------------------- statistics


def classify(delta: float, low: float, high: float) -> str:
    if delta < 0 and high < 0:
        return "conflict"
    if delta > 0 and low > 0:
        return "synergy"
    return "neutral"


@dataclass
class _Comparison:
    """Run b against run a in one metric: each direction's per-segment statistics (computed once),
    bootstrapped per direction and, for the family means, resampled jointly."""

    a: RunTexts
    b: RunTexts
    metric: str
    n_samples: int
    seed: int

    def __post_init__(self) -> None:
        self.paired: dict[str, Paired] = {}
        self.boots: dict[str, BootstrapResult] = {}

    def _paired(self, d: str) -> Paired:
        if d not in self.paired:
            tgt = Direction.parse(d).tgt
            self.paired[d] = Paired.of(self.a.hyps[d], self.b.hyps[d], self.a.refs[d], tgt, self.metric)
        return self.paired[d]

    def row(self, d: str, classified: bool) -> DeltaRow:
        boot = self.boots[d] = self._paired(d).bootstrap(self.n_samples, self.seed)
        deltas = {m: boot.delta if m == self.metric else self._point_delta(m, d) for m in METRICS}
        kind = classify(boot.delta, boot.delta_low, boot.delta_high) if classified else None
        scores = {self.a.role: boot.a, self.b.role: boot.b}
        return DeltaRow(boot.delta, boot.delta_low, boot.delta_high, boot.p_value, scores, deltas, kind)

    def _point_delta(self, metric: str, d: str) -> float:
        tgt, refs = Direction.parse(d).tgt, self.a.refs[d]
        if metric == "bleu":
            return score_bleu(self.b.hyps[d], refs, tgt)[0] - score_bleu(self.a.hyps[d], refs, tgt)[0]
        return score_chrf(self.b.hyps[d], refs)[0] - score_chrf(self.a.hyps[d], refs)[0]

    def family(self, directions: list[str], classified: bool) -> FamilyDelta:
        """Mean Δ over a family's directions, with a bootstrap interval of that mean.

        Each resample draws every direction's segments and averages the per-direction Δs of that
        draw. When the directions have the same number of segments (FLORES-200 and other multi-way
        test sets, where line i is the same sentence in every direction) they share one index draw,
        the draw the per-direction bootstrap makes with this seed: the same sentences are resampled
        in every direction, keeping the correlation that a sentence's difficulty induces across
        directions, and the family samples are built from exactly the samples behind the
        per-direction intervals. Directions of different lengths get independent draws (seeded with
        (seed, position)).
        """
        joint = len({len(self.a.refs[d]) for d in directions}) == 1
        samples = []
        for k, d in enumerate(directions):
            indices = resample(len(self.a.refs[d]), self.n_samples, self.seed if joint else [self.seed, k])
            samples.append(self._paired(d).delta_samples(indices))
        low, high = interval(np.mean(samples, axis=0))
        delta = float(np.mean([self.boots[d].delta for d in directions]))
        kind = classify(delta, low, high) if classified else None
        return FamilyDelta(delta, low, high, kind, len(directions), "joint" if joint else "independent")

    def rows(
        self, directions: list[str], classified: bool
    ) -> tuple[dict[str, DeltaRow], dict[str, FamilyDelta]]:
        rows = {d: self.row(d, classified) for d in directions}
        families = {f: self.family(ds, classified) for f, ds in by_family(directions).items()}
        return rows, families


def merged_directions(merged: RunTexts, unmerged: RunTexts) -> list[str]:
    """Directions the merged run serves from a merge while the unmerged run serves them otherwise."""
    if merged.plan is None or unmerged.plan is None:
        missing = merged if merged.plan is None else unmerged
        raise AnalysisError(
            f"{missing.role} run {missing.path} has no plan.json; merge degradation needs both runs' routes"
        )
    out = []
    for d, module in merged.plan.routes.items():
        if module != unmerged.plan.routes.get(d) and merged.plan.kind(module) == "merge":
            out.append(d)
    if not out:
        raise AnalysisError(
            f"merged run {merged.path} ({merged.strategy}) serves no direction from a merge that "
            f"unmerged run {unmerged.path} ({unmerged.strategy}) does not; nothing was merged between them"
        )
    return out


def analyze(
    separate: Path,
    joint: Path,
    merged: Path | None = None,
    unmerged: Path | None = None,
    metric: str = "chrf",
    n_samples: int = 1000,
    seed: int = 12345,
) -> Analysis:
    """The asymmetry analysis of the given runs (see the module docstring); what analysis.json holds.

    `metric` ("chrf" or "bleu") gives Δ, its interval and the classification; both metrics' point
    deltas are reported as `bleu_delta` and `chrf_delta`.
    """
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if (merged is None) != (unmerged is None):
        raise AnalysisError("merge degradation needs both a merged and an unmerged run (or neither)")
    if n_samples < 1:
        raise AnalysisError(f"n_samples must be >= 1, got {n_samples}")
    runs = [load_run_texts(separate, "separate"), load_run_texts(joint, "joint")]
    if merged is not None and unmerged is not None:
        runs += [load_run_texts(merged, "merged"), load_run_texts(unmerged, "unmerged")]
    check_comparable(runs)
    sep, jnt = runs[0], runs[1]
    # XX→En first, then En→XX, each in the separate run's order
    order = [d for ds in by_family(sep.refs).values() for d in ds]
    rows, families = _Comparison(sep, jnt, metric, n_samples, seed).rows(order, classified=True)
    merge = None
    if len(runs) == 4:
        mrg, unm = runs[2], runs[3]
        served_by_merge = merged_directions(mrg, unm)
        affected = [d for d in order if d in served_by_merge]
        merge = MergeDegradation(
            *_Comparison(unm, mrg, metric, n_samples, seed).rows(affected, classified=False)
        )
    refs = {r.role: RunRef(str(r.path), r.strategy) for r in runs}
    return Analysis(metric, n_samples, seed, refs, rows, families, merge)


# ----------------------------------------------------------------------------------- rendering


def _num(value: float) -> str:
    return f"{value:+.2f}"


def _interval_text(row: DeltaRow | FamilyDelta) -> str:
    return f"[{row.low:+.2f}, {row.high:+.2f}]"


def format_table(result: Analysis) -> str:
    """Plain-text tables for the terminal."""
    m = METRIC_NAMES[result.metric]
    lines = [f"joint − separate, {m} (95% paired bootstrap, {result.n_samples} resamples)"]
    lines.append(
        f"{'direction':<10} {'separate':>9} {'joint':>9} {'Δ':>7} {'95% interval':>17} {'kind':<9}"
        f" {'ΔBLEU':>7} {'ΔchrF++':>8}"
    )
    for d, r in result.directions.items():
        lines.append(
            f"{d:<10} {r.scores['separate']:>9.2f} {r.scores['joint']:>9.2f} {_num(r.delta):>7} "
            f"{_interval_text(r):>17} {r.kind:<9} {_num(r.metric_deltas['bleu']):>7} "
            f"{_num(r.metric_deltas['chrf']):>8}"
        )
    for f, r in result.families.items():
        lines.append(
            f"{FAMILY_NAMES[f] + ' mean':<10} {'':>9} {'':>9} {_num(r.delta):>7} {_interval_text(r):>17} "
            f"{r.kind:<9} ({r.n_directions} directions)"
        )
    if result.merge is not None:
        lines += ["", f"merge degradation: merged − unmerged, {m}"]
        for d, r in result.merge.directions.items():
            lines.append(f"{d:<10} {_num(r.delta):>7} {_interval_text(r):>17}")
        for f, r in result.merge.families.items():
            lines.append(
                f"{FAMILY_NAMES[f] + ' mean':<10} {_num(r.delta):>7} {_interval_text(r):>17} "
                f"({r.n_directions} directions)"
            )
    return "\n".join(lines)


def render_markdown(result: Analysis, plots: Sequence[str]) -> str:
    m = METRIC_NAMES[result.metric]
    runs = result.runs
    out = ["# Asymmetry analysis", ""]
    for role, run in runs.items():
        out.append(f"- {role}: `{run.path}` ({run.strategy or 'no plan.json'})")
    out += [
        "",
        f"Δ = joint − separate in {m}; 95% interval from {result.n_samples} paired bootstrap resamples of "
        f"the test segments (seed {result.seed}). conflict: Δ < 0 and the interval excludes 0; synergy: "
        "Δ > 0 and the interval excludes 0; otherwise neutral.",
        "",
        "## Per direction",
        "",
        f"| Direction | Family | Separate {m} | Joint {m} | Δ | 95% interval | Kind | ΔBLEU | ΔchrF++ |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for d, r in result.directions.items():
        fam = FAMILY_NAMES[Direction.parse(d).family]
        out.append(
            f"| {d} | {fam} | {r.scores['separate']:.2f} | {r.scores['joint']:.2f} | {_num(r.delta)} "
            f"| {_interval_text(r)} | {r.kind} | {_num(r.metric_deltas['bleu'])} "
            f"| {_num(r.metric_deltas['chrf'])} |"
        )
    out += [
        "",
        "## Per family",
        "",
        "| Family | Directions | Mean Δ | 95% interval | Kind |",
        "|---|---:|---:|---:|---|",
    ]
    for f, r in result.families.items():
        out.append(
            f"| {FAMILY_NAMES[f]} | {r.n_directions} | {_num(r.delta)} | {_interval_text(r)} | {r.kind} |"
        )
    if result.merge is not None:
        out += [
            "",
            "## Merge degradation",
            "",
            f"merged − unmerged in {m}, over the directions the merged run serves from a merge.",
            "",
            "| Direction | Family | Δ | 95% interval | ΔBLEU | ΔchrF++ |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for d, r in result.merge.directions.items():
            fam = FAMILY_NAMES[Direction.parse(d).family]
            out.append(
                f"| {d} | {fam} | {_num(r.delta)} | {_interval_text(r)} | {_num(r.metric_deltas['bleu'])} "
                f"| {_num(r.metric_deltas['chrf'])} |"
            )
        out += ["", "| Family | Directions | Mean Δ | 95% interval |", "|---|---:|---:|---:|"]
        for f, r in result.merge.families.items():
            out.append(f"| {FAMILY_NAMES[f]} | {r.n_directions} | {_num(r.delta)} | {_interval_text(r)} |")
    out.append("")
    out += [f"![{name}]({name})" for name in plots]
    return "\n".join(out) + "\n"


def plot_deltas(rows: dict[str, DeltaRow], metric: str, title: str) -> Any:
    """Bars of Δ per direction coloured by family, error bars = the 95% interval, a zero line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    directions = list(rows)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.45 * len(directions)), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    deltas = [rows[d].delta for d in directions]
    # Clipped at 0: float noise can put Δ a hair outside its own interval.
    errors = [
        [max(0.0, rows[d].delta - rows[d].low) for d in directions],
        [max(0.0, rows[d].high - rows[d].delta) for d in directions],
    ]
    colours = [FAMILY_COLOURS[Direction.parse(d).family] for d in directions]
    ax.bar(range(len(directions)), deltas, color=colours, yerr=errors, capsize=3, ecolor="black")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(directions)), directions, rotation=90 if len(directions) > 12 else 0)
    ax.set_ylabel(f"Δ {METRIC_NAMES[metric]}")
    ax.set_title(title)
    present = [f for f in FAMILIES if any(Direction.parse(d).family == f for d in directions)]
    ax.legend(
        handles=[Patch(color=FAMILY_COLOURS[f], label=FAMILY_NAMES[f]) for f in present],
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    fig.tight_layout()
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_analysis(result: Analysis, out: str | Path) -> Path:
    """analysis.json, analysis.md and the plots in the directory `out`; returns analysis.json's path."""
    out = Path(out)
    metric = result.metric
    plots = {
        "delta_by_direction.png": plot_deltas(
            result.directions, metric, f"joint − separate, {METRIC_NAMES[metric]} (95% interval)"
        )
    }
    if result.merge is not None:
        plots["merge_degradation.png"] = plot_deltas(
            result.merge.directions, metric, f"merged − unmerged, {METRIC_NAMES[metric]} (95% interval)"
        )
    for name, fig in plots.items():
        artifacts.atomic_write_bytes(out / name, _png(fig))
    artifacts.atomic_write_text(out / "analysis.md", render_markdown(result, list(plots)))
    artifacts.atomic_write_json(out / "analysis.json", result.to_json())
    return out / "analysis.json"


__all__ = [
    "AnalysisError",
    "analyze",
    "check_comparable",
    "classify",
    "format_table",
    "load_run_texts",
    "merged_directions",
    "write_analysis",
]
