"""Does XX→En conflict grow with the training budget? The asymmetry at several budgets (issue 14).

At each budget (training pairs per direction), two systems see the same pairs, for the same epochs,
with the same seed schedule: `separate` (one adapter per direction) and `group_family` (one adapter
per group and family: the XX→En directions of a group train jointly, and so do its En→XX ones).
`multilingual` (one adapter for all ten directions) runs at the largest budget. Every system is an
ordinary `datm run` (Ray executor by default, a local cluster of --workers one-thread workers), and
each budget's Δ = joint − separate comes from `datm analyze` on the run directories. Every system
runs at each of --seeds (train.seed; default 1, 2, 3): `datm analyze` then takes one run per seed
per arm and reports the mean Δ with an interval over seeds and test segments
(`datm.analysis.seeds`), each seed's Δ beside it; with one seed, the segment bootstrap alone.

Adapters that two systems would train identically (group_family's one-language groups, e.g. {zh},
train the very adapter `separate` trains) are trained once: the runs share datm's adapter cache.

Resumable: run the same command again after a kill; finished runs are reused, not rebuilt.

    python benchmarks/asymmetry_budget.py [--budgets 20,80,320] [--seeds 1,2,3] [--test-size 100]
    python benchmarks/asymmetry_budget.py --smoke     # a few minutes: the code path, not a result
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
from datm.eval.results import RunScores
from datm.languages import FAMILIES, FAMILY_NAMES, by_family
from datm.log import setup as setup_logging
from datm.run import runner

LANGS = ["de", "is", "cs", "ru", "zh"]
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"], "cjk": ["zh"]}
JOINT = "group_family"
NAME = "asymmetry_budget"
SMOKE = (
    "budget 8, seeds 1 and 2, 3 test segments of 16 tokens, local executor, no multilingual, "
    "under runs/asymmetry_budget_smoke (results there too)"
)


def smoke(args: argparse.Namespace) -> None:
    """The code path end to end at a size of minutes: not a result (the results go beside the runs)."""
    args.budgets, args.seeds, args.test_size, args.max_new_tokens = [8], [1, 2], 3, 16
    args.executor, args.multilingual = "local", False
    args.work = str(common.REPO_ROOT / "runs" / f"{NAME}_smoke")
    args.results = Path(args.work) / "results"
    common.set_threads(1)


def make_config(args: argparse.Namespace, budget: int, system: str, seed: int) -> C.Config:
    raw = common.alma_run_config(
        system,
        LANGS,
        GROUPS,
        run_dir(args, budget, system, seed),
        examples_per_pair=budget,
        test_size=args.test_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        executor=args.executor,
    )
    raw["train"]["seed"] = seed
    raw["eval"]["max_new_tokens"] = args.max_new_tokens
    return C.from_dict(raw, source=f"{NAME}:{run_key(budget, system, seed)}")


def run_dir(args: argparse.Namespace, budget: int, system: str, seed: int) -> Path:
    """Seed 1 keeps the directory of the single-seed study, so its runs are reused."""
    return Path(args.work) / f"budget-{budget}" / (system if seed == 1 else f"{system}-seed{seed}")


def run_key(budget: int, system: str, seed: int) -> str:
    return f"{system}@{budget}" + ("" if seed == 1 else f"/seed{seed}")


def runs_to_do(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """Every seed of the cheapest budget first, then the largest (the most informative), then the
    ones between; multilingual (first seed only) last."""
    budgets = sorted(args.budgets)
    order = budgets[:1] + budgets[:0:-1] if len(budgets) > 1 else budgets
    todo = [(b, s, seed) for b in order for seed in args.seeds for s in ("separate", JOINT)]
    if args.multilingual:
        todo.append((max(budgets), "multilingual", args.seeds[0]))
    return todo


def analyze_budget(args: argparse.Namespace, budget: int, joint: str) -> Analysis | None:
    """`datm analyze --separate … --joint …` of one budget, one run per seed scored in both arms
    (None until a seed is)."""
    from datm.cli import main as datm

    seeds = [
        seed
        for seed in args.seeds
        if all(RunDir(run_dir(args, budget, s, seed)).scores.is_file() for s in ("separate", joint))
    ]
    if not seeds:
        return None
    out = Path(args.work) / f"budget-{budget}" / "analysis" / f"{joint}_vs_separate"
    runs = {s: [str(run_dir(args, budget, s, seed)) for seed in seeds] for s in ("separate", joint)}
    command = ["analyze", "--separate", *runs["separate"], "--joint", *runs[joint], "--out", str(out)]
    if datm(command) != 0:
        raise SystemExit(f"datm analyze failed for budget {budget} ({joint})")
    return Analysis.from_json(artifacts.read_json(out / "analysis.json"), out / "analysis.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(common.REPO_ROOT / "runs" / NAME), help="run directories")
    ap.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--budgets", type=ints, default=[20, 80, 320])
    ap.add_argument("--seeds", type=ints, default=[1, 2, 3], help="train.seed of every system's runs")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--test-size", type=int, default=100, help="first N WMT'22 segments per direction")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="the same at every budget and in every system")
    ap.add_argument("--executor", default="ray", choices=["local", "ray"])
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (one torch thread each)")
    ap.add_argument("--no-multilingual", dest="multilingual", action="store_false")
    ap.add_argument("--summarize-only", action="store_true", help="write results from the finished runs")
    ap.add_argument("--smoke", action="store_true", help=f"a few minutes: {SMOKE}")
    common.add_load_argument(ap)
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    setup_logging()  # datm's progress messages, as `datm run` shows them
    load = None if args.summarize_only else common.check_load(args.allow_load, quick=args.smoke)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings: dict[str, float] = artifacts.read_json(timings_path) if timings_path.is_file() else {}
    if not args.summarize_only:  # the command that made the runs, for the results of a later --summarize-only
        made_by = {"command": " ".join(["python", *sys.argv]), "load_check": load}
        artifacts.atomic_write_json(work / "command.json", made_by)
    if not args.summarize_only and args.executor == "ray":
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    for budget, system, seed in [] if args.summarize_only else runs_to_do(args):
        key = run_key(budget, system, seed)
        if RunDir(run_dir(args, budget, system, seed)).scores.is_file() and key in timings:
            common.log(f"{key}: done, reused")
            continue
        common.log(f"{key}: datm run")
        t0 = time.perf_counter()
        runner.run(make_config(args, budget, system, seed), executor=args.executor)
        # A run resumed after a kill counts only the time of the invocation that finished it.
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 1)
        artifacts.atomic_write_json(timings_path, timings)
        summarize(args, timings, load)
    if args.summarize_only and (work / "command.json").is_file():
        load = artifacts.read_json(work / "command.json").get("load_check")
    summarize(args, timings, load)
    return 0


def summarize(args: argparse.Namespace, timings: dict[str, float], load: dict[str, Any] | None) -> None:
    budgets = sorted(args.budgets)
    scores: dict[str, dict[str, Any]] = {}
    for budget, system, seed in runs_to_do(args):
        f = RunDir(run_dir(args, budget, system, seed)).scores
        if f.is_file():
            sc = RunScores.from_json(artifacts.read_json(f), f)
            scores[run_key(budget, system, seed)] = {
                "directions": {d: {"bleu": r.bleu, "chrf": r.chrf} for d, r in sc.directions.items()},
                "averages": sc.averages,
            }
    analyses: dict[str, Any] = {}
    for budget in budgets:
        a = analyze_budget(args, budget, JOINT)
        if a is not None:
            analyses[f"{JOINT}@{budget}"] = a.to_json()
    if args.multilingual:
        a = analyze_budget(args, max(budgets), "multilingual")
        if a is not None:
            analyses[f"multilingual@{max(budgets)}"] = a.to_json()
    missing = [run_key(*r) for r in runs_to_do(args) if run_key(*r) not in scores]
    record = {
        "benchmark": NAME,
        "command": run_command(args),
        "setting": {
            "model": "Gemma 3 270M (embedded GGUF, de-quantized)",
            "languages": LANGS,
            "groups": GROUPS,
            "joint_system": JOINT,
            "budgets_pairs_per_direction": budgets,
            "seeds": args.seeds,
            "max_new_tokens": args.max_new_tokens,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lora": {"r": 16, "alpha": 32},
            "test_segments_per_direction": args.test_size,
            "test_set": "WMT'22 general (first N segments per direction)",
            "executor": f"{args.executor} ({args.workers} workers x 1 torch thread)"
            if args.executor == "ray"
            else "local",
        },
        "scores": scores,
        "analyses": analyses,
        "missing_runs": missing,
        "wall_seconds": timings,
        "load_check": load,
        "machine": common.machine_info(),
        "versions": artifacts.library_versions(),
    }
    record = common.write_study(args.results, NAME, record, render, plot if analyses else None)
    common.log(f"wrote {args.results / NAME}.{{json,md,png}}")


def _has_partner(direction: str, system: str) -> bool:
    """Whether the joint system trains this direction together with another one."""
    if system != JOINT:
        return True
    lang = next(x for x in direction.split("-") if x != "en")
    return any(len(members) > 1 and lang in members for members in GROUPS.values())


def run_command(args: argparse.Namespace) -> str:
    made_by = Path(args.work) / "command.json"
    this = " ".join(["python", *sys.argv])
    if args.summarize_only and made_by.is_file():
        return f"{artifacts.read_json(made_by)['command']} (summarized by: {this})"
    return this


def _family_rows(record: dict[str, Any]) -> list[tuple[str, int, str, dict[str, Any]]]:
    rows = []
    for name, a in record["analyses"].items():
        system, budget = name.split("@")
        for fam, r in a["families"].items():
            rows.append((system, int(budget), fam, r))
    return sorted(rows, key=lambda x: (x[0] != JOINT, x[1], FAMILIES.index(x[2])))


def _per_seed(row: dict[str, Any]) -> str:
    return " ".join(f"{v:+.2f}" for v in (row.get("seed_deltas") or {}).values())


def render(p: dict[str, Any]) -> str:
    s = p["setting"]
    out = [
        "# Conflict and synergy against the training budget (Gemma 3 270M, ALMA human-written data)",
        "",
        f"Command: `{p['command']}`",
        "",
        f"Budgets (training pairs per direction): {s['budgets_pairs_per_direction']}; {s['epochs']:g} "
        f"epoch(s), batch {s['batch_size']}, lr {s['lr']:g} at every budget and in every system; seeds "
        f"{s.get('seeds', [1])}; LoRA "
        f"r {s['lora']['r']}; test: first {s['test_segments_per_direction']} WMT'22 segments of each of "
        f"10 directions. Joint system: `{s['joint_system']}` (one adapter per group and family). "
        f"Executor: {s['executor']}.",
        "",
    ]
    busy = common.load_markdown(p.get("load_check") or {})
    out += [busy, ""] if busy else []
    if p["missing_runs"]:
        out += [f"**Partial: not finished: {', '.join(p['missing_runs'])}** (the run resumes).", ""]
    out += [
        "## Δ chrF++ = joint − separate per family (mean over the family's directions and the seeds; "
        "95% interval over seeds and test segments, `datm analyze`: see `datm.analysis.seeds`)",
        "",
        "| joint system | budget | family | Δ | interval | kind | Δ per seed | mean Δ of the directions "
        "with a partner |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, budget, fam, r in _family_rows(p):
        rows = p["analyses"][f"{system}@{budget}"]["directions"]
        partnered = [rows[d]["delta"] for d in rows if d in by_family(rows)[fam] and _has_partner(d, system)]
        mean = f"{sum(partnered) / len(partnered):+.2f} ({len(partnered)})" if partnered else ""
        out.append(
            f"| {system} | {budget} | {FAMILY_NAMES[fam]} | {r['delta']:+.2f} | "
            f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r.get('kind', '')} | {_per_seed(r)} | {mean} |"
        )
    out += [
        "",
        "In `group_family`, a language alone in its group (zh) trains exactly `separate`'s adapter (the "
        "same one, from the adapter cache), so its Δ is 0 by construction; the family means of `datm "
        "analyze` include it, the last column leaves it out.",
        "",
    ]
    for name, a in p["analyses"].items():
        out += [f"## Per direction: {name.replace('@', ' at budget ')} vs separate (chrF++)", ""]
        out.append("| direction | separate | joint | Δ | interval | kind | Δ per seed | Δ BLEU |")
        out.append("|---|---|---|---|---|---|---|---|")
        for d, r in a["directions"].items():
            out.append(
                f"| {d} | {r['separate']:.2f} | {r['joint']:.2f} | {r['delta']:+.2f} | "
                f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r['kind']} | {_per_seed(r)} | "
                f"{r['bleu_delta']:+.2f} |"
            )
        out.append("")
    out += ["## Averages per run (BLEU / chrF++)", "", "| run | XX→En | En→XX |", "|---|---|---|"]
    for name, sc in p["scores"].items():
        av = sc["averages"]
        cells = [f"{av[f]['bleu']:.2f} / {av[f]['chrf']:.2f}" if f in av else "" for f in FAMILIES]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "## Wall time (s)", "", "| run | seconds |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in p["wall_seconds"].items()]
    return "\n".join(out) + "\n"


def plot(p: dict[str, Any]) -> bytes:
    """Δ per family against the budget (log scale), error bars = the 95% intervals, each seed's Δ a
    faint point."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from datm.analysis.analyze import FAMILY_COLOURS

    fig = Figure(figsize=(6.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = _family_rows(p)
    for i, fam in enumerate(FAMILIES):
        for system, marker, shift in ((JOINT, "o", -0.03), ("multilingual", "s", 0.03)):
            pts = sorted((b, r) for s, b, f, r in rows if s == system and f == fam)
            if not pts:
                continue
            xs = [b * (1 + shift + 0.02 * i) for b, _ in pts]
            ys = [r["delta"] for _, r in pts]
            err = [
                [max(0.0, r["delta"] - r["low"]) for _, r in pts],
                [max(0.0, r["high"] - r["delta"]) for _, r in pts],
            ]
            for x, (_, r) in zip(xs, pts, strict=True):  # each seed's Δ
                seeds = list((r.get("seed_deltas") or {}).values())
                ax.scatter([x] * len(seeds), seeds, color=FAMILY_COLOURS[fam], s=12, alpha=0.5, marker=marker)
            label = f"{FAMILY_NAMES[fam]}, {'group (per family)' if system == JOINT else 'multilingual'}"
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker=marker,
                capsize=4,
                color=FAMILY_COLOURS[fam],
                label=label,
                linestyle="-" if system == JOINT else "none",
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    budgets = p["setting"]["budgets_pairs_per_direction"]
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(budgets) / 1.6, max(budgets) * 1.6)
    ax.set_xlabel("training pairs per direction")
    ax.set_ylabel("Δ chrF++ (joint − separate)")
    ax.set_title("Synergy (> 0) and conflict (< 0) against the training budget")
    ax.legend(fontsize="small", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
