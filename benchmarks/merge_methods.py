"""Which merge method for LoRA updates? Every registered method on real adapters, over several
training seeds and with a group of four languages (issues 13 and 24).

The separate XX->En adapters of the CPU asymmetry setting (Gemma 3 270M from the demo's GGUF,
ALMA's human-written data, 80 pairs per language pair, 1 epoch, lr 1e-3 cosine, LoRA r=16) are
trained with datm itself once per training seed (`train.seed` changes the adapters' initialisation
and data order, so every seed has adapters of its own; the adapter cache shares them between the
groupings). Each seed's adapters are merged in two groupings: today's two groups of two
({de, is}, {cs, ru}) and one group of four ({de, is, cs, ru}), each under a config with
`merge: {method: auto}` whose candidates are every method × the λ grid (`--scales`) at one adapter's
size (`--rank`). datm's candidate scoring (what the merge task of `datm run` does) merges each group
with every candidate (`RUN/candidates/GROUP/CANDIDATE/module`) and scores it on the dev set (the
valid split; Icelandic has none, so a held-out slice of its training data that training does not
use). Per method and group, λ is the grid's best on dev; auto's pick is the best candidate overall.
The test set (the first N WMT'22 segments of the 4 XX->En directions) is then translated with the
unmerged adapters, each method at its chosen λ, and auto's pick; reported: chrF++ mean ± std over
seeds, Δ vs unmerged per seed with paired bootstrap (chrF++) per direction, the λ each method chose,
and how stable the methods' ranking is across seeds (Kendall τ between every two seeds). Writes
benchmarks/results/merge_methods.{md,json,png}; the JSON keeps `seeds` (list) and `groups`
(name -> languages).

Each (seed, grouping) is one job: run here one after another (`--executor local`), or fanned out
over Ray (`--executor ray [--address ...]`, `--job-cpus` per job; adapters trained once through the
adapter cache's claims). Resumable: adapters, merges and dev translations are datm artifacts; every
test translation is a file under --work; run the same command again after a kill.

    python benchmarks/merge_methods.py [--seeds 1,2,3] [--groupings pairs,four] [--methods ties,...]
        [--scales 0.5,0.75,1,1.5] [--rank 16] [--test-size 100] [--executor local|ray]
    python benchmarks/merge_methods.py --smoke     # a few minutes: 2 seeds, 8 pairs, 3 segments
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common

from datm import artifacts, data
from datm import config as C
from datm.artifacts import RunDir
from datm.auto import build_plan
from datm.config import candidates
from datm.eval import evaluate, significance
from datm.eval.worker import Worker
from datm.languages import Direction
from datm.merge import select as merge_select
from datm.run import runner
from datm.run.bodies import test_pairs

ROOT = common.REPO_ROOT
DATA = common.DATA_DIR
# grouping -> its groups (name -> languages); a language is in one group of a grouping
GROUPINGS = {
    "pairs": {"germanic": ["de", "is"], "slavic": ["cs", "ru"]},
    "four": {"xx4": ["de", "is", "cs", "ru"]},
}
LANGS = ["de", "is", "cs", "ru"]
DIRECTIONS = [f"{x}-en" for x in LANGS]
UNMERGED = "unmerged"
AUTO = "auto"
SMOKE = {
    "seeds": "1,2",
    "methods": "ties,iso_c",
    "scales": "0.5,1",
    "examples_per_pair": 8,
    "test_size": 3,
    "dev_size": 3,
    "max_new_tokens": 16,
}


def numbers(spec: str, kind: type, what: str) -> list[Any]:
    try:
        values = [kind(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise common.BenchError(f"--{what}: expected comma-separated numbers, got {spec!r}") from None
    if not values:
        raise common.BenchError(f"--{what}: expected at least one value")
    return values


def make_config(args: argparse.Namespace, seed: int, grouping: str) -> C.Config:
    """One seed's run of one grouping: merge auto over every method × λ at --rank and --density."""
    data = Path(args.data)
    raw = common.alma_run_config(
        "datm",
        LANGS,
        GROUPINGS[grouping],
        Path(args.work) / f"seed{seed}" / grouping / "run",
        examples_per_pair=args.examples_per_pair,
        test_size=args.test_size,
        epochs=args.epochs,
        lr=args.lr,
        data={
            "train": str(data / "train.{xx}-en.jsonl"),
            "valid": str(data / "valid.{xx}-en.jsonl"),
            "test": str(data / "test.{src}-{tgt}.jsonl"),
        },
        merge={
            "method": "auto",
            "candidates": {
                "methods": args.methods,
                "densities": [args.density],
                "ranks": [args.rank],
                "scales": args.scales,
            },
            "dev_size": args.dev_size,
        },
    )
    raw["train"]["seed"] = seed
    if args.max_new_tokens is not None:
        raw["eval"]["max_new_tokens"] = args.max_new_tokens
    return C.from_dict(raw, source=f"merge_methods seed {seed} {grouping}")


def group_of(grouping: str, direction: str) -> str:
    return next(g for g, members in GROUPINGS[grouping].items() if direction.split("-")[0] in members)


def translate_tests(
    cfg: C.Config,
    worker: Worker,
    work: Path,
    mods: dict[str, dict[str, tuple[str, Path]]],
    tests: dict[str, list[data.Pair]],
) -> dict[str, dict[str, list[str]]]:
    """Test hypotheses of every system and direction, translated as datm's translate task does (same
    model dtype, batch size and decoding as the dev translations); each a file under --work, reused.
    `mods`: system -> direction -> (the module's key, its folder); files are kept per key, so systems
    that share a module (auto and its pick) share its translations. Each file is claimed while it is
    made: calls running side by side share the work, a file another call is making is left to the
    second pass."""
    from datm import device
    from datm.eval.translate import Request, Translator, inference_dtype

    def path(key: str, d: str) -> Path:
        return work / f"test-{len(tests[d])}" / key / f"{d}.hyp.txt"  # keyed by the test size

    todo = [(key, d, m) for by_dir in mods.values() for d, (key, m) in by_dir.items()]
    for wait in (False, True):
        for system, d, module in todo:
            f = path(system, d)
            if f.is_file():
                continue
            lock = f.with_name(f.name + ".lock")
            lock.parent.mkdir(parents=True, exist_ok=True)
            held = artifacts.claim(lock, f"test {system} {d}") if wait else artifacts.try_claim(lock, "test")
            if held is None:
                continue
            with held:
                if f.is_file():  # made by another call while this one waited
                    continue
                model = worker.model(inference_dtype(cfg.eval.precision, device.current()))
                tr = Translator(model, worker.tokenizer, {"m": module}, cfg.prompt)
                out = tr.translate(
                    [Request(Direction.parse(d), p.src) for p in tests[d]],
                    {d: "m"},
                    beams=cfg.eval.beams,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.batch_size,
                    progress=False,
                )
                tr.model.unload()
                artifacts.atomic_write_text(f, data.write_text(out))
                print(f"[{time.strftime('%H:%M:%S')}] translated {d} with {system}", flush=True)
    return {
        s: {d: evaluate.read_lines(path(key, d)) for d, (key, _) in by_dir.items()}
        for s, by_dir in mods.items()
    }


def note(timings: dict[str, Any], key: str, t0: float) -> None:
    """This call's wall time of a step (a resumed call times only the work it did)."""
    timings[key] = round(time.perf_counter() - t0, 1)


def calls(work: Path) -> list[dict[str, Any]]:
    """Every call's command, start, load and step times (`work/calls/*.json`), oldest first: calls may
    resume one another or run side by side, so their times are listed, not added."""
    return [artifacts.read_json(f) for f in sorted((work / "calls").glob("*.json"))]


def compare(a: list[str], b: list[str], refs: list[str], samples: int) -> dict[str, float]:
    r = significance.paired_bootstrap(a, b, refs, "en", metric="chrf", n_samples=samples)
    return {"delta": round(r.delta, 3), "p": round(r.p_value, 4)}


def chosen_per_method(selection: dict[str, Any]) -> dict[str, str]:
    """method -> its candidate with the best dev mean chrF++ (λ chosen on dev; ties: the earlier)."""
    best: dict[str, dict[str, Any]] = {}
    for row in selection["candidates"]:
        if row["method"] not in best or row["mean_chrf"] > best[row["method"]]["mean_chrf"]:
            best[row["method"]] = row
    return {m: row["candidate"] for m, row in best.items()}


def run_job(args: argparse.Namespace, seed: int, grouping: str) -> dict[str, Any]:
    """One seed × one grouping: train (cache), merge and score every candidate on dev, choose λ per
    method, translate the test set with the chosen modules; the per-seed scores."""
    common.set_threads(args.threads)
    cfg = make_config(args, seed, grouping)
    run, groups = RunDir(cfg.output_dir), GROUPINGS[grouping]
    timings: dict[str, Any] = {"seed": seed, "grouping": grouping}
    t0 = time.perf_counter()
    for d in DIRECTIONS:
        runner.run(cfg, executor="local", only=f"train:{d}")
    note(timings, "train_s", t0)
    t0 = time.perf_counter()
    plan, worker = build_plan(cfg), Worker(cfg)
    selections = {
        g: merge_select.score_candidates(cfg, plan, run, f"xx-en.{g}", worker).to_json() for g in groups
    }
    note(timings, "merge_and_dev_s", t0)
    picks = {g: chosen_per_method(sel) for g, sel in selections.items()}
    auto = {g: sel["chosen"] for g, sel in selections.items()}

    def modules(pick: dict[str, str]) -> dict[str, tuple[str, Path]]:
        """direction -> (key, folder) of its group's candidate `pick[group]`."""
        chosen = {d: (group_of(grouping, d), pick[group_of(grouping, d)]) for d in DIRECTIONS}
        return {d: (f"{g}/{c}", run.candidate_module(f"xx-en.{g}", c)) for d, (g, c) in chosen.items()}

    mods = {UNMERGED: {d: (UNMERGED, run.adapter(d)) for d in DIRECTIONS}, AUTO: modules(auto)}
    mods.update({m: modules({g: picks[g][m] for g in groups}) for m in args.methods})
    tests = {d: test_pairs(cfg, Direction.parse(d)) for d in DIRECTIONS}
    t0 = time.perf_counter()
    hyps = translate_tests(cfg, worker, Path(args.work) / f"seed{seed}" / grouping, mods, tests)
    note(timings, "test_translation_s", t0)
    refs = {d: [p.tgt for p in tests[d]] for d in DIRECTIONS}
    systems = {}
    for system in mods:
        per_dir = {}
        for d in DIRECTIONS:
            s = evaluate.score_direction(hyps[system][d], refs[d], "en")
            row: dict[str, Any] = {"bleu": round(s.bleu, 2), "chrf": round(s.chrf, 2)}
            if system != UNMERGED:
                row["vs_unmerged"] = compare(hyps[UNMERGED][d], hyps[system][d], refs[d], args.samples)
            per_dir[d] = row
        systems[system] = {
            "candidates": {g: picks[g].get(system) or auto[g] for g in groups}
            if system != UNMERGED
            else None,
            "directions": per_dir,
            "mean_chrf": round(statistics.fmean(r["chrf"] for r in per_dir.values()), 3),
        }
    dev = {g: {r["candidate"]: r["mean_chrf"] for r in sel["candidates"]} for g, sel in selections.items()}
    return {"seed": seed, "grouping": grouping, "systems": systems, "dev_mean_chrf": dev, "timings": timings}


def scale_of(candidate: str) -> float:
    """λ from a candidate's name (`…-s0.5`; none: 1)."""
    last = candidate.rsplit("-", 1)[-1]
    return float(last[1:]) if last.startswith("s") and last[1:].replace(".", "", 1).isdigit() else 1.0


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's τ-a between two rankings of the same items (1: same order, −1: reversed)."""
    pos_a, pos_b = {x: i for i, x in enumerate(a)}, {x: i for i, x in enumerate(b)}
    pairs = list(itertools.combinations(a, 2))
    if not pairs:
        return 1.0
    score = sum(1 if (pos_a[x] - pos_a[y]) * (pos_b[x] - pos_b[y]) > 0 else -1 for x, y in pairs)
    return score / len(pairs)


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 3),
        "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
    }


def aggregate(args: argparse.Namespace, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per grouping: each system's mean chrF++ and Δ vs unmerged, mean ± std over seeds; the λ each
    method chose; the methods' ranking per seed and its stability (Kendall τ between seeds)."""
    out: dict[str, Any] = {}
    for grouping in args.groupings:
        runs = sorted((j for j in jobs if j["grouping"] == grouping), key=lambda j: j["seed"])
        systems = list(runs[0]["systems"])
        table = {}
        for system in systems:
            means = [j["systems"][system]["mean_chrf"] for j in runs]
            deltas = [j["systems"][system]["mean_chrf"] - j["systems"][UNMERGED]["mean_chrf"] for j in runs]
            significant = [
                sum(
                    1
                    for r in j["systems"][system]["directions"].values()
                    if r.get("vs_unmerged") and r["vs_unmerged"]["p"] < 0.05
                )
                for j in runs
            ]
            cands = [j["systems"][system]["candidates"] for j in runs]
            table[system] = {
                "mean_chrf": mean_std(means),
                "delta_vs_unmerged": mean_std(deltas),
                "per_seed_mean_chrf": means,
                "significant_directions_per_seed": significant,
                "scales_chosen": [{g: scale_of(c) for g, c in x.items()} if x else None for x in cands],
                "candidates_per_seed": cands,
            }
        rankings = {
            j["seed"]: sorted(args.methods, key=lambda m, j=j: -j["systems"][m]["mean_chrf"]) for j in runs
        }
        taus = [kendall_tau(rankings[a], rankings[b]) for a, b in itertools.combinations(rankings, 2)]
        merged = [s for s in systems if s != UNMERGED]
        best = max(merged, key=lambda s: table[s]["mean_chrf"]["mean"])
        gap = table[best]["delta_vs_unmerged"]["mean"]
        out[grouping] = {
            "groups": GROUPINGS[grouping],
            "systems": table,
            "rankings": {str(k): v for k, v in rankings.items()},
            "kendall_tau": {"pairs": taus, "mean": round(statistics.fmean(taus), 3) if taus else None},
            "best": {"system": best, "delta_vs_unmerged": gap, "within_0.3": gap >= -0.3},
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "merge_methods"), help="resumable work folder")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--data", default=str(DATA), help="ALMA human-written data folder")
    ap.add_argument("--seeds", default="1,2,3", help="training seeds (each trains its own adapters)")
    ap.add_argument("--groupings", default="pairs,four", help=f"of {list(GROUPINGS)}")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--scales", default="0.5,0.75,1,1.5", help="the λ grid, chosen per method on dev")
    ap.add_argument("--rank", type=int, default=16, help="rank of every merged module (one adapter's size)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--test-size", type=int, default=100, help="first N WMT'22 segments per direction")
    ap.add_argument("--dev-size", type=int, default=100, help="dev sentences per direction")
    ap.add_argument("--examples-per-pair", type=int, default=80)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="decoding cap (default: the config's)")
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: torch's)")
    ap.add_argument("--executor", choices=["local", "ray"], default="local", help="how the jobs run")
    ap.add_argument("--address", default=None, help="ray: the cluster's address (default: start one here)")
    ap.add_argument("--job-cpus", type=float, default=1.0, help="ray: CPUs per (seed, grouping) job")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run that goes end to end: {SMOKE}")
    common.add_load_argument(ap)
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.work = str(Path(args.work) / "smoke")
        args.results = str(Path(args.work) / "results")
    args.load_check = common.check_load(args.allow_load)
    args.seeds = numbers(args.seeds, int, "seeds")
    args.scales = numbers(args.scales, float, "scales")
    args.groupings = [g for g in args.groupings.split(",") if g]
    unknown = sorted(set(args.groupings) - set(GROUPINGS))
    if unknown:
        raise common.BenchError(f"--groupings: unknown {unknown}; expected some of {list(GROUPINGS)}")
    registered = candidates.registered_methods()
    args.methods = args.methods.split(",") if isinstance(args.methods, str) else registered
    unknown = sorted(set(args.methods) - set(registered))
    if unknown:
        raise common.BenchError(f"--methods: unknown merge methods {unknown}")
    work = Path(args.work)
    started = time.strftime("%Y%m%dT%H%M%S")
    timings: dict[str, Any] = {"command": " ".join(sys.argv[1:]), "started": started, "load": args.load_check}
    t0 = time.perf_counter()
    todo = list(itertools.product(args.seeds, args.groupings))
    if args.executor == "ray":
        import ray

        paths = [str(common.BENCH_DIR), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        ray.init(
            address=args.address,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
        )
        remote = ray.remote(num_cpus=args.job_cpus)(run_job)
        jobs = ray.get([remote.remote(args, seed, grouping) for seed, grouping in todo])
    else:
        jobs = [run_job(args, seed, grouping) for seed, grouping in todo]
    note(timings, "wall_s", t0)
    timings["jobs"] = [j["timings"] for j in jobs]
    artifacts.atomic_write_json(work / "calls" / f"{started}-{os.getpid()}.json", timings)
    payload = summarize(args, jobs, calls(work))
    write(Path(args.results), payload)
    return 0


def summarize(
    args: argparse.Namespace, jobs: list[dict[str, Any]], timings: list[dict[str, Any]]
) -> dict[str, Any]:
    groups = {g: members for grouping in args.groupings for g, members in GROUPINGS[grouping].items()}
    return {
        "benchmark": "merge_methods",
        "command": " ".join(["python", *sys.argv]),
        "seeds": args.seeds,
        "groups": groups,
        "groupings": {g: list(GROUPINGS[g]) for g in args.groupings},
        "setting": {
            "model": "Gemma 3 270M (demo GGUF, de-quantized)",
            "examples_per_pair": args.examples_per_pair,
            "epochs": args.epochs,
            "lr": args.lr,
            "schedule": "cosine",
            "lora_r": 16,
            "methods": args.methods,
            "rank": args.rank,
            "density": args.density,
            "scales": args.scales,
            "test_segments_per_direction": args.test_size,
            "dev_sentences_per_direction": args.dev_size,
            "test_set": "WMT'22 (ALMA test files), first N segments",
            "bootstrap_samples": args.samples,
            "executor": args.executor,
        },
        "results": aggregate(args, jobs),
        "per_seed": jobs,
        "calls": timings,
        "load_check": args.load_check,
        "machine": {**common.machine_info(), "versions": artifacts.library_versions()},
    }


def render(p: dict[str, Any]) -> str:
    out = ["# Merge methods on real adapters over seeds (Gemma 3 270M, ALMA, XX→En)", ""]
    out += [f"Command: `{p['command']}`", ""]
    out += [f"Seeds: {p['seeds']}; groups: {p['groups']}", ""]
    out += ["Setting: " + ", ".join(f"{k}={v}" for k, v in p["setting"].items()), ""]
    for grouping, r in p["results"].items():
        b = r["best"]
        verdict = "within" if b["within_0.3"] else "not within"
        out += [
            f"## {grouping}: {r['groups']}",
            "",
            f"**Closest merge: {b['system']}, Δ {b['delta_vs_unmerged']:+.2f} chrF++ vs unmerged (mean over "
            f"seeds): {verdict} 0.3.** Ranking stability (Kendall τ between seeds): mean "
            f"{r['kendall_tau']['mean']}, pairs {r['kendall_tau']['pairs']}.",
            "",
            "| system | mean chrF++ (± std over seeds) | Δ vs unmerged (± std) | λ chosen on dev, per seed "
            "| directions with p < 0.05 vs unmerged, per seed |",
            "|---|---|---|---|---|",
        ]
        rows = sorted(r["systems"].items(), key=lambda kv: -kv[1]["mean_chrf"]["mean"])
        for system, x in rows:
            lam = (
                "–"
                if system == UNMERGED
                else "; ".join(", ".join(f"{g} {v:g}" for g, v in per.items()) for per in x["scales_chosen"])
            )
            sig = (
                "–" if system == UNMERGED else ", ".join(str(n) for n in x["significant_directions_per_seed"])
            )
            chrf, delta = x["mean_chrf"], x["delta_vs_unmerged"]
            out.append(
                f"| {system} | {chrf['mean']:.2f} ± {chrf['std']:.2f} "
                f"| {delta['mean']:+.2f} ± {delta['std']:.2f} | {lam} | {sig} |"
            )
        out += [
            "",
            "Ranking per seed: " + "; ".join(f"seed {s}: {', '.join(m)}" for s, m in r["rankings"].items()),
        ]
        out.append("")
    out += ["![chrF++ over seeds](merge_methods.png)", "", "## The calls that made it", ""]
    for c in p["calls"]:
        steps = ", ".join(f"{k} {v}" for k, v in c.items() if k.endswith("_s"))
        out.append(f"- {c['started']} `{c['command']}`: {steps or 'unfinished'}")
        for j in c.get("jobs", []):
            job_steps = ", ".join(f"{k} {v}" for k, v in j.items() if k.endswith("_s"))
            out.append(f"  - seed {j['seed']} {j['grouping']}: {job_steps}")
    return "\n".join(out) + "\n"


def plot(p: dict[str, Any], path: Path) -> None:
    """Mean chrF++ ± std over seeds per system, one panel per grouping; the unmerged level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groupings = list(p["results"])
    fig, axes = plt.subplots(1, len(groupings), figsize=(5.5 * len(groupings), 4.5), dpi=110, squeeze=False)
    for ax, grouping in zip(axes[0], groupings, strict=True):
        table = p["results"][grouping]["systems"]
        names = sorted((s for s in table if s != UNMERGED), key=lambda s: -table[s]["mean_chrf"]["mean"])
        ys = [table[s]["mean_chrf"]["mean"] for s in names]
        errs = [table[s]["mean_chrf"]["std"] for s in names]
        ax.errorbar(range(len(names)), ys, yerr=errs, fmt="o", capsize=3)
        ax.axhline(table[UNMERGED]["mean_chrf"]["mean"], ls="--", color="0.4", label="unmerged")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{grouping}: {', '.join(p['results'][grouping]['groups'])}")
        ax.set_ylabel(f"mean chrF++ over seeds {p['seeds']} (± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: Path, payload: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload = common.repo_relative(payload)
    artifacts.atomic_write_json(results / "merge_methods.json", payload)
    artifacts.atomic_write_text(results / "merge_methods.md", render(payload))
    plot(payload, results / "merge_methods.png")
    print(render(payload))


if __name__ == "__main__":
    sys.exit(main())
