"""Does `auto` decide right? Each decision source against the multi-seed reference (issue 27).

At each budget (training pairs per direction; default 80 and 320) and each seed (default 1, 2, 3),
in the setting of `asymmetry_budget.py` (Gemma 3 270M, ALMA's human-written data, 5 languages,
1 epoch, lr 1e-3, the first N WMT'22 segments of 10 directions):

- **reference**: `separate` and `group_family` at every seed, compared by `datm analyze` with one
  run per seed per arm: Δ = joint − separate per direction, with the interval over seeds and test
  segments (`datm.analysis.seeds`). A direction is *significant* where that interval excludes 0;
  the right decision there is joint for Δ > 0, separate for Δ < 0.
- **each source** `auto` offers (`--sources`, default every one that measures: pilot, full_pilot,
  probe), run as
  `auto` runs it: a `strategy: auto` config with that `auto.source`, measured on the dev pairs
  (`data.valid`, and for Icelandic, which has none, `data.valid_holdout` training pairs held out of
  every training of the run; never the test split), then the full `auto` run. Per source: its
  decision per direction and seed (joint where the measurement is > auto.threshold), right / significant
  directions, agreement across seeds, cost (training examples processed, steps × batch, as a fraction
  of the `dat` run's, and wall seconds), and the auto run's test chrF++.
- **fixed strategies** `separate`, `group_family`, `dat`, `datm` at every seed, and the **oracle**:
  per direction the better of separate and group_family on the test split (seed means).

Writes results/auto_validity.{md,json,png}; the JSON has `seeds` and `summary: {budget: {significant,
default_right, auto_chrf, best_fixed_chrf, oracle_chrf, cost_fraction}}` (default_right: significant
directions the default source decides right at every seed). Adapters are shared through datm's
adapter cache (an auto run's separate and joint adapters are the fixed runs'). Resumable.

    python benchmarks/auto_validity.py [--budgets 80,320] [--seeds 1,2,3] [--sources pilot,full_pilot,probe]
    python benchmarks/auto_validity.py --smoke     # a few minutes: the code path, not a result
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import common

from datm import artifacts
from datm import config as C
from datm.analysis.results import Analysis
from datm.artifacts import RunDir
from datm.auto import sources
from datm.eval.results import RunScores
from datm.log import setup as setup_logging
from datm.run import runner

LANGS = ["de", "is", "cs", "ru", "zh"]
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"], "cjk": ["zh"]}
FIXED = ("separate", "group_family", "dat", "datm")
NAME = "auto_validity"
DEFAULT_SOURCE = C.AutoConfig().source
SMOKE = (
    "de and is only, budget 8, seeds 1 and 2, 3 dev/test segments of 16 tokens, valid_holdout 4, "
    "probe on 4 examples, under runs/auto_validity_smoke (results there too)"
)


def make_config(args: argparse.Namespace, budget: int, system: str, seed: int) -> C.Config:
    """A fixed strategy, or `auto:SOURCE`: an auto run deciding from that source."""
    strategy, _, source = system.partition(":")
    raw = common.alma_run_config(
        strategy,
        args.languages,
        {g: m for g, m in GROUPS.items() if set(m) <= set(args.languages)},
        run_dir(args, budget, system, seed),
        examples_per_pair=budget,
        test_size=args.test_size,
        executor=args.executor,
    )
    raw["data"]["valid"] = str(common.DATA_DIR / "valid.{xx}-en.jsonl")
    raw["data"]["valid_holdout"] = args.valid_holdout
    raw["train"]["seed"] = seed
    raw["eval"]["max_new_tokens"] = args.max_new_tokens
    if source:
        raw["auto"] = {"source": source, "probe_examples": args.probe_examples}
    return C.from_dict(raw, source=f"{NAME}:{system}@{budget}/seed{seed}")


def run_dir(args: argparse.Namespace, budget: int, system: str, seed: int) -> Path:
    return Path(args.work) / f"budget-{budget}" / system.replace(":", "-") / f"seed-{seed}"


def mean_chrf(path: Path) -> dict[str, float]:
    scores = RunScores.from_json(artifacts.read_json(RunDir(path).scores), RunDir(path).scores)
    return {d: r.chrf for d, r in scores.directions.items()}


def examples_processed(*runs: Path) -> int:
    """Training examples processed (steps × batch × accumulation) by the runs' adapters, each
    adapter once (the pilot's joint run hard-links the separate run's one-direction adapters)."""
    seen, total = set(), 0
    for run in runs:
        for info in sorted((run / "adapters").glob("*/train_info.json")):
            key = info.stat().st_ino
            if key in seen:
                continue
            seen.add(key)
            got = artifacts.read_json(info)
            t = got["train"]
            total += got["result"]["steps"] * t["batch_size"] * t["grad_accum"]
    return total


def measure_source(args: argparse.Namespace, budget: int, source: str, seed: int) -> dict[str, Any]:
    """`auto` with one source at one seed: its measurements (timed), its decisions, its full run."""
    cfg = make_config(args, budget, f"auto:{source}", seed)
    t0 = time.perf_counter()
    if sources.needs_measurements(cfg):
        sources.measure(cfg, runner.run)
    seconds = time.perf_counter() - t0
    plan = sources.build_plan(cfg)
    values = plan.decided_by["values"]
    decisions = {d: "joint" if v > cfg.auto.threshold else "separate" for d, v in values.items()}
    runner.run(cfg, executor=args.executor)
    out = Path(cfg.output_dir)
    cost = examples_processed(out / "pilot" / "separate", out / "pilot" / "joint")
    if source == "probe":  # one forward and backward pass per probed example and direction
        cost = args.probe_examples * len(values)
    return {
        "measurements": values,
        "decisions": decisions,
        "seconds": round(seconds, 1),
        "examples": cost,
        "chrf": mean_chrf(out),
    }


def reference(args: argparse.Namespace, budget: int) -> Analysis:
    """`datm analyze` of separate vs group_family, one run per seed per arm (the test split)."""
    from datm.analysis import analyze

    arms = {s: [run_dir(args, budget, s, seed) for seed in args.seeds] for s in ("separate", "group_family")}
    result = analyze.analyze(arms["separate"], arms["group_family"])
    analyze.write_analysis(result, Path(args.work) / f"budget-{budget}" / "reference")
    return result


def right_decision(row: Any) -> str | None:
    return {"synergy": "joint", "conflict": "separate"}.get(row.kind)


def score_source(ref: Analysis, got: dict[int, dict[str, Any]], dat_examples: float) -> dict[str, Any]:
    """A source against the reference: right on significant directions (per seed and at every
    seed), agreement across seeds, cost, and its auto runs' test chrF++."""
    significant = {d: right_decision(r) for d, r in ref.directions.items() if right_decision(r)}
    per_seed = {
        s: sum(g["decisions"].get(d) == want for d, want in significant.items()) for s, g in got.items()
    }
    every = sum(all(g["decisions"].get(d) == want for g in got.values()) for d, want in significant.items())
    directions = list(ref.directions)
    agree = sum(len({g["decisions"].get(d) for g in got.values()}) == 1 for d in directions)
    chrf = [v for g in got.values() for v in g["chrf"].values()]
    return {
        "right_every_seed": every,
        "right_per_seed": per_seed,
        "agreement_across_seeds": agree / len(directions),
        "cost_fraction": sum(g["examples"] for g in got.values()) / len(got) / dat_examples,
        "seconds": sum(g["seconds"] for g in got.values()) / len(got),
        "auto_chrf": sum(chrf) / len(chrf),
        "per_seed": {str(s): g for s, g in got.items()},
    }


def budget_summary(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """Everything one budget measures (every run finished)."""
    fixed = {s: [mean_chrf(run_dir(args, budget, s, seed)) for seed in args.seeds] for s in FIXED}
    fixed_chrf = {s: sum(sum(r.values()) / len(r) for r in runs) / len(runs) for s, runs in fixed.items()}
    seed_mean = {s: {d: sum(r[d] for r in fixed[s]) / len(fixed[s]) for d in fixed[s][0]} for s in fixed}
    oracle = [max(seed_mean["separate"][d], seed_mean["group_family"][d]) for d in seed_mean["separate"]]
    dat = [examples_processed(run_dir(args, budget, "dat", seed)) for seed in args.seeds]
    ref = reference(args, budget)
    got = {
        src: {seed: measure_source(args, budget, src, seed) for seed in args.seeds} for src in args.sources
    }
    per_source = {src: score_source(ref, g, sum(dat) / len(dat)) for src, g in got.items()}
    default = per_source.get(DEFAULT_SOURCE) or next(iter(per_source.values()))
    significant = [d for d, r in ref.directions.items() if right_decision(r)]
    return {
        "significant": len(significant),
        "significant_directions": significant,
        "default_source": DEFAULT_SOURCE,
        "default_right": default["right_every_seed"],
        "auto_chrf": default["auto_chrf"],
        "best_fixed_chrf": max(fixed_chrf.values()),
        "best_fixed": max(fixed_chrf, key=fixed_chrf.__getitem__),
        "oracle_chrf": sum(oracle) / len(oracle),
        "cost_fraction": default["cost_fraction"],
        "fixed_chrf": fixed_chrf,
        "sources": per_source,
        "reference": ref.to_json(),
    }


def main() -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(common.REPO_ROOT / "runs" / NAME), help="run directories")
    ap.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--budgets", type=ints, default=[80, 320])
    ap.add_argument("--seeds", type=ints, default=[1, 2, 3])
    ap.add_argument("--sources", type=lambda s: s.split(","), default=["pilot", "full_pilot", "probe"])
    ap.add_argument("--test-size", type=int, default=100, help="first N WMT'22 segments per direction")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--valid-holdout", type=int, default=200, help="data.valid_holdout (Icelandic's dev)")
    ap.add_argument("--probe-examples", type=int, default=32)
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--smoke", action="store_true", help=f"a few minutes: {SMOKE}")
    common.add_load_argument(ap)
    args = ap.parse_args()
    args.languages = LANGS
    if args.smoke:
        args.languages = ["de", "is"]
        args.budgets, args.seeds, args.test_size, args.max_new_tokens = [8], [1, 2], 3, 16
        args.valid_holdout, args.probe_examples = 4, 4
        args.work = str(common.REPO_ROOT / "runs" / f"{NAME}_smoke")
        args.results = Path(args.work) / "results"
        common.set_threads(1)
    setup_logging()
    load = common.check_load(args.allow_load, quick=args.smoke)
    t0 = time.perf_counter()
    for budget in args.budgets:
        for seed in args.seeds:
            for system in FIXED:
                runner.run(make_config(args, budget, system, seed), executor=args.executor)
    summary = {str(b): budget_summary(args, b) for b in args.budgets}
    record = {
        "benchmark": NAME,
        "command": " ".join(["python", *sys.argv]),
        "seeds": args.seeds,
        "summary": summary,
        "setting": {k: v for k, v in vars(args).items() if k not in ("work", "results")},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_check": load,
        "machine": common.machine_info(),
        "versions": artifacts.library_versions(),
    }
    record = common.write_study(args.results, NAME, record, render, plot)
    common.log(f"wrote {args.results / NAME}.{{json,md,png}}")
    return 0


def render(p: dict[str, Any]) -> str:
    out = [
        "# Does `auto` decide right? (Gemma 3 270M, ALMA human-written data)",
        "",
        f"Command: `{p['command']}`; seeds {p['seeds']}; wall time {p['wall_seconds']:.0f} s.",
        "",
    ]
    busy = common.load_markdown(p.get("load_check") or {})
    out += [busy, ""] if busy else []
    for budget, s in p["summary"].items():
        out += [
            f"## {budget} pairs per direction",
            "",
            f"Significant directions (seed-aware interval of group_family − separate excludes 0): "
            f"{s['significant']} ({', '.join(s['significant_directions']) or 'none'}).",
            "",
            "| source | right at every seed / significant | right per seed | agreement across seeds "
            "| cost (× dat's training) | seconds | auto test chrF++ |",
            "|---|---|---|---|---|---|---|",
        ]
        for src, r in s["sources"].items():
            per_seed = ", ".join(str(v) for v in r["right_per_seed"].values())
            out.append(
                f"| {src}{' (default)' if src == s['default_source'] else ''} | {r['right_every_seed']}"
                f" / {s['significant']} | {per_seed} | {r['agreement_across_seeds']:.0%} | "
                f"{r['cost_fraction']:.2f} | {r['seconds']:.0f} | {r['auto_chrf']:.2f} |"
            )
        out += ["", "| system | test chrF++ (mean over directions and seeds) |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in s["fixed_chrf"].items()]
        out += [
            f"| oracle | {s['oracle_chrf']:.2f} |",
            f"| auto (default source) | {s['auto_chrf']:.2f} |",
            "",
        ]
    return "\n".join(out) + "\n"


def plot(p: dict[str, Any]) -> bytes:
    """Test chrF++ per budget: every fixed strategy, each source's auto, the oracle."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(p["summary"]), squeeze=False)[0]
    for ax, (budget, s) in zip(axes, p["summary"].items(), strict=True):
        bars = {**s["fixed_chrf"], **{f"auto:{k}": r["auto_chrf"] for k, r in s["sources"].items()}}
        bars["oracle"] = s["oracle_chrf"]
        ax.bar(
            range(len(bars)),
            list(bars.values()),
            color=["tab:gray"] * len(s["fixed_chrf"]) + ["tab:blue"] * len(s["sources"]) + ["tab:green"],
        )
        ax.set_xticks(range(len(bars)), list(bars), rotation=60, fontsize="small")
        ax.set_ylim(min(bars.values()) - 2, max(bars.values()) + 1)
        ax.set_title(f"{budget} pairs per direction")
        ax.set_ylabel("test chrF++")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
