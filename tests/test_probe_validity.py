"""benchmarks/probe_validity.py: the statistics it reports, and its committed results reproduce."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import probe_validity as pv  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def test_spearman_uses_average_ranks_for_ties():
    assert pv.ranks([0.4, 0.1, 0.4, 0.9]).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert pv.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pv.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Pearson correlation of the average ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]
    assert pv.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


def test_permutation_p_is_exact_for_small_samples():
    # n = 4: exactly 1 of the 24 pairings is the perfect one
    assert pv.permutation_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1 / 24)
    assert pv.permutation_p([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(1.0)


def test_decisions_count_sign_agreement_at_a_threshold():
    values = {"a": 0.5, "b": 0.2, "c": 0.0}
    deltas = {"a": 1.0, "b": -1.0, "c": -0.5}
    assert pv.agreement(values, deltas, 0.0) == ["a", "c"]
    assert pv.agreement(values, deltas, 0.3) == ["a", "b", "c"]


def test_committed_results_reproduce_from_the_asymmetry_benchmark():
    asym = json.loads((RESULTS / "asymmetry_cpu.json").read_text())
    result = pv.analyse(asym)
    committed = json.loads((RESULTS / "probe_validity.json").read_text())
    assert json.loads(json.dumps(result["comparisons"])) == committed["comparisons"]
    group = result["comparisons"][0]
    assert group["comparison"] == "group − separate"
    assert group["spearman"] < 0 and group["agree_at_0"] <= group["always_joint"]
    assert "cs-en" in group["wrong_at_0"]  # the measured significant conflict, decided joint
    assert "does not predict" in committed["verdict"]
