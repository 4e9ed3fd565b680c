"""`merge: {method: auto}`: candidates merged, scored on the dev set, the best one published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_alma

from datm import artifacts, auto, data
from datm import config as C
from datm.artifacts import RunDir
from datm.config.candidates import Candidate, candidates
from datm.data import dev
from datm.languages import Direction
from datm.merge import select as merge_select
from datm.merge.select import Row, choose
from datm.run import bodies, describe, runner

CANDIDATES = [
    {"method": "ties", "density": 0.5, "rank": 4},
    {"method": "linear", "rank": 4},
    {"method": "ties", "density": 0.2, "rank": 1},
]


def auto_config(tmp_path: Path, model_dir: Path, data_dir: Path, **merge) -> C.Config:
    raw = {
        "base_model": str(model_dir),
        "languages": ["de", "cs", "ru"],
        "groups": {"germanic": ["de"], "slavic": ["cs", "ru"]},
        "data": {
            "train": f"{data_dir}/train.{{xx}}-en.jsonl",
            "valid": f"{data_dir}/valid.{{xx}}-en.jsonl",
            "test": f"{data_dir}/test.{{src}}-{{tgt}}.jsonl",
            "valid_holdout": 3,
        },
        "strategy": "datm",
        "lora": {"r": 4, "alpha": 8},
        "train": {"steps": 6, "batch_size": 4, "lr": 0.05, "seed": 1, "checkpoint_every": 0},
        "merge": {"method": "auto", "candidates": CANDIDATES, "dev_size": 3, **merge},
        "eval": {"max_examples": 3, "beams": 1, "max_new_tokens": 6},
        "output_dir": str(tmp_path / "run"),
    }
    return C.from_dict(raw, source="auto.yaml")


@pytest.fixture
def data_dir(alma_dir: Path) -> Path:
    # dev records 4-7, apart from the test set's 0-3; ru has no valid split: held out of training
    valid = write_alma(alma_dir / "valid.cs-en.jsonl", "cs", 8)
    lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)
    valid.write_text("".join(lines[4:]), encoding="utf-8")
    return alma_dir


def _no_test_reads(monkeypatch: pytest.MonkeyPatch, cfg: C.Config) -> None:
    real = data.read_direction

    def guarded(pattern: str, *args, **kwargs):
        assert pattern != cfg.data.test, "the test split was read while choosing the merge"
        return real(pattern, *args, **kwargs)

    monkeypatch.setattr(data, "read_direction", guarded)


def _merge(cfg: C.Config) -> None:
    for adapter in ("cs-en", "ru-en", "en-xx.slavic"):
        runner.run(cfg, only=f"train:{adapter}")
    runner.run(cfg, only="merge:xx-en.slavic")


def test_config_validates_candidates(tmp_path, tiny_model_dir, data_dir):
    cfg = auto_config(tmp_path, tiny_model_dir, data_dir)
    assert [c.name for c in candidates(cfg.merge)] == [
        "ties-d0.5-r4",
        "linear-d0.2-r4",
        "ties-d0.2-r1",
    ]
    grid = auto_config(
        tmp_path, tiny_model_dir, data_dir, candidates={"methods": ["ties", "linear"], "ranks": [4, 8]}
    )
    assert candidates(grid.merge) == [
        Candidate("ties", 0.2, 4),
        Candidate("ties", 0.2, 8),
        Candidate("linear", 0.2, 4),
        Candidate("linear", 0.2, 8),
    ]
    with pytest.raises(C.ConfigError, match=r"candidates\[1\].method: unknown merge method 'nope'"):
        auto_config(tmp_path, tiny_model_dir, data_dir, candidates=[{"method": "ties"}, {"method": "nope"}])
    with pytest.raises(C.ConfigError, match=r"candidates\[0\].density"):
        auto_config(tmp_path, tiny_model_dir, data_dir, candidates=[{"method": "ties", "density": 2}])
    with pytest.raises(C.ConfigError, match="needs a non-empty list"):
        auto_config(tmp_path, tiny_model_dir, data_dir, candidates=[])
    # None listed: the benchmark's best methods and the paper's ties, at the adapters' rank (lora.r 4)
    default = auto_config(tmp_path, tiny_model_dir, data_dir, candidates=None)
    assert [c.name for c in candidates(default.merge, adapter_rank=default.lora.r)] == [
        "iso_c_core-d0.2-r4",
        "core_space-d0.2-r4",
        "knots-d0.2-r4",
        "ties-d0.2-r4",
    ]
    # the global scale λ is searched like the density: a grid key, a candidate key, merge.scale unset
    scaled = auto_config(
        tmp_path, tiny_model_dir, data_dir, candidates={"methods": ["knots"], "scales": [0.5, 1]}
    )
    assert [c.name for c in candidates(scaled.merge)] == [
        "knots-d0.2-rsrc-s0.5",
        "knots-d0.2-rsrc",
    ]
    with pytest.raises(C.ConfigError, match=r"candidates\[0\].scale: expected a finite number > 0"):
        auto_config(tmp_path, tiny_model_dir, data_dir, candidates=[{"method": "ties", "scale": 0}])
    with pytest.raises(C.ConfigError, match="merge.normalize applies to ties, dare_ties only"):
        auto_config(tmp_path, tiny_model_dir, data_dir, method="knots", candidates=None, normalize=True)
    with pytest.raises(C.ConfigError, match="merge.method: unknown merge method 'foo'; expected auto"):
        auto_config(tmp_path, tiny_model_dir, data_dir, method="foo", candidates=None)
    with pytest.raises(C.ConfigError, match="merge.candidates is for merge.method: auto"):
        auto_config(tmp_path, tiny_model_dir, data_dir, method="ties")


def test_choose_breaks_ties_by_size_then_order():
    def row(name: str, mean: float, size: int) -> Row:
        return Row(name, "ties", 0.2, 4, {"cs-en": mean}, mean, size, 0.1)

    assert choose([row("a", 30.0, 10), row("b", 31.0, 99)]).candidate == "b"
    assert choose([row("a", 31.0, 10), row("b", 31.0, 5)]).candidate == "b"
    assert choose([row("a", 31.0, 5), row("b", 31.0, 5)]).candidate == "a"


def test_plan_says_what_auto_adds(tmp_path, tiny_model_dir, data_dir):
    text = describe.describe_plan(auto_config(tmp_path, tiny_model_dir, data_dir))
    assert "3 candidates x 1 merges = 3 candidate merges, 6 dev translations" in text
    assert "dev cs-en (xx-en.slavic): valid split" in text
    assert "dev ru-en (xx-en.slavic): no valid split: the first 3 of its held-out training pairs" in text
    assert "data.valid for cs-en; 3 training pairs held out of every training (seed 1) for ru-en" in text


def test_held_out_dev_pairs_are_not_trained_on(tmp_path, tiny_model_dir, data_dir):
    cfg = auto_config(tmp_path, tiny_model_dir, data_dir)
    runner.run(cfg, only="train:ru-en")
    held = dev.held_out(cfg.dev_rule(), Direction.parse("ru-en"))
    assert len(held) == 3
    every = data.read_direction(cfg.data.train, Direction.parse("ru-en"))
    kept = [p for p in every if p not in held]
    info = artifacts.read_json(RunDir(cfg.output_dir).adapter("ru-en") / "train_info.json")
    assert info["data_fingerprint"] == artifacts.fingerprint_texts(f"{p.src}\t{p.tgt}" for p in kept)
    assert info["held_out_for_dev"] == 3
    # cs has a valid split: nothing of its training data is held out
    plan = auto.build_plan(cfg)
    origins = bodies.held_out_origins(cfg, plan)
    assert origins == {p.origin for p in held}
    assert not any(o.startswith(str(data_dir / "train.cs-en")) for o in origins)
    # en-ru reads the same file: the held-out lines are skipped in both directions
    en_ru = bodies.train_pairs(cfg, ["en-ru"], data.ReadReport(), origins)
    assert len(en_ru) == len(every) - 3 and not {p.origin for p in en_ru} & origins
    # plan.json records it: which directions hold pairs out, how many, the seed
    assert plan.to_dict()["dev"] == {"valid": ["cs-en"], "held_out": ["ru-en"], "valid_holdout": 3, "seed": 1}


def test_auto_picks_the_best_on_dev_never_reads_test_and_resumes(
    tmp_path, tiny_model_dir, data_dir, monkeypatch
):
    cfg = auto_config(tmp_path, tiny_model_dir, data_dir)
    run = RunDir(cfg.output_dir)
    _no_test_reads(monkeypatch, cfg)
    _merge(cfg)
    cands = run.candidates("xx-en.slavic")
    first = artifacts.read_json(cands / "selection.json")
    hyps = {
        r["candidate"]: artifacts.read_json(cands / (r["same_as"] or r["candidate"]) / "translations.json")
        for r in first["candidates"]
    }
    # Construct the dev set so that the answer is known: the references of cs-en become what one
    # candidate translates, one that neither the first choice nor the tie-break would pick.
    target = next(
        n
        for n in reversed(list(hyps))
        if n != first["chosen"] and hyps[n]["hyps"]["cs-en"] != hyps[first["chosen"]]["hyps"]["cs-en"]
    )
    src = [p.src for p in data.read_direction(cfg.data.valid, Direction.parse("cs-en"))][:3]
    lines = [
        json.dumps({"translation": {"cs": s, "en": h}})
        for s, h in zip(src, hyps[target]["hyps"]["cs-en"], strict=True)
    ]
    (data_dir / "valid.cs-en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # Run the merge task again: candidates and their translations are reused (the dev sources did
    # not change), only the scores are new.
    shutil.rmtree(run.merged("xx-en.slavic"))
    built = {c: (cands / c / "module" / artifacts.DONE).stat().st_mtime_ns for c in hyps}
    from datm.eval import translate

    monkeypatch.setattr(translate.Translator, "translate", lambda *a, **k: pytest.fail("re-translated"))
    _merge(cfg)
    assert {c: (cands / c / "module" / artifacts.DONE).stat().st_mtime_ns for c in hyps} == built

    info = artifacts.read_json(run.merged("xx-en.slavic") / "merge_info.json")
    sel = info["selection"]
    assert sel["chosen"] == target
    rows = {r["candidate"]: r for r in sel["candidates"]}
    assert rows[target]["chrf"]["cs-en"] == pytest.approx(100.0)
    assert rows[target]["mean_chrf"] == max(r["mean_chrf"] for r in rows.values())
    assert sel["dev"]["cs-en"]["source"] == "valid" and sel["dev"]["ru-en"]["source"] == "held-out"
    assert info["method"] == rows[target]["method"]
    chosen = cands / target / "module" / "adapter_model.safetensors"
    shipped = run.merged("xx-en.slavic") / "adapter_model.safetensors"
    assert chosen.read_bytes() == shipped.read_bytes()
    assert artifacts.is_done(run.merged("xx-en.slavic"))
    section = merge_select.report_section(run.root)
    assert f"chose `{target}`" in section and "ties-d0.2-r1" in section

    # The whole run: the report shows the choice.
    monkeypatch.undo()
    runner.run(cfg)
    report = run.report.read_text(encoding="utf-8")
    assert "## Merge chosen on the dev set (merge: auto)" in report and f"chose `{target}`" in report


def test_a_killed_candidate_scoring_keeps_the_dev_translations_it_finished(
    tmp_path, tiny_model_dir, data_dir, monkeypatch
):
    """Dev translations are the long part of merge auto: each candidate's is kept as it finishes, so a
    merge task killed between candidates translates only the rest when it runs again."""
    from datm.eval import translate

    cfg = auto_config(tmp_path, tiny_model_dir, data_dir)
    run = RunDir(cfg.output_dir)
    real, calls = translate.Translator.translate, []

    def dies_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(translate.Translator, "translate", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _merge(cfg)
    cands = run.candidates("xx-en.slavic")
    kept = sorted(p.parent.name for p in cands.glob("*/translations.json"))
    assert len(kept) == 1

    calls.clear()

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(translate.Translator, "translate", counted)
    _merge(cfg)
    rows = artifacts.read_json(cands / "selection.json")["candidates"]
    assert len(calls) == len([r for r in rows if r["same_as"] is None]) - 1
