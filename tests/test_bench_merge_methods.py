"""benchmarks/merge_methods.py's statistics over seeds: λ chosen on dev, mean ± std, Kendall τ."""

from __future__ import annotations

import argparse
import statistics
import sys
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import merge_methods as mm  # noqa: E402


def test_kendall_tau_counts_concordant_minus_discordant_pairs() -> None:
    assert mm.kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert mm.kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    # one swapped pair of three: (2 − 1) / 3
    assert abs(mm.kendall_tau(["a", "b", "c"], ["b", "a", "c"]) - 1 / 3) < 1e-12


def test_lambda_is_chosen_per_method_on_dev() -> None:
    selection = {
        "candidates": [
            {"candidate": "ties-d0.2-r16-s0.5", "method": "ties", "mean_chrf": 30.0},
            {"candidate": "ties-d0.2-r16", "method": "ties", "mean_chrf": 31.0},
            {"candidate": "knots-d0.2-r16-s0.5", "method": "knots", "mean_chrf": 32.0},
            {"candidate": "knots-d0.2-r16-s1.5", "method": "knots", "mean_chrf": 32.0},  # a tie: the earlier
        ]
    }
    assert mm.chosen_per_method(selection) == {"ties": "ties-d0.2-r16", "knots": "knots-d0.2-r16-s0.5"}
    assert [mm.scale_of(c) for c in ("ties-d0.2-r16", "knots-d0.2-r16-s0.5", "x-d1-rsrc-s1.5")] == [
        1,
        0.5,
        1.5,
    ]


def job(seed: int, chrf: dict[str, float]) -> dict:
    systems = {}
    for system, value in chrf.items():
        per_dir = {d: {"chrf": value, "vs_unmerged": {"delta": 0.0, "p": 0.01}} for d in mm.DIRECTIONS}
        systems[system] = {
            "candidates": None if system == mm.UNMERGED else {"xx4": f"{system}-d0.2-r16-s0.5"},
            "directions": per_dir,
            "mean_chrf": value,
        }
    return {"seed": seed, "grouping": "four", "systems": systems}


def test_aggregate_gives_mean_and_std_over_seeds_and_the_rankings_stability() -> None:
    per_seed = {
        1: {"unmerged": 30.0, "ties": 29.0, "knots": 30.5, "iso_c": 28.0},
        2: {"unmerged": 31.0, "ties": 30.6, "knots": 30.4, "iso_c": 29.0},
        3: {"unmerged": 29.5, "ties": 28.0, "knots": 29.4, "iso_c": 28.2},
    }
    args = argparse.Namespace(groupings=["four"], methods=["ties", "knots", "iso_c"])
    got = mm.aggregate(args, [job(s, c) for s, c in per_seed.items()])["four"]
    knots = got["systems"]["knots"]
    values = [c["knots"] for c in per_seed.values()]
    assert abs(knots["mean_chrf"]["mean"] - statistics.fmean(values)) < 1e-3
    assert abs(knots["mean_chrf"]["std"] - statistics.stdev(values)) < 1e-3
    deltas = [c["knots"] - c["unmerged"] for c in per_seed.values()]
    assert abs(knots["delta_vs_unmerged"]["mean"] - statistics.fmean(deltas)) < 1e-3
    assert knots["scales_chosen"] == [{"xx4": 0.5}] * 3
    assert got["rankings"]["1"] == ["knots", "ties", "iso_c"] and got["rankings"]["2"] == [
        "ties",
        "knots",
        "iso_c",
    ]
    taus = [mm.kendall_tau(got["rankings"][a], got["rankings"][b]) for a, b in combinations("123", 2)]
    assert (
        got["kendall_tau"]["pairs"] == taus
        and abs(got["kendall_tau"]["mean"] - statistics.fmean(taus)) < 1e-3
    )
    assert got["best"]["system"] == "knots" and got["best"]["within_0.3"] is (
        statistics.fmean(deltas) >= -0.3
    )
