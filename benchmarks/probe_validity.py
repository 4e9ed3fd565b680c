"""Does the gradient probe predict where joint training helps? (issue 15, item 3)

Reads the CPU-scale asymmetry benchmark's results (`benchmarks/results/asymmetry_cpu.json`: the
probe matrix taken before training, and per direction the measured Δ = joint − separate chrF++ with
its bootstrap interval) and asks, per direction:

- rank agreement: Spearman's ρ between the probe's value and the measured Δ, with a permutation
  p-value (one-sided: does a higher probe value go with a higher Δ?);
- decisions: `strategy: auto` trains a direction jointly when its value is above a threshold; a
  decision is right when the measured Δ has the same sign (joint > 0 helped, otherwise it did not).
  Counted at threshold 0 (the default) and at the best threshold found in hindsight, next to the
  two rules that need no probe (always joint, always separate).

Two comparisons: the `group` run (joint within each language group, both families) against the
probe's per-direction value that `auto` uses (mean cosine with the same-family directions of the
group, `datm.probe.auto_measurements_from_probe`), and the `multilingual` run (everything joint)
against the mean cosine with every other direction. No training: the numbers come from the json.

    python benchmarks/probe_validity.py [--asymmetry benchmarks/results/asymmetry_cpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from datm import artifacts
from datm.auto.probe import ProbeResult, auto_measurements_from_probe

RESULTS = Path(__file__).resolve().parent / "results"
SIGNIFICANT = ("conflict", "synergy")


def ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's ρ needs)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def permutation_p(a: list[float], b: list[float], draws: int = 200_000, seed: int = 1) -> float:
    """One-sided p-value of ρ ≥ observed under random pairing: exact over all n! pairings for
    n ≤ 8, else from `draws` seeded random pairings."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    observed = float(ra @ rb) - 1e-9
    if len(b) <= 8:
        pairings = np.array(list(itertools.permutations(range(len(b)))))
    else:
        rng = np.random.default_rng(seed)
        pairings = rng.permuted(np.tile(np.arange(len(b)), (draws, 1)), axis=1)
    return float(((rb[pairings] @ ra) >= observed).mean())


def agreement(values: dict[str, float], deltas: dict[str, float], threshold: float) -> list[str]:
    """Directions where 'joint iff value > threshold' matches 'joint helped iff Δ > 0'."""
    return [d for d in values if (values[d] > threshold) == (deltas[d] > 0)]


def thresholds(values: list[float]) -> list[float]:
    """One threshold per distinct decision (below all values, between neighbours, above all), and 0."""
    v = sorted(set(values))
    return sorted({0.0, v[0] - 1.0, v[-1] + 1.0} | {(x + y) / 2 for x, y in itertools.pairwise(v)})


def compare(name: str, values: dict[str, float], rows: dict[str, dict[str, Any]], predictor: str) -> dict:
    dirs = list(values)
    deltas = {d: float(rows[d]["delta"]) for d in dirs}
    vs, ds = [values[d] for d in dirs], [deltas[d] for d in dirs]
    at_zero = agreement(values, deltas, 0.0)
    best_t, best = max(
        ((t, agreement(values, deltas, t)) for t in thresholds(vs)), key=lambda tb: (len(tb[1]), -abs(tb[0]))
    )
    significant = [d for d in dirs if rows[d]["kind"] in SIGNIFICANT]
    with_partner = [d for d in dirs if values[d] != 0.0]
    return {
        "comparison": name,
        "predictor": predictor,
        "directions": {
            d: {
                "probe": values[d],
                "delta": deltas[d],
                "kind": rows[d]["kind"],
                "joint_helped": deltas[d] > 0,
            }
            for d in dirs
        },
        "spearman": spearman(vs, ds),
        "spearman_p_one_sided": permutation_p(vs, ds),
        "spearman_with_partner": (
            spearman([values[d] for d in with_partner], [deltas[d] for d in with_partner])
            if len(with_partner) < len(dirs)
            else None
        ),
        "n_with_partner": len(with_partner),
        "agree_at_0": len(at_zero),
        "wrong_at_0": [d for d in dirs if d not in at_zero],
        "best_threshold": best_t,
        "agree_at_best": len(best),
        "always_joint": sum(deltas[d] > 0 for d in dirs),
        "always_separate": sum(deltas[d] <= 0 for d in dirs),
        "n": len(dirs),
        "significant": {d: rows[d]["kind"] for d in significant},
        "significant_right_at_0": [d for d in significant if d in at_zero],
    }


def mean_cosine_with_all(probe: ProbeResult) -> dict[str, float]:
    n = len(probe.directions)
    return {d: (sum(probe.matrix[i]) - probe.matrix[i][i]) / (n - 1) for i, d in enumerate(probe.directions)}


def analyse(asym: dict[str, Any]) -> dict[str, Any]:
    probe = ProbeResult.from_dict(asym["probe"], "asymmetry_cpu.json: probe")
    groups = asym["setting"]["groups"]
    out = {"source": "benchmarks/results/asymmetry_cpu.json", "setting": asym["setting"], "comparisons": []}
    group = asym["asymmetry"]["group_vs_separate"]["directions"]
    out["comparisons"].append(
        compare(
            "group − separate",
            auto_measurements_from_probe(probe, groups),
            group,
            "mean cosine with the same-family directions of its group (what `auto` uses; 0 without one)",
        )
    )
    multi = asym["asymmetry"]["multilingual_vs_separate"]["directions"]
    out["comparisons"].append(
        compare("multilingual − separate", mean_cosine_with_all(probe), multi, "mean cosine with all others")
    )
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Does the gradient probe predict joint-training gains?",
        "",
        "Data: `benchmarks/results/asymmetry_cpu.json` (Gemma 3 270M, ALMA human-written data, "
        f"{result['setting']['test_segments_per_direction']} WMT'22 test segments per direction; the "
        "probe was taken before any training). Δ = joint − separate chrF++. A decision is right when "
        "'joint iff probe > threshold' matches 'Δ > 0'. Command: `python benchmarks/probe_validity.py`.",
        "",
        "Caveats: 10 directions and 40 segments each, so most Δ are within noise (only the directions "
        "marked conflict/synergy have a 95% interval that excludes 0); the `group` run trains both "
        "families of a group together, while `auto` trains jointly within a group *and* family; a "
        "direction without a same-family partner in its group has probe value 0 by construction.",
        "",
    ]
    for c in result["comparisons"]:
        lines += [f"## {c['comparison']} (probe value: {c['predictor']})", ""]
        lines += ["| direction | probe | Δ chrF++ | kind | joint helped |", "|---|---:|---:|---|---|"]
        for d, r in c["directions"].items():
            helped = "yes" if r["joint_helped"] else "no"
            lines.append(f"| {d} | {r['probe']:.3f} | {r['delta']:+.2f} | {r['kind']} | {helped} |")
        partner = (
            f" (ρ = {c['spearman_with_partner']:+.2f} over the {c['n_with_partner']} directions with a "
            "partner)"
            if c["spearman_with_partner"] is not None
            else ""
        )
        sig = ", ".join(f"{d} ({k})" for d, k in c["significant"].items()) or "none"
        lines += [
            "",
            f"- Spearman ρ(probe, Δ) = **{c['spearman']:+.2f}**, one-sided permutation p = "
            f"{c['spearman_p_one_sided']:.2f}{partner}",
            f"- decisions right at threshold 0: **{c['agree_at_0']}/{c['n']}** (wrong: "
            f"{', '.join(c['wrong_at_0']) or 'none'}); at the best threshold in hindsight "
            f"({c['best_threshold']:.3f}): {c['agree_at_best']}/{c['n']}",
            f"- without any probe: always joint {c['always_joint']}/{c['n']}, always separate "
            f"{c['always_separate']}/{c['n']}",
            f"- significant directions: {sig}; right at threshold 0: "
            f"{', '.join(c['significant_right_at_0']) or 'none'}",
            "",
        ]
    lines += ["## Verdict", "", result["verdict"], ""]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    g = result["comparisons"][0]
    better = g["agree_at_0"] > max(g["always_joint"], g["always_separate"])
    predicts = g["spearman"] > 0 and g["spearman_p_one_sided"] < 0.05 and better
    if predicts:
        return "The probe predicts: `auto` may decide from it."
    return (
        f"The probe does not predict the measured gains: ρ = {g['spearman']:+.2f} (p = "
        f"{g['spearman_p_one_sided']:.2f}), and its decisions at threshold 0 are right for "
        f"{g['agree_at_0']}/{g['n']} directions, no better than always training jointly "
        f"({g['always_joint']}/{g['n']}). `strategy: auto` therefore decides from a pilot by default "
        "(`auto.source: pilot`)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--asymmetry", type=Path, default=RESULTS / "asymmetry_cpu.json")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for probe_validity.{md,json}")
    args = ap.parse_args(argv)
    asym = artifacts.read_json(args.asymmetry)
    if not asym.get("probe") or "group_vs_separate" not in asym.get("asymmetry", {}):
        print(f"{args.asymmetry}: needs the probe and the group_vs_separate analysis", file=sys.stderr)
        return 2
    result = analyse(asym)
    result["verdict"] = verdict(result)
    artifacts.atomic_write_json(args.out / "probe_validity.json", result)
    artifacts.atomic_write_text(args.out / "probe_validity.md", render(result))
    print(render(result))
    print(json.dumps({c["comparison"]: c["spearman"] for c in result["comparisons"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
