"""Typed results: RunScores, BootstrapResult and Analysis read back exactly what they write, and bad
files fail naming the file and key; the families are defined once, in datm.languages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_significance import write_run

from datm.analysis.analyze import analyze, write_analysis
from datm.analysis.results import Analysis
from datm.eval import evaluate as E
from datm.eval.results import BootstrapResult, ResultsError, RunScores
from datm.eval.significance import paired_bootstrap
from datm.languages import FAMILIES, FAMILY_NAMES, by_family


def _scores_json() -> dict:
    """scores.json as `datm run` writes it (runner.score_stage)."""
    refs = ["the cat sat on the mat", "a dog ran to the house"]
    hyps = ["the cat sat on a mat", "a dog ran home"]
    directions = {}
    for d in ("de-en", "en-cs"):
        scores = E.score_direction(hyps, refs, d.split("-")[1])
        scores.comet = 0.5 if d == "de-en" else None
        row = scores.to_dict()
        row["test_fingerprint"] = f"sha256:{d}"
        directions[d] = row
    return {
        "directions": directions,
        "averages": E.averages(directions),
        "signatures": {"bleu:en": "nrefs:1|tok:13a"},
        "provenance": {"strategy": "datm", "seed": 1},
    }


def test_run_scores_round_trip_and_lookups() -> None:
    data = json.loads(json.dumps(_scores_json()))
    scores = RunScores.from_json(data)
    assert json.dumps(scores.to_json()) == json.dumps(data)
    assert scores.strategy == "datm"
    assert scores.value("de-en", "comet") == 0.5 and scores.value("en-cs", "comet") is None
    assert scores.value("en-de", "bleu") is None  # the run has no en-de
    assert scores.value("en-cs", "chrf") == data["directions"]["en-cs"]["chrf"]
    sigs = scores.all_signatures()
    assert sigs["bleu:en"] == "nrefs:1|tok:13a" and sigs["chrf"].startswith("nrefs:1")


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: d.pop("directions"), r"run/scores.json: expected an object with a 'directions' key"),
        (lambda d: d["directions"].update({"de": {}}), r"run/scores.json: directions.de: .*SRC-TGT"),
        (lambda d: d["directions"]["en-cs"].update(chrf="high"), r"directions.en-cs.chrf must be a number"),
    ],
)
def test_run_scores_errors_name_file_and_key(break_it, message) -> None:
    data = _scores_json()
    break_it(data)
    with pytest.raises(ResultsError, match=message):
        RunScores.from_json(data, Path("run/scores.json"))


def test_bootstrap_result_round_trip_and_missing_key() -> None:
    refs = ["the cat sat on the mat", "a dog ran to the house", "old tree in the garden"]
    result = paired_bootstrap(["a cat", "a dog", "a tree"], refs, refs, "en", metric="chrf", n_samples=50)
    data = json.loads(json.dumps(result.to_json()))
    assert list(data) == ["metric", "n_samples", "seed", "a", "b", "delta", "mean_b", "ci_low", "ci_high",
                          "delta_low", "delta_high", "p_value"]  # fmt: skip
    assert BootstrapResult.from_json(data) == result
    assert result.significant(0.05) == (result.p_value < 0.05)
    del data["p_value"]
    with pytest.raises(ResultsError, match=r"report.json: significance.x: missing key 'p_value'"):
        BootstrapResult.from_json(data, "report.json: significance.x")


def test_analysis_json_round_trip(tmp_path: Path) -> None:
    sep = write_run(
        tmp_path / "sep", "separate", {"de-en": "weak", "cs-en": "ref", "en-de": "strong", "en-cs": "weak"}
    )
    jnt = write_run(
        tmp_path / "jnt", "group", {"de-en": "strong", "cs-en": "weak", "en-de": "weak", "en-cs": "ref"}
    )
    mrg = write_run(
        tmp_path / "mrg",
        "separate_merged",
        {"de-en": "weak", "cs-en": "weak", "en-de": "ref", "en-cs": "weak"},
    )
    result = analyze(sep, jnt, mrg, sep, n_samples=40)
    path = write_analysis(result, tmp_path / "out")
    saved = json.loads(path.read_text(encoding="utf-8"))
    back = Analysis.from_json(saved, path)
    assert back.to_json() == result.to_json()
    assert json.dumps(back.to_json()) == json.dumps(saved)
    assert "kind" not in saved["merge"]["directions"]["de-en"] and back.merge.directions["de-en"].kind is None
    assert back.directions["de-en"].scores == {"separate": saved["directions"]["de-en"]["separate"],
                                               "joint": saved["directions"]["de-en"]["joint"]}  # fmt: skip
    del saved["families"]["en-xx"]["resampling"]
    with pytest.raises(ResultsError, match=r"analysis.json: families.en-xx: missing key 'resampling'"):
        Analysis.from_json(saved, path)


def test_families_are_defined_once() -> None:
    assert FAMILIES == ("xx-en", "en-xx")
    assert [FAMILY_NAMES[f] for f in FAMILIES] == ["XX→En", "En→XX"]
    assert by_family(["en-de", "de-en", "en-cs", "cs-en"]) == {
        "xx-en": ["de-en", "cs-en"],
        "en-xx": ["en-de", "en-cs"],
    }
    assert by_family(["en-de"]) == {"en-xx": ["en-de"]}
