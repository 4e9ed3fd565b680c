"""Asymmetry analysis on constructed run directories: Δ, bootstrap intervals, classification, family
means, merge degradation, validation, files and the `datm analyze` command."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from sacrebleu.metrics import BLEU, CHRF

from datm.analysis.analyze import AnalysisError, analyze, classify, format_table, write_analysis
from datm.analysis.results import RunRef
from datm.cli import main
from datm.data import write_text
from datm.eval.significance import paired_bootstrap
from datm.plan import make_plan

LANGS = ["de", "cs"]
GROUPS = {"g": ["de", "cs"]}
SAMPLES = 200

REFS = {
    d: [f"{d} sentence number {i} about the {w} and its green house" for i, w in enumerate(words)]
    for d, words in {
        "de-en": ["cat", "dog", "sun", "tea", "bread", "river", "town", "road"],
        "cs-en": ["bird", "fish", "moon", "milk", "apple", "lake", "city", "bridge"],
        "en-de": ["katze", "hund", "sonne", "tee", "brot", "fluss", "stadt", "strasse"],
        "en-cs": ["kocka", "pes", "slunce", "caj", "chleba", "reka", "mesto", "cesta"],
    }.items()
}


def good(d: str) -> list[str]:
    return list(REFS[d])


def bad(d: str) -> list[str]:
    return [f"qx{i} zv wk" for i in range(len(REFS[d]))]


def half(d: str) -> list[str]:
    return [r if i % 2 else f"qx{i} zv" for i, r in enumerate(REFS[d])]


def write_run(
    path: Path,
    hyps: dict[str, list[str]],
    strategy: str | None = "separate",
    langs: list[str] = LANGS,
    groups: dict[str, list[str]] = GROUPS,
    refs: dict[str, list[str]] = REFS,
) -> Path:
    """A run directory as `datm run` leaves it: plan.json (unless strategy is None) and translations/."""
    path.mkdir(parents=True)
    if strategy is not None:
        (path / "plan.json").write_text(json.dumps(make_plan(strategy, langs, groups).to_dict()))
    tdir = path / "translations"
    tdir.mkdir()
    for d, lines in hyps.items():
        (tdir / f"{d}.ref.txt").write_text(write_text(refs[d]), encoding="utf-8")
        (tdir / f"{d}.src.txt").write_text(write_text(f"source {i}" for i in range(len(refs[d]))))
        (tdir / f"{d}.hyp.txt").write_text(write_text(lines), encoding="utf-8")
    return path


@pytest.fixture
def asymmetric_runs(tmp_path) -> tuple[Path, Path]:
    """joint is much better on de-en, much worse on en-de, identical on cs-en and en-cs."""
    separate = write_run(
        tmp_path / "separate",
        {"de-en": bad("de-en"), "cs-en": good("cs-en"), "en-de": good("en-de"), "en-cs": half("en-cs")},
    )
    joint = write_run(
        tmp_path / "joint",
        {"de-en": good("de-en"), "cs-en": good("cs-en"), "en-de": bad("en-de"), "en-cs": half("en-cs")},
        strategy="multilingual",
    )
    return separate, joint


def chrf(hyps: list[str], refs: list[str]) -> float:
    return CHRF(word_order=2).corpus_score(hyps, [refs]).score


def bleu(hyps: list[str], refs: list[str]) -> float:
    return BLEU().corpus_score(hyps, [refs]).score


def test_classify_needs_an_interval_that_excludes_zero():
    assert classify(1.0, 0.2, 2.0) == "synergy"
    assert classify(-1.0, -2.0, -0.1) == "conflict"
    assert classify(1.0, -0.1, 2.0) == "neutral"
    assert classify(-1.0, -2.0, 0.3) == "neutral"
    assert classify(0.0, 0.0, 0.0) == "neutral"


def test_directions_are_classified_synergy_conflict_neutral(asymmetric_runs):
    separate, joint = asymmetric_runs
    result = analyze(separate, joint, n_samples=SAMPLES)
    rows = result.directions
    assert list(rows) == ["de-en", "cs-en", "en-de", "en-cs"]  # XX→En first
    assert {d: r.kind for d, r in rows.items()} == {
        "de-en": "synergy",
        "cs-en": "neutral",
        "en-de": "conflict",
        "en-cs": "neutral",
    }
    # Δ is joint − separate, in the classifying metric, and both metrics' deltas are reported
    sep_hyps = {"de-en": bad("de-en"), "en-de": good("en-de")}
    joint_hyps = {"de-en": good("de-en"), "en-de": bad("en-de")}
    for d in ("de-en", "en-de"):
        expected_chrf = chrf(joint_hyps[d], REFS[d]) - chrf(sep_hyps[d], REFS[d])
        assert rows[d].delta == pytest.approx(expected_chrf)
        assert rows[d].metric_deltas["chrf"] == pytest.approx(expected_chrf)
        assert rows[d].metric_deltas["bleu"] == pytest.approx(
            bleu(joint_hyps[d], REFS[d]) - bleu(sep_hyps[d], REFS[d])
        )
        assert rows[d].low <= rows[d].delta <= rows[d].high
    assert rows["de-en"].delta > 50 and rows["en-de"].delta < -50
    assert rows["cs-en"].delta == rows["cs-en"].low == rows["cs-en"].high == 0.0
    # the interval is paired_bootstrap's
    boot = paired_bootstrap(bad("de-en"), good("de-en"), REFS["de-en"], "en", "chrf", SAMPLES, 12345)
    assert (rows["de-en"].low, rows["de-en"].high) == (boot.delta_low, boot.delta_high)
    assert result.runs["joint"] == RunRef(str(joint), "multilingual")
    assert result.metric == "chrf" and result.n_samples == SAMPLES and result.seed == 12345


def test_family_means_and_intervals(asymmetric_runs):
    separate, joint = asymmetric_runs
    result = analyze(separate, joint, n_samples=SAMPLES)
    rows, fams = result.directions, result.families
    assert fams["xx-en"].kind == "synergy" and fams["en-xx"].kind == "conflict"
    assert fams["xx-en"].n_directions == fams["en-xx"].n_directions == 2
    assert fams["xx-en"].delta == pytest.approx((rows["de-en"].delta + rows["cs-en"].delta) / 2)
    # Directions of equal length are resampled jointly: cs-en's Δ is 0 on every resample, so the family
    # mean is de-en's sample halved, and so is its interval.
    assert fams["xx-en"].low == pytest.approx(rows["de-en"].low / 2)
    assert fams["xx-en"].high == pytest.approx(rows["de-en"].high / 2)
    assert fams["en-xx"].high < 0


def test_bleu_metric_classifies_with_bleu(asymmetric_runs):
    separate, joint = asymmetric_runs
    result = analyze(separate, joint, metric="bleu", n_samples=SAMPLES)
    row = result.directions["en-de"]
    assert row.delta == pytest.approx(row.metric_deltas["bleu"]) and row.delta != pytest.approx(
        row.metric_deltas["chrf"]
    )
    assert row.kind == "conflict"


def test_one_direction_family_interval_equals_the_direction_interval(tmp_path):
    # no plan.json: the directions are the translation files present
    separate = write_run(tmp_path / "s", {"de-en": half("de-en"), "en-de": good("en-de")}, strategy=None)
    joint = write_run(tmp_path / "j", {"de-en": good("de-en"), "en-de": half("en-de")}, strategy=None)
    result = analyze(separate, joint, n_samples=SAMPLES)
    assert result.runs["separate"].strategy is None
    for d, fam in (("de-en", "xx-en"), ("en-de", "en-xx")):
        row, family = result.directions[d], result.families[fam]
        assert family.n_directions == 1
        assert (family.low, family.high, family.kind) == (row.low, row.high, row.kind)


def test_merge_degradation_per_family(tmp_path):
    every = {d: good(d) for d in REFS}
    separate = write_run(tmp_path / "separate", every)
    joint = write_run(tmp_path / "joint", every, strategy="group")
    unmerged = write_run(tmp_path / "unmerged", every, strategy="separate")
    # merging both families: XX→En barely changes, En→XX degrades
    merged_hyps = {
        "de-en": good("de-en"),
        "cs-en": half("cs-en"),
        "en-de": bad("en-de"),
        "en-cs": bad("en-cs"),
    }
    merged = write_run(tmp_path / "merged", merged_hyps, strategy="separate_merged")
    result = analyze(separate, joint, merged, unmerged, n_samples=SAMPLES)
    merge = result.merge
    assert list(merge.directions) == ["de-en", "cs-en", "en-de", "en-cs"]
    for d, row in merge.directions.items():
        assert row.delta == pytest.approx(chrf(merged_hyps[d], REFS[d]) - chrf(good(d), REFS[d]))
        assert row.low <= row.delta <= row.high
    fams = merge.families
    assert fams["en-xx"].delta < fams["xx-en"].delta < 0
    assert fams["xx-en"].delta == pytest.approx(
        (merge.directions["de-en"].delta + merge.directions["cs-en"].delta) / 2
    )
    assert fams["en-xx"].high < 0 and fams["en-xx"].n_directions == 2
    assert result.runs["merged"].strategy == "separate_merged"


def test_merge_degradation_only_counts_directions_served_by_a_merge(tmp_path):
    every = {d: good(d) for d in REFS}
    separate = write_run(tmp_path / "separate", every)
    joint = write_run(tmp_path / "joint", every, strategy="multilingual")
    dat = write_run(tmp_path / "dat", every, strategy="dat")
    datm = write_run(tmp_path / "datm", {**every, "de-en": half("de-en")}, strategy="datm")
    merge = analyze(separate, joint, datm, dat, n_samples=SAMPLES).merge
    assert list(merge.directions) == ["de-en", "cs-en"]  # datm merges XX→En only
    assert list(merge.families) == ["xx-en"]
    assert merge.directions["de-en"].delta < 0 == merge.directions["cs-en"].delta
    # two runs that merge nothing differently: an error, not an empty table
    with pytest.raises(AnalysisError, match="nothing was merged"):
        analyze(separate, joint, dat, separate, n_samples=SAMPLES)


def test_runs_must_share_directions_and_references(tmp_path, asymmetric_runs):
    separate, _ = asymmetric_runs
    other_refs = {**REFS, "en-cs": [*REFS["en-cs"][:5], "a different reference", *REFS["en-cs"][6:]]}
    changed = write_run(tmp_path / "changed", {d: good(d) for d in REFS}, refs=other_refs)
    with pytest.raises(AnalysisError, match=r"changed.*en-cs\.ref\.txt differs.*line 6"):
        analyze(separate, changed, n_samples=SAMPLES)
    fewer = write_run(
        tmp_path / "fewer",
        {"de-en": good("de-en"), "en-de": good("en-de")},
        langs=["de"],
        groups={"g": ["de"]},
    )
    with pytest.raises(AnalysisError, match=r"joint run .*fewer lacks direction cs-en"):
        analyze(separate, fewer, n_samples=SAMPLES)
    (separate / "translations" / "en-cs.hyp.txt").unlink()
    with pytest.raises(AnalysisError, match=r"direction en-cs has no .*en-cs\.hyp\.txt"):
        analyze(separate, changed, n_samples=SAMPLES)
    with pytest.raises(AnalysisError, match="both a merged and an unmerged"):
        analyze(separate, changed, merged=separate)


def test_write_analysis_files(tmp_path, asymmetric_runs):
    separate, joint = asymmetric_runs
    every = {d: good(d) for d in REFS}
    merged = write_run(tmp_path / "merged", {**every, "en-de": half("en-de")}, strategy="separate_merged")
    unmerged = write_run(tmp_path / "unmerged", every)
    result = analyze(separate, joint, merged, unmerged, n_samples=SAMPLES)
    out = tmp_path / "analysis"
    path = write_analysis(result, out)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result.to_json()))
    md = (out / "analysis.md").read_text()
    de_en = result.directions["de-en"]
    assert (
        f"| de-en | XX→En | {de_en.scores['separate']:.2f} | {de_en.scores['joint']:.2f} | {de_en.delta:+.2f}"
        in md
    )
    assert "| en-de | En→XX |" in md and "conflict" in md and "## Merge degradation" in md
    for name in ("delta_by_direction.png", "merge_degradation.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"![{name}]({name})" in md


def test_analyze_command(tmp_path, asymmetric_runs, capsys):
    separate, joint = asymmetric_runs
    out = tmp_path / "cli-out"
    argv = ["analyze", "--separate", str(separate), "--joint", str(joint), "--out", str(out)]
    assert main([*argv, "--samples", str(SAMPLES), "--metric", "bleu"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["metric"] == "bleu" and saved["directions"]["en-de"]["kind"] == "conflict"
    assert "en-de" in printed and "conflict" in printed and str(out / "analysis.json") in printed
    assert main([*argv, "--merged", str(separate)]) == 2
    assert "both a merged and an unmerged" in capsys.readouterr().err


def test_pilot_analysis_drives_an_auto_plan(tmp_path, asymmetric_runs, capsys):
    separate, joint = asymmetric_runs
    out = tmp_path / "pilot"
    write_analysis(analyze(separate, joint, n_samples=SAMPLES), out)
    cfg = tmp_path / "auto.yaml"
    cfg.write_text(
        "languages: [de, cs]\ngroups: {g: [de, cs]}\nstrategy: auto\n"
        f"data: {{train: '{tmp_path}/train.{{xx}}-en.jsonl'}}\ntrain: {{steps: 1}}\n"
        f"output_dir: {tmp_path}/auto\n"
    )
    assert main(["plan", str(cfg), "--measurements", str(out / "analysis.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["strategy"] == "auto"
    # de-en gained (Δ > 0) but is the only XX→En direction that did: own adapter, merged with cs-en
    assert plan["notes"]["de-en"].startswith("own adapter: joint (pilot Δ ")
    assert plan["routes"]["de-en"] == plan["routes"]["cs-en"] == "xx-en.g"
    assert plan["notes"]["en-de"].startswith("separate (pilot Δ -")
    assert plan["routes"]["en-de"] == "en-de"


# ----------------------------------------------------------------------------------- several seeds


def seeded_run(path: Path, hyps: dict[str, list[str]], seed: int, strategy: str = "separate") -> Path:
    """A run directory with a config.json naming its training seed."""
    write_run(path, hyps, strategy=strategy)
    (path / "config.json").write_text(json.dumps({"train": {"seed": seed}}))
    return path


def seeded_arms(tmp_path: Path, joint_de_en: dict[int, list[str]]) -> tuple[list[Path], list[Path]]:
    """Per seed a separate run (half right everywhere) and a joint run whose de-en is `joint_de_en[seed]`."""
    separate, joint = [], []
    for seed, de_en in joint_de_en.items():
        hyps = {d: half(d) for d in REFS}
        separate.append(seeded_run(tmp_path / f"separate-{seed}", hyps, seed))
        joint.append(seeded_run(tmp_path / f"joint-{seed}", {**hyps, "de-en": de_en}, seed, "group"))
    return separate, joint


def test_seeds_that_disagree_in_sign_give_an_interval_containing_zero(tmp_path):
    # seeds 1 and 2: joint much better on de-en; seed 3: much worse. Each seed alone is significant.
    separate, joint = seeded_arms(tmp_path, {1: good("de-en"), 2: good("de-en"), 3: bad("de-en")})
    for s, j in zip(separate, joint, strict=True):
        alone = analyze(s, j, n_samples=SAMPLES).directions["de-en"]
        assert alone.kind in ("synergy", "conflict") and alone.seed_deltas is None
    result = analyze(separate, joint, n_samples=SAMPLES)
    row = result.directions["de-en"]
    assert result.seeds == ["1", "2", "3"] and result.interval.startswith("t interval over training seeds")
    per_seed = row.seed_deltas
    assert per_seed is not None and per_seed["1"] > 10 and per_seed["3"] < -10
    assert row.delta == pytest.approx(sum(per_seed.values()) / 3)
    assert row.low < 0 < row.high and row.kind == "neutral"
    # identical directions: no spread between seeds, no difference on any segment
    assert result.directions["cs-en"].seed_deltas == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert result.directions["cs-en"].low == result.directions["cs-en"].high == 0.0
    assert result.families["xx-en"].seed_deltas == pytest.approx({s: v / 2 for s, v in per_seed.items()})
    assert "t interval over seeds 1, 2, 3" in format_table(result)


def test_seeds_that_agree_are_significant_and_reported(tmp_path):
    one_wrong = good("de-en")[:6] + ["qx zv"] + good("de-en")[7:]
    better = {1: good("de-en"), 2: one_wrong, 3: good("de-en")}
    separate, joint = seeded_arms(tmp_path, better)
    result = analyze(separate, joint, n_samples=SAMPLES)
    row = result.directions["de-en"]
    assert row.kind == "synergy" and row.low > 0 and len(set(row.seed_deltas.values())) == 2
    assert row.p_value < 0.05
    # the arms are paired by seed (config.json), not by the order they are given in
    again = analyze(separate, joint[::-1], n_samples=SAMPLES)
    assert again.directions["de-en"].seed_deltas == row.seed_deltas
    path = write_analysis(result, tmp_path / "out")
    data = json.loads(path.read_text())
    assert data["seeds"] == ["1", "2", "3"] and data["directions"]["de-en"]["seed_deltas"] == row.seed_deltas
    assert "| Δ per seed |" in (tmp_path / "out" / "analysis.md").read_text()
    from datm.analysis.results import Analysis

    assert Analysis.from_json(data) == result


def test_seeds_must_pair_up_across_arms(tmp_path):
    separate, joint = seeded_arms(tmp_path, {1: good("de-en"), 2: good("de-en")})
    with pytest.raises(AnalysisError, match=r"different seeds .*\['1'\] vs \['1', '2'\]"):
        analyze(separate, joint[:1], n_samples=SAMPLES)
    with pytest.raises(AnalysisError, match="are the same seed"):
        analyze([separate[0], separate[0]], joint, n_samples=SAMPLES)


def test_t_interval_constants():
    from datm.analysis.seeds import t_quantile, t_two_sided_p

    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-3)
    assert t_two_sided_p(2.0, 10) == pytest.approx(0.07339, abs=1e-4)
