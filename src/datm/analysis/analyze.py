"""Asymmetry analysis: where does joint training help (synergy) and where does it hurt (conflict)?

Compares run directories of the same languages and test data (reads plan.json and translations/
only, so it works on runs made elsewhere):

- per direction, Δ = score(joint) − score(separate), where "joint" is a multilingual or group run,
  with a 95% paired-bootstrap interval over the test segments (`datm.significance`); given several
  runs per arm (the same config at different `train.seed`s), Δ is the mean of the per-seed Δs and
  the interval a t interval over the seeds that also carries the segments' noise
  (`datm.analysis.seeds`, which says why), each seed's Δ reported beside it;
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
from datm.analysis.results import SEEDS, SEGMENTS, Analysis, DeltaRow, FamilyDelta, MergeDegradation, RunRef
from datm.analysis.seeds import seed_interval
from datm.analysis.view import RunError, RunView
from datm.artifacts import RunDir
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

    def family_samples(self, directions: list[str]) -> tuple[np.ndarray, str]:
        """Bootstrap samples of the mean Δ over `directions`, and how they were resampled.

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
        return np.mean(samples, axis=0), "joint" if joint else "independent"

    def family(self, directions: list[str], classified: bool) -> FamilyDelta:
        """Mean Δ over a family's directions, with a bootstrap interval of that mean
        (`family_samples`)."""
        samples, resampling = self.family_samples(directions)
        low, high = interval(samples)
        delta = float(np.mean([self.boots[d].delta for d in directions]))
        kind = classify(delta, low, high) if classified else None
        return FamilyDelta(delta, low, high, kind, len(directions), resampling)

    def rows(
        self, directions: list[str], classified: bool
    ) -> tuple[dict[str, DeltaRow], dict[str, FamilyDelta]]:
        rows = {d: self.row(d, classified) for d in directions}
        families = {f: self.family(ds, classified) for f, ds in by_family(directions).items()}
        return rows, families


@dataclass
class _SeededComparison:
    """The same comparison at several training seeds: one `_Comparison` per seed (run b of a seed
    against run a of the same seed), Δ the mean over seeds with the interval of `datm.analysis.seeds`.
    With one seed it is that seed's `_Comparison`, unchanged."""

    per_seed: dict[str, _Comparison]  # seed label -> its comparison

    def rows(
        self, directions: list[str], classified: bool
    ) -> tuple[dict[str, DeltaRow], dict[str, FamilyDelta]]:
        got = {s: c.rows(directions, classified) for s, c in self.per_seed.items()}
        if len(got) == 1:
            return next(iter(got.values()))
        rows = {d: self._row(d, {s: r[0][d] for s, r in got.items()}, classified) for d in directions}
        families = {
            f: self._family(f, ds, {s: r[1][f] for s, r in got.items()}, classified)
            for f, ds in by_family(directions).items()
        }
        return rows, families

    def _segment_samples(self, directions: list[str]) -> np.ndarray:
        """Bootstrap samples of the mean over seeds of the mean Δ over `directions`: each seed's
        samples come from the same index draw (every seed is scored on the same segments)."""
        return np.mean([c.family_samples(directions)[0] for c in self.per_seed.values()], axis=0)

    def _row(self, d: str, seeds: dict[str, DeltaRow], classified: bool) -> DeltaRow:
        deltas = {s: r.delta for s, r in seeds.items()}
        got = seed_interval(list(deltas.values()), self._segment_samples([d]))
        first = next(iter(seeds.values()))
        scores = {role: float(np.mean([r.scores[role] for r in seeds.values()])) for role in first.scores}
        metric_deltas = {m: float(np.mean([r.metric_deltas[m] for r in seeds.values()])) for m in METRICS}
        kind = classify(got.delta, got.low, got.high) if classified else None
        return DeltaRow(got.delta, got.low, got.high, got.p_value, scores, metric_deltas, kind, deltas)

    def _family(
        self, family: str, directions: list[str], seeds: dict[str, FamilyDelta], classified: bool
    ) -> FamilyDelta:
        deltas = {s: r.delta for s, r in seeds.items()}
        got = seed_interval(list(deltas.values()), self._segment_samples(directions))
        kind = classify(got.delta, got.low, got.high) if classified else None
        resampling = next(iter(seeds.values())).resampling
        return FamilyDelta(got.delta, got.low, got.high, kind, len(directions), resampling, deltas)


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


Runs = str | Path | Sequence[str | Path]  # one run directory, or one per training seed


def run_seed(path: Path) -> str | None:
    """A run's training seed (train.seed in its config.json), or None without a config.json."""
    file = RunDir(path).config
    if not file.is_file():
        return None
    seed = artifacts.read_json(file).get("train", {}).get("seed")
    return None if seed is None else str(seed)


def load_arms(arms: dict[str, Runs]) -> dict[str, dict[str, RunTexts]]:
    """role -> seed label -> that seed's run. The runs of an arm are the same config at different
    train.seed; arms are paired by seed (config.json), or by position where a run has no config.json.
    Every arm must have the same seeds, each once."""
    paths = {
        role: [Path(r) for r in ([runs] if isinstance(runs, str | Path) else runs)]
        for role, runs in arms.items()
    }
    counts = {role: len(ps) for role, ps in paths.items()}
    if min(counts.values()) < 1:
        raise AnalysisError(f"every arm needs at least one run, got {counts}")
    seeds = {role: [run_seed(p) for p in ps] for role, ps in paths.items()}
    by_seed = all(s is not None for ss in seeds.values() for s in ss) and max(counts.values()) > 1
    out: dict[str, dict[str, RunTexts]] = {}
    for role, ps in paths.items():
        labels = [str(s) for s in seeds[role]] if by_seed else [str(i + 1) for i in range(len(ps))]
        for label in set(labels):
            if labels.count(label) > 1:
                twins = [str(p) for p, x in zip(ps, labels, strict=True) if x == label]
                raise AnalysisError(f"{role} runs {twins} are the same seed ({label}); give one run per seed")
        out[role] = {x: load_run_texts(p, role) for x, p in zip(labels, ps, strict=True)}
    first_role, first = next(iter(out.items()))
    for role, runs in out.items():
        if set(runs) != set(first):
            what = "seeds (train.seed in config.json)" if by_seed else "numbers of runs"
            raise AnalysisError(
                f"the {role} runs and the {first_role} runs have different {what}: "
                f"{sorted(runs)} vs {sorted(first)}; each seed needs a run in every arm"
            )
    return {role: {x: runs[x] for x in first} for role, runs in out.items()}


def _comparison(
    arms: dict[str, dict[str, RunTexts]], a: str, b: str, metric: str, n_samples: int, seed: int
) -> _SeededComparison:
    return _SeededComparison(
        {x: _Comparison(run, arms[b][x], metric, n_samples, seed) for x, run in arms[a].items()}
    )


def analyze(
    separate: Runs,
    joint: Runs,
    merged: Runs | None = None,
    unmerged: Runs | None = None,
    metric: str = "chrf",
    n_samples: int = 1000,
    seed: int = 12345,
) -> Analysis:
    """The asymmetry analysis of the given runs (see the module docstring); what analysis.json holds.

    Each arm is one run directory, or several: the same config at different training seeds
    (`train.seed`), paired across arms by seed. With several, Δ is the mean over seeds and its
    interval includes training variance (`datm.analysis.seeds`); each seed's Δ is reported beside it.
    `metric` ("chrf" or "bleu") gives Δ, its interval and the classification; both metrics' point
    deltas are reported as `bleu_delta` and `chrf_delta`.
    """
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if (merged is None) != (unmerged is None):
        raise AnalysisError("merge degradation needs both a merged and an unmerged run (or neither)")
    if n_samples < 1:
        raise AnalysisError(f"n_samples must be >= 1, got {n_samples}")
    given = {"separate": separate, "joint": joint, "merged": merged, "unmerged": unmerged}
    arms = load_arms({role: runs for role, runs in given.items() if runs is not None})
    check_comparable([run for runs in arms.values() for run in runs.values()])
    sep = next(iter(arms["separate"].values()))
    # XX→En first, then En→XX, each in the separate run's order
    order = [d for ds in by_family(sep.refs).values() for d in ds]
    rows, families = _comparison(arms, "separate", "joint", metric, n_samples, seed).rows(order, True)
    merge = None
    if "merged" in arms:
        affected = set.intersection(
            *(set(merged_directions(m, arms["unmerged"][x])) for x, m in arms["merged"].items())
        )
        comparison = _comparison(arms, "unmerged", "merged", metric, n_samples, seed)
        merge = MergeDegradation(*comparison.rows([d for d in order if d in affected], classified=False))
    seeds = list(arms["separate"])
    several = len(seeds) > 1
    refs = {
        (f"{role}:{x}" if several else role): RunRef(str(r.path), r.strategy)
        for role, runs in arms.items()
        for x, r in runs.items()
    }
    return Analysis(
        metric,
        n_samples,
        seed,
        refs,
        rows,
        families,
        merge,
        seeds=seeds if several else None,
        interval=SEEDS if several else SEGMENTS,
    )


# ----------------------------------------------------------------------------------- rendering


def _num(value: float) -> str:
    return f"{value:+.2f}"


def _interval_text(row: DeltaRow | FamilyDelta) -> str:
    return f"[{row.low:+.2f}, {row.high:+.2f}]"


def _seeds_text(row: DeltaRow | FamilyDelta) -> str:
    """Each seed's Δ (empty for one run per arm)."""
    return " ".join(_num(v) for v in (row.seed_deltas or {}).values())


def _interval_words(result: Analysis) -> str:
    if result.seeds is None:
        return f"95% paired bootstrap, {result.n_samples} resamples"
    return f"95% t interval over seeds {', '.join(result.seeds)} and the test segments"


def format_table(result: Analysis) -> str:
    """Plain-text tables for the terminal."""
    m = METRIC_NAMES[result.metric]
    lines = [f"joint − separate, {m} ({_interval_words(result)})"]
    per_seed = " per seed" if result.seeds else ""
    lines.append(
        f"{'direction':<10} {'separate':>9} {'joint':>9} {'Δ':>7} {'95% interval':>17} {'kind':<9}"
        f" {'ΔBLEU':>7} {'ΔchrF++':>8}{per_seed}"
    )
    for d, r in result.directions.items():
        lines.append(
            f"{d:<10} {r.scores['separate']:>9.2f} {r.scores['joint']:>9.2f} {_num(r.delta):>7} "
            f"{_interval_text(r):>17} {r.kind:<9} {_num(r.metric_deltas['bleu']):>7} "
            f"{_num(r.metric_deltas['chrf']):>8} {_seeds_text(r)}".rstrip()
        )
    for f, r in result.families.items():
        lines.append(
            f"{FAMILY_NAMES[f] + ' mean':<10} {'':>9} {'':>9} {_num(r.delta):>7} {_interval_text(r):>17} "
            f"{r.kind:<9} ({r.n_directions} directions) {_seeds_text(r)}".rstrip()
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


def _interval_method(result: Analysis) -> str:
    if result.seeds is None:
        return (
            f"95% interval from {result.n_samples} paired bootstrap resamples of the test segments "
            f"(seed {result.seed}; one training seed per arm: training variance is not in it)."
        )
    return (
        f"Δ is the mean over training seeds {', '.join(result.seeds)} (each seed's Δ beside it); 95% "
        "interval Δ ± t(0.975, ν)·sqrt(s²/n + se²), s the spread of the per-seed Δs, se the standard "
        f"error of the mean Δ over {result.n_samples} paired bootstrap resamples of the test segments "
        f"(seed {result.seed}), ν Welch–Satterthwaite's degrees of freedom (n−1 where the seeds disagree)."
    )


def render_markdown(result: Analysis, plots: Sequence[str]) -> str:
    m = METRIC_NAMES[result.metric]
    runs = result.runs
    out = ["# Asymmetry analysis", ""]
    for role, run in runs.items():
        out.append(f"- {role}: `{run.path}` ({run.strategy or 'no plan.json'})")
    out += [
        "",
        f"Δ = joint − separate in {m}; {_interval_method(result)} conflict: Δ < 0 and the interval "
        "excludes 0; synergy: Δ > 0 and the interval excludes 0; otherwise neutral.",
        "",
        "## Per direction",
        "",
        f"| Direction | Family | Separate {m} | Joint {m} | Δ | 95% interval | Kind | ΔBLEU | ΔchrF++ "
        "| Δ per seed |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for d, r in result.directions.items():
        fam = FAMILY_NAMES[Direction.parse(d).family]
        out.append(
            f"| {d} | {fam} | {r.scores['separate']:.2f} | {r.scores['joint']:.2f} | {_num(r.delta)} "
            f"| {_interval_text(r)} | {r.kind} | {_num(r.metric_deltas['bleu'])} "
            f"| {_num(r.metric_deltas['chrf'])} | {_seeds_text(r)} |"
        )
    out += [
        "",
        "## Per family",
        "",
        "| Family | Directions | Mean Δ | 95% interval | Kind | Δ per seed |",
        "|---|---:|---:|---:|---|---|",
    ]
    for f, r in result.families.items():
        out.append(
            f"| {FAMILY_NAMES[f]} | {r.n_directions} | {_num(r.delta)} | {_interval_text(r)} | {r.kind} "
            f"| {_seeds_text(r)} |"
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
    for i, d in enumerate(directions):  # each seed's Δ as a point over the bar of their mean
        seeds = list((rows[d].seed_deltas or {}).values())
        ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
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
