"""Which merge method for LoRA updates? Every registered method on real adapters (issue 13).

The separate XX->En adapters of the CPU asymmetry setting (Gemma 3 270M from the demo's GGUF,
ALMA's human-written data, groups {de, is} and {cs, ru}, 80 pairs per language pair, 1 epoch,
lr 1e-3 cosine, LoRA r=16) are trained with datm itself, under a config with
`merge: {method: auto}` whose candidates are every method x rank. datm's candidate scoring (what
the merge task of `datm run` does before publishing) merges each group with every candidate
(`RUN/candidates/GROUP/CANDIDATE/module`) and scores it on the dev set (the valid split; Icelandic
has none, so a held-out slice of its training data that training does not use): auto's pick.
This script then translates the first N WMT'22 test segments of the 4 XX->En directions with the
unmerged adapters and with every candidate, and reports BLEU, chrF++, paired bootstrap (chrF++)
against `unmerged` and against `ties` at the same rank, shipped MB, merge seconds, and auto's pick
per group with its test score. Writes benchmarks/results/merge_methods.{md,json,png}.

Resumable: adapters, merges and dev translations are datm artifacts; every test translation is a
file under --work; run the same command again after a kill.

    python benchmarks/merge_methods.py [--methods ties,...] [--ranks 16,64[=ties+cat]] [--test-size 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import common

from datm import artifacts, auto, data
from datm import config as C
from datm.artifacts import RunDir
from datm.config import candidates
from datm.eval import evaluate, significance
from datm.languages import Direction
from datm.merge import select as merge_select
from datm.run import runner
from datm.run.bodies import Worker

ROOT = common.REPO_ROOT
DATA = common.DATA_DIR
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"]}
LANGS = [x for members in GROUPS.values() for x in members]
DIRECTIONS = [f"{x}-en" for x in LANGS]
UNMERGED = "unmerged"


def parse_ranks(spec: str, methods: list[str]) -> dict[int, list[str]]:
    """--ranks: `16,64` (every method at each rank) or `16,64=ties+cat` (at 64 only those methods)."""
    out: dict[int, list[str]] = {}
    for item in spec.split(","):
        rank, _, only = item.partition("=")
        try:
            r = int(rank)
        except ValueError:
            raise common.BenchError(f"--ranks: expected RANK or RANK=METHOD+METHOD, got {item!r}") from None
        chosen = only.split("+") if only else methods
        unknown = sorted(set(chosen) - set(candidates.registered_methods()))
        if unknown:
            raise common.BenchError(f"--ranks {item}: unknown merge methods {unknown}")
        out[r] = chosen
    return out


def candidate_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """merge.candidates as a list: each rank's methods (--ranks) at --density."""
    return [
        {"method": m, "density": args.density, "rank": r}
        for r, methods in args.ranks.items()
        for m in methods
    ]


def make_config(
    args: argparse.Namespace, methods: list[str] | None = None, ranks: list[int] | None = None
) -> C.Config:
    """The setting's config; its merge candidates are the grid `methods` x `ranks` when given, else
    --ranks' candidates."""
    data = Path(args.data)
    raw = common.alma_run_config(
        "datm",
        LANGS,
        GROUPS,
        Path(args.work) / "run",
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
            "candidates": (
                {"methods": methods, "densities": [args.density], "ranks": ranks}
                if methods and ranks
                else candidate_rows(args)
            ),
            "dev_size": args.dev_size,
        },
    )
    return C.from_dict(raw, source="merge_methods")


def group_of(direction: str) -> str:
    return next(g for g, members in GROUPS.items() if direction.split("-")[0] in members)


def systems(run: RunDir, cands: list[candidates.Candidate]) -> dict[str, dict[str, Path]]:
    """system -> direction -> the module that serves it."""
    out = {UNMERGED: {d: run.adapter(d) for d in DIRECTIONS}}
    for c in cands:
        out[c.name] = {d: run.candidate_module(f"xx-en.{group_of(d)}", c.name) for d in DIRECTIONS}
    return out


def translate_tests(
    cfg: C.Config,
    worker: Worker,
    work: Path,
    mods: dict[str, dict[str, Path]],
    tests: dict[str, list[data.Pair]],
) -> dict[str, dict[str, list[str]]]:
    """Test hypotheses of every system and direction, translated as datm's translate task does (same
    model dtype, batch size and decoding as the dev translations); each a file under --work, reused.
    Each file is claimed while it is made: calls running side by side (say one per --ranks) share the
    work, a file another call is making is left to the second pass."""
    from datm import device
    from datm.eval.translate import Request, Translator, inference_dtype

    def path(system: str, d: str) -> Path:
        return work / f"test-{len(tests[d])}" / system / f"{d}.hyp.txt"  # keyed by the test size

    todo = [(s, d, m) for s, by_dir in mods.items() for d, m in by_dir.items()]
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
    return {s: {d: evaluate.read_lines(path(s, d)) for d in by_dir} for s, by_dir in mods.items()}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "merge_methods"), help="resumable work folder")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--data", default=str(DATA), help="ALMA human-written data folder")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument(
        "--ranks", default="16,64", help="ranks of the candidates: 16,64 (every method) or 16,64=ties+cat"
    )
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--test-size", type=int, default=100, help="first N WMT'22 segments per direction")
    ap.add_argument("--dev-size", type=int, default=100, help="dev sentences per direction for auto")
    ap.add_argument("--examples-per-pair", type=int, default=80)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    common.add_load_argument(ap)
    args = ap.parse_args()
    args.load_check = common.check_load(args.allow_load)
    common.set_threads(args.threads)
    args.methods = args.methods.split(",") if args.methods else candidates.registered_methods()
    args.ranks = parse_ranks(args.ranks, args.methods)
    work = Path(args.work)
    # Training does not depend on the candidates (only on merge auto's held-out dev slice), so the
    # run is trained under a fixed candidate list: a later call with other --methods or --ranks (or
    # one beside it) reuses it.
    train_cfg = make_config(args, methods=["ties"], ranks=[16])
    cfg = make_config(args)
    run = RunDir(cfg.output_dir)
    started = time.strftime("%Y%m%dT%H%M%S")
    timings_file = work / "calls" / f"{started}-{os.getpid()}.json"
    timings: dict[str, Any] = {"command": " ".join(sys.argv[1:]), "started": started, "load": args.load_check}

    t0 = time.perf_counter()
    for d in DIRECTIONS:
        runner.run(train_cfg, only=f"train:{d}")
    note(timings, "train_s", t0)
    t0 = time.perf_counter()
    plan, worker = auto.build_plan(cfg), Worker(cfg)
    # every candidate merged and scored on the dev set: auto's choice, as `datm run` makes it
    selections = {g: merge_select.score_candidates(cfg, plan, run, f"xx-en.{g}", worker) for g in GROUPS}
    note(timings, "merge_and_dev_s", t0)
    artifacts.atomic_write_json(timings_file, timings)

    cands = candidates.config_candidates(cfg)
    tests = {d: runner.test_pairs(cfg, Direction.parse(d)) for d in DIRECTIONS}
    t0 = time.perf_counter()
    hyps = translate_tests(cfg, worker, work, systems(run, cands), tests)
    note(timings, "test_translation_s", t0)
    artifacts.atomic_write_json(timings_file, timings)
    payload = summarize(args, cfg, run, cands, tests, hyps, selections, calls(work))
    write(Path(args.results), payload)
    return 0


def summarize(
    args: argparse.Namespace,
    cfg: C.Config,
    run: RunDir,
    cands: list[candidates.Candidate],
    tests: dict[str, list[data.Pair]],
    hyps: dict[str, dict[str, list[str]]],
    selections: dict[str, dict[str, Any]],
    timings: list[dict[str, Any]],
) -> dict[str, Any]:
    refs = {d: [p.tgt for p in tests[d]] for d in DIRECTIONS}
    infos = {
        c.name: {
            g: artifacts.read_json(run.candidate_module(f"xx-en.{g}", c.name) / "merge_info.json")
            for g in GROUPS
        }
        for c in cands
    }
    adapter_bytes = {d: (run.adapter(d) / "adapter_model.safetensors").stat().st_size for d in DIRECTIONS}
    rows = []
    for system in [UNMERGED] + [c.name for c in cands]:
        cand = next((c for c in cands if c.name == system), None)
        per_dir = {}
        for d in DIRECTIONS:
            s = evaluate.score_direction(hyps[system][d], refs[d], "en")
            row = {"bleu": round(s.bleu, 2), "chrf": round(s.chrf, 2)}
            if system != UNMERGED:
                row["vs_unmerged"] = compare(hyps[UNMERGED][d], hyps[system][d], refs[d], args.samples)
                ties = candidates.Candidate("ties", args.density, cand.rank if cand else None).name
                if ties in hyps and ties != system:
                    row["vs_ties"] = compare(hyps[ties][d], hyps[system][d], refs[d], args.samples)
            per_dir[d] = row
        if cand is None:
            shipped = sum(adapter_bytes.values()) / len(GROUPS)
            seconds = 0.0
        else:
            shipped = sum(i["bytes"] for i in infos[system].values()) / len(GROUPS)
            seconds = sum(i["seconds"] for i in infos[system].values())
        rows.append(
            {
                "system": system,
                "method": cand.method if cand else UNMERGED,
                "rank": next(iter(infos[system].values()))["rank"] if cand else 16,  # as shipped
                "directions": per_dir,
                "mean_bleu": round(sum(r["bleu"] for r in per_dir.values()) / len(per_dir), 2),
                "mean_chrf": round(sum(r["chrf"] for r in per_dir.values()) / len(per_dir), 2),
                "shipped_mb_per_group": round(shipped / 1e6, 3),
                "merge_seconds_both_groups": round(seconds, 2),
            }
        )
    auto = {}
    for g, members in GROUPS.items():
        sel = selections[g]
        chosen = next(r for r in rows if r["system"] == sel["chosen"])
        dirs = [f"{x}-en" for x in members]
        auto[g] = {
            "chosen": sel["chosen"],
            "dev": sel["dev"],
            "dev_mean_chrf": next(
                r["mean_chrf"] for r in sel["candidates"] if r["candidate"] == sel["chosen"]
            ),
            "test_chrf": {d: chosen["directions"][d]["chrf"] for d in dirs},
            "test_mean_chrf": round(sum(chosen["directions"][d]["chrf"] for d in dirs) / len(dirs), 2),
        }
    unmerged = rows[0]["mean_chrf"]
    best = max(rows[1:], key=lambda r: r["mean_chrf"])
    return {
        "benchmark": "merge_methods",
        "command": " ".join(["python", *sys.argv]),
        "setting": {
            "model": "Gemma 3 270M (demo GGUF, de-quantized)",
            "groups": GROUPS,
            "examples_per_pair": args.examples_per_pair,
            "epochs": args.epochs,
            "lr": args.lr,
            "schedule": "cosine",
            "lora_r": 16,
            "methods": args.methods,
            "ranks": {str(r): m for r, m in args.ranks.items()},
            "density": args.density,
            "form": cfg.merge.form,
            "test_segments_per_direction": args.test_size,
            "dev_sentences_per_direction": args.dev_size,
            "test_set": "WMT'22 (ALMA test files), first N segments",
            "bootstrap_samples": args.samples,
        },
        "rows": rows,
        "auto": auto,
        "headline": {
            "unmerged_mean_chrf": unmerged,
            "best": best["system"],
            "best_mean_chrf": best["mean_chrf"],
            "gap_to_unmerged": round(best["mean_chrf"] - unmerged, 2),
        },
        "calls": timings,
        "load_check": args.load_check,
        "machine": {"versions": artifacts.library_versions()},
    }


def _delta(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    star = "*" if r["p"] < 0.05 else ""
    return f"{r['delta']:+.2f}{star}"


def render(p: dict[str, Any]) -> str:
    out = ["# Merge methods on real adapters (Gemma 3 270M, ALMA, XX→En)", ""]
    out += [
        f"Command: `{p['command']}`",
        "",
        "Setting: " + ", ".join(f"{k}={v}" for k, v in p["setting"].items()),
    ]
    h = p["headline"]
    out += [
        "",
        f"**Best merge: {h['best']} at {h['best_mean_chrf']:.2f} mean chrF++, {h['gap_to_unmerged']:+.2f} "
        f"vs unmerged ({h['unmerged_mean_chrf']:.2f}).**",
        "",
        "chrF++ per direction; Δ = merged − reference (chrF++, paired bootstrap, * p < 0.05).",
        "",
    ]
    head = ["system", "MB/group", "merge s"] + DIRECTIONS + ["mean chrF++", "mean BLEU"]
    head += [f"Δ unmerged {d}" for d in DIRECTIONS] + [f"Δ ties {d}" for d in DIRECTIONS]
    out += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in p["rows"]:
        dr = r["directions"]
        cells = [r["system"], f"{r['shipped_mb_per_group']:.2f}", f"{r['merge_seconds_both_groups']:.1f}"]
        cells += [f"{dr[d]['chrf']:.2f}" for d in DIRECTIONS]
        cells += [f"{r['mean_chrf']:.2f}", f"{r['mean_bleu']:.2f}"]
        cells += [_delta(dr[d].get("vs_unmerged")) for d in DIRECTIONS]
        cells += [_delta(dr[d].get("vs_ties")) for d in DIRECTIONS]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## auto's pick per group (chosen on the dev set; test scores)", ""]
    out += [
        "| group | chosen | dev mean chrF++ | dev sets | test chrF++ | test mean |",
        "|---|---|---|---|---|---|",
    ]
    for g, a in p["auto"].items():
        dev = ", ".join(f"{d}: {v['n']} {v['source']}" for d, v in a["dev"].items())
        test = ", ".join(f"{d} {v:.2f}" for d, v in a["test_chrf"].items())
        out.append(
            f"| {g} | {a['chosen']} | {a['dev_mean_chrf']:.2f} | {dev} | {test} | {a['test_mean_chrf']:.2f} |"
        )
    out += [
        "",
        "![quality vs size](merge_methods.png)",
        "",
        "## The calls that made it (wall seconds of what each call did; calls may overlap)",
        "",
    ]
    for c in p["calls"]:
        steps = ", ".join(f"{k} {v}" for k, v in c.items() if k.endswith("_s"))
        load = c["load"]["load_average_1min"]
        out.append(f"- {c['started']} `{c['command']}`: {steps or 'unfinished'}; load at start {load}")
    return "\n".join(out) + "\n"


def plot(p: dict[str, Any], path: Path) -> None:
    """Mean chrF++ against shipped MB. Methods of one rank ship the same MB, so each size's labels
    are stacked beside its points (best on top) with a line to each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = p["rows"]
    ys = [r["mean_chrf"] for r in rows]
    span = max(max(ys) - min(ys), 1.0)
    step = span / max(len(rows), 6) * 1.6
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    clusters: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        clusters.setdefault(round(r["shipped_mb_per_group"], 1), []).append(r)
    gap = (max(clusters) - min(clusters)) * 0.05 + 1  # labels stand right of their points
    for mb, members in clusters.items():
        members.sort(key=lambda r: -r["mean_chrf"])
        mid = sum(r["mean_chrf"] for r in members) / len(members)
        for i, r in enumerate(members):
            unmerged = r["system"] == UNMERGED
            ax.scatter(mb, r["mean_chrf"], color=colors[r["method"]], marker="*" if unmerged else "o", s=80)
            label = "unmerged (2 adapters)" if unmerged else f"{r['method']} r{r['rank']}"
            y = mid + (len(members) / 2 - i - 0.5) * step
            ax.annotate(
                f"{label}  {r['mean_chrf']:.2f}",
                (mb, r["mean_chrf"]),
                xytext=(mb + gap, y),
                textcoords="data",
                fontsize=8,
                ha="left",
                va="center",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
            )
    xs = list(clusters)
    ax.set_xlim(min(xs) - 2, max(xs) + (max(xs) - min(xs)) * 0.35 + 8)
    ax.set_ylim(min(ys) - step * len(rows) / 2 - 0.5, max(ys) + step * len(rows) / 2 + 0.5)
    ax.set_xlabel("shipped MB per group (XX→En module)")
    ax.set_ylabel("mean chrF++, 4 XX→En directions (WMT'22)")
    ax.set_title("Merge methods: quality vs size")
    ax.grid(alpha=0.3)
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
