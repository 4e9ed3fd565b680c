"""Which form should a merged module take? Measured on translation quality (issue 7).

Takes the `separate` system of the CPU asymmetry benchmark (one LoRA per direction, Gemma 3 270M,
real ALMA data), TIES-merges each group's XX->En adapters ({de, is}, {cs, ru}) in every form
(lowrank at several ranks, factor, dense, sparse) and densities, and scores the merged modules on
the same WMT'22 segments as the unmerged adapters. Reports BLEU/chrF++ per direction, bytes on
disk, parameters, merge time and load time; writes benchmarks/results/merge_forms.{json,md,png}.

    python benchmarks/merge_forms.py [--work runs/asymmetry_cpu] [--test-size 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import common

from datm import artifacts, data, models
from datm.artifacts import RunDir
from datm.eval import evaluate
from datm.eval.translate import Request, Translator
from datm.languages import Direction
from datm.merge import merge_adapters

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"]}


def variants(ranks: list[int], densities: list[float]) -> list[dict[str, Any]]:
    out = []
    for d in densities:
        out += [{"form": "lowrank", "rank": r, "density": d} for r in ranks]
        out += [{"form": f, "rank": None, "density": d} for f in ("factor", "dense", "sparse")]
    return out


def label(v: dict[str, Any]) -> str:
    r = f"-r{v['rank']}" if v["rank"] else ""
    return f"{v['form']}{r}-d{v['density']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "asymmetry_cpu"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--test-size", type=int, default=30)
    ap.add_argument("--ranks", default="16,64,256")
    ap.add_argument("--densities", default="0.2,0.5")
    common.add_load_argument(ap)
    args = ap.parse_args()
    args.load_check = common.check_load(args.allow_load)
    work = Path(args.work)
    sep = RunDir(work / "separate")
    needed = [sep.adapter(f"{x}-en") for g in GROUPS.values() for x in g]
    if not all(artifacts.is_done(a) for a in needed):
        raise SystemExit(f"{sep.root}: XX->En adapters not finished; run benchmarks/asymmetry_cpu.py first")
    cfg = artifacts.read_json(sep.config)
    out = work / "merge_forms"
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(x) for x in args.ranks.split(",")]
    densities = [float(x) for x in args.densities.split(",")]

    model_path = models.resolve(cfg.get("base_model"))
    tok = models.load_tokenizer(model_path)
    base = models.load_model(model_path)
    directions = [Direction(x, "en") for g in GROUPS.values() for x in g]
    tests = {
        d: data.read_direction(cfg["data"]["test"], d, split="test")[: args.test_size] for d in directions
    }
    refs = {d: [p.tgt for p in tests[d]] for d in directions}

    def score(modules: dict[str, Path], routes: dict[str, str]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        tr = Translator(base, tok, modules)
        load_s = time.perf_counter() - t0
        reqs = [Request(d, p.src) for d in directions for p in tests[d]]
        hyps = tr.translate(reqs, routes, max_new_tokens=128, batch_size=16, progress=False)
        if hasattr(tr.model, "unload"):
            tr.model.unload()
        res, i = {}, 0
        for d in directions:
            n = len(tests[d])
            s = evaluate.score_direction(hyps[i : i + n], refs[d], d.tgt)
            res[str(d)] = {"bleu": round(s.bleu, 2), "chrf": round(s.chrf, 2)}
            i += n
        return res, load_s

    results: dict[str, Any] = {}
    cache = out / "results.json"
    if cache.is_file():
        results = artifacts.read_json(cache)
    if "unmerged" not in results:
        mods = {str(d): sep.adapter(str(d)) for d in directions}
        scores, load_s = score(mods, {str(d): str(d) for d in directions})
        size = sum(f.stat().st_size for m in mods.values() for f in m.glob("*.safetensors"))
        results["unmerged"] = {
            "directions": scores,
            "bytes": size,
            "load_s": round(load_s, 2),
            "merge_s": 0.0,
        }
        artifacts.atomic_write_json(cache, results)
    for v in variants(ranks, densities):
        name = label(v)
        if name in results:
            continue
        print(f"== {name}", flush=True)
        mods, routes, merge_s, size, params, kept = {}, {}, 0.0, 0, 0, []
        for g, members in GROUPS.items():
            target = out / name / g
            res = merge_adapters(
                [sep.adapter(f"{x}-en") for x in members],
                target,
                "ties",
                v["density"],
                v["rank"],
                v["form"],
                progress=False,
            )
            merge_s += res.seconds
            size += res.bytes
            params += res.params
            if res.kept_energy is not None:
                kept.append(res.kept_energy)
            mods[g] = target
            routes.update({f"{x}-en": g for x in members})
        scores, load_s = score(mods, routes)
        results[name] = {
            **v,
            "directions": scores,
            "bytes": size,
            "params": params,
            "merge_s": round(merge_s, 2),
            "load_s": round(load_s, 2),
            "kept_energy": round(sum(kept) / len(kept), 4) if kept else None,
        }
        artifacts.atomic_write_json(cache, results)
    write(args, results)
    return 0


def _avg(r: dict[str, Any], metric: str) -> float:
    vals = [s[metric] for s in r["directions"].values()]
    return sum(vals) / len(vals)


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res_dir = Path(args.results)
    dirs = list(results["unmerged"]["directions"])
    lines = [
        "# Merged-module forms on translation quality (CPU scale)",
        "",
        f"Command: `{' '.join(['python'] + sys.argv)}`",
        "",
        "TIES merge of each group's separately trained XX→En LoRAs ({de, is}, {cs, ru}) from the asymmetry "
        "benchmark's `separate` system (Gemma 3 270M), scored on the first "
        f"{args.test_size} WMT'22 segments per direction. `unmerged` = each direction's own adapter.",
        "",
        "| variant | "
        + " | ".join(f"{d} BLEU | {d} chrF++" for d in dirs)
        + " | avg chrF++ | MB on disk | params | kept energy | merge s | load s |",
        "|---" * (2 * len(dirs) + 7) + "|",
    ]
    for name, r in results.items():
        cells = " | ".join(
            f"{r['directions'][d]['bleu']:.1f} | {r['directions'][d]['chrf']:.1f}" for d in dirs
        )
        kept = r.get("kept_energy")
        lines.append(
            f"| {name} | {cells} | {_avg(r, 'chrf'):.2f} | {r['bytes'] / 1e6:.1f} | {r.get('params', 0):,} | "
            f"{'' if kept is None else f'{kept:.3f}'} | {r['merge_s']:.1f} | {r['load_s']:.1f} |"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.scatter(r["bytes"] / 1e6, _avg(r, "chrf"), label=name)
        ax.annotate(name, (r["bytes"] / 1e6, _avg(r, "chrf")), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk of the XX→En modules (MB, log)")
    ax.set_ylabel("mean chrF++ over de/is/cs/ru→en")
    ax.set_title("Merged-module form: quality vs size")
    fig.tight_layout()
    res_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(res_dir / "merge_forms.png", dpi=110)
    payload = {
        "command": " ".join(["python"] + sys.argv),
        "test_size": args.test_size,
        "variants": results,
        "load_check": args.load_check,
        "versions": artifacts.library_versions(),
    }
    if common.load_markdown(args.load_check):
        lines.insert(1, common.load_markdown(args.load_check))
    artifacts.atomic_write_json(res_dir / "merge_forms.json", payload)
    artifacts.atomic_write_text(res_dir / "merge_forms.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"written": str(res_dir / "merge_forms.md")}))


if __name__ == "__main__":
    sys.exit(main())
