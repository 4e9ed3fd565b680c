"""The paper's experiment at CPU scale, on real data (issue 4).

Gemma 3 270M, ALMA's human-written data (cs, de, is, ru, zh <-> en; groups {de, is}, {cs, ru},
{zh}), seven systems with the same data budget per direction (every adapter sees each example of
its directions `--epochs` times), scored on the first N WMT'22 test segments of every direction.

Resumable: every system is an ordinary datm run directory under --work; run the same command again
after a kill. Adapters that two systems would train identically (same directions, data, seed and
budget) are trained once, through datm's adapter cache (`adapter_cache` in every system's config):
dat's XX->En adapters are separate's, datm reuses dat's, separate_merged reuses separate's.

    python benchmarks/asymmetry_cpu.py [--examples-per-pair 100] [--test-size 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import common

from datm import artifacts
from datm import config as C
from datm.artifacts import RunDir
from datm.languages import EN_XX, XX_EN
from datm.log import setup as setup_logging
from datm.run import runner

ROOT = common.REPO_ROOT
DATA = common.DATA_DIR
LANGS = ["de", "is", "cs", "ru", "zh"]
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"], "cjk": ["zh"]}
SYSTEMS = ["zero_shot", "multilingual", "separate", "group", "dat", "datm", "separate_merged"]
# system -> donor: its adapters of the same directions, data and budget come from datm's adapter
# cache (trained once), and so the directions it serves with them translate identically.
SHARED = {"dat": "separate", "datm": "dat", "separate_merged": "separate"}


def make_config(args: argparse.Namespace, strategy: str) -> C.Config:
    raw = common.alma_run_config(
        strategy,
        LANGS,
        GROUPS,
        Path(args.work) / strategy,
        examples_per_pair=args.examples_per_pair,
        test_size=args.test_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        merge={"method": "ties", "density": args.density},
    )
    return C.from_dict(raw, source=f"asymmetry_cpu:{strategy}")


def share_translations(work: Path, system: str) -> None:
    """A direction served by the same adapter (from datm's adapter cache) in this system and its
    donor translates identically (greedy, same batches): reuse the donor's finished translation."""
    if system not in SHARED:
        return
    donor = SHARED[system]
    from datm.plan import make_plan

    mine, theirs = make_plan(system, LANGS, GROUPS), make_plan(donor, LANGS, GROUPS)
    adapters = {a.name for a in mine.adapters}
    for d, module in mine.routes.items():
        src_files, dst_files = RunDir(work / donor).translations(d), RunDir(work / system).translations(d)
        if module in adapters and theirs.routes.get(d) == module and src_files.hyp.is_file():
            dst_files.hyp.parent.mkdir(parents=True, exist_ok=True)
            for kind in ("src", "ref", "hyp"):
                if not dst_files.of(kind).exists():
                    shutil.copyfile(src_files.of(kind), dst_files.of(kind))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", default=str(ROOT / "runs" / "asymmetry_cpu"), help="run directories (resumable)"
    )
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--examples-per-pair", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--test-size", type=int, default=50)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--summarize-only", action="store_true", help="write results from the systems finished so far"
    )
    common.add_load_argument(ap)
    args = ap.parse_args()
    setup_logging()  # datm's progress messages, as `datm run` shows them
    args.load_check = None if args.summarize_only else common.check_load(args.allow_load)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = artifacts.read_json(timings_path) if timings_path.is_file() else {}
    for system in [] if args.summarize_only else args.systems.split(","):
        share_translations(work, system)
        if RunDir(work / system).scores.is_file() and system in timings:
            print(f"{system}: done, reused")
            continue
        t0 = time.perf_counter()
        runner.run(make_config(args, system))
        timings[system] = round(time.perf_counter() - t0, 1)
        artifacts.atomic_write_json(timings_path, timings)
    summarize(args, work, timings)
    return 0


def summarize(args: argparse.Namespace, work: Path, timings: dict[str, float]) -> None:
    from datm.analysis import analyze
    from datm.auto import probe

    results = Path(args.results)
    systems = {}
    for system in SYSTEMS:
        f = RunDir(work / system).scores
        if f.is_file():
            sc = artifacts.read_json(f)
            systems[system] = {"directions": sc["directions"], "averages": sc["averages"]}
    analyses = {}
    if {"separate", "multilingual"} <= set(systems):
        analyses["multilingual_vs_separate"] = analyze.analyze(work / "separate", work / "multilingual")
    if {"separate", "group"} <= set(systems):
        analyses["group_vs_separate"] = analyze.analyze(work / "separate", work / "group")
    merge = {}
    if {"dat", "datm"} <= set(systems):
        merge["datm_vs_dat"] = analyze.analyze(
            work / "separate", work / "group", merged=work / "datm", unmerged=work / "dat"
        ).get("merge")
    if {"separate", "separate_merged"} <= set(systems):
        merge["separate_merged_vs_separate"] = analyze.analyze(
            work / "separate", work / "group", merged=work / "separate_merged", unmerged=work / "separate"
        ).get("merge")
    for name, res in analyses.items():
        analyze.write_analysis(res, work / "analysis" / name)
    probe_file = RunDir(work).probe_result  # the probe of the runs' setting, beside them
    if not probe_file.is_file() and not args.summarize_only:
        t0 = time.perf_counter()
        probe.probe_config(make_config(args, "dat"), probe_file.parent)
        timings["probe"] = round(time.perf_counter() - t0, 1)
    probe_res = artifacts.read_json(probe_file) if probe_file.is_file() else None
    payload = {
        "command": " ".join(["python"] + sys.argv),
        "setting": {
            "model": "Gemma 3 270M (embedded GGUF, de-quantized)",
            "languages": LANGS,
            "groups": GROUPS,
            "examples_per_pair": args.examples_per_pair,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "merge_density": args.density,
            "test_segments_per_direction": args.test_size,
            "test_set": "WMT'22 general (first N segments)",
        },
        "systems": systems,
        "missing_systems": [s for s in SYSTEMS if s not in systems],
        "asymmetry": analyses,
        "merge_degradation": merge,
        "probe": probe_res,
        "wall_seconds": timings,
        "load_check": args.load_check,
        "versions": artifacts.library_versions(),
    }
    payload = common.repo_relative(payload)
    results.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(results / "asymmetry_cpu.json", payload)
    artifacts.atomic_write_text(results / "asymmetry_cpu.md", render(payload))
    print(render(payload))


def render(p: dict[str, Any]) -> str:
    dirs = [f"{x}-en" for x in LANGS] + [f"en-{x}" for x in LANGS]
    out = ["# Conflict and synergy at CPU scale (Gemma 3 270M, ALMA human-written data)", ""]
    out += [f"Command: `{p['command']}`", "", "Setting: " + json.dumps(p["setting"]), ""]
    busy = common.load_markdown(p.get("load_check") or {})
    out += [busy, ""] if busy else []
    if p["missing_systems"]:
        out += [f"**Partial: not finished yet: {', '.join(p['missing_systems'])}** (the run resumes).", ""]
    for metric in ("bleu", "chrf"):
        out += [f"## {metric.upper() if metric == 'bleu' else 'chrF++'} per direction", ""]
        out.append("| system | " + " | ".join(dirs) + " | avg xx-en | avg en-xx |")
        out.append("|---" * (len(dirs) + 3) + "|")
        for name, s in p["systems"].items():
            cells = " | ".join(f"{s['directions'][d][metric]:.2f}" for d in dirs)
            av = s["averages"]
            out.append(f"| {name} | {cells} | {av[XX_EN][metric]:.2f} | {av[EN_XX][metric]:.2f} |")
        out.append("")
    for name, a in p["asymmetry"].items():
        out += [f"## Asymmetry: {name} (Δ chrF++ = joint − separate, 95% bootstrap interval)", ""]
        out.append("| direction | Δ | interval | kind |")
        out.append("|---|---|---|---|")
        for d, r in a["directions"].items():
            out.append(f"| {d} | {r['delta']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] | {r['kind']} |")
        for fam, r in a["families"].items():
            out.append(
                f"| **{fam}** | {r['delta']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] | {r['kind']} |"
            )
        out.append("")
    for name, m in p["merge_degradation"].items():
        if not m:
            continue
        out += [f"## Merge degradation: {name} (Δ chrF++ = merged − unmerged)", ""]
        out.append("| direction | Δ | interval |")
        out.append("|---|---|---|")
        for d, r in m["directions"].items():
            out.append(f"| {d} | {r['delta']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] |")
        for fam, r in m["families"].items():
            out.append(
                f"| **{fam}** | {r['delta']:+.2f} | [{r.get('low', float('nan')):+.2f}, "
                f"{r.get('high', float('nan')):+.2f}] |"
            )
        out.append("")
    if p["probe"]:
        pr = p["probe"]
        out += ["## Gradient probe (cosine of LoRA-B gradients, whole model, before training)", ""]
        out.append("| | " + " | ".join(pr["directions"]) + " |")
        out.append("|---" * (len(pr["directions"]) + 1) + "|")
        for d, row in zip(pr["directions"], pr["matrix"], strict=True):
            out.append(f"| {d} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
        out.append("")
    out += ["## Wall time (s)", "", "| step | seconds |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in p["wall_seconds"].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
