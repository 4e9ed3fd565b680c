"""Finished translations are keyed by the settings that made them: a rerun that asks for other eval
settings is refused by name (never the old hypotheses under the new settings' provenance), and merge
auto's dev translations are reused only for the settings they were made with."""

from __future__ import annotations

import json

import pytest
from test_merge_select import _merge, auto_config, data_dir  # noqa: F401 (data_dir: a fixture)
from test_text_lines import zero_shot_config

from datm import artifacts
from datm.artifacts import RunDir
from datm.cli import main
from datm.config import ConfigError
from datm.run import runner


def test_rerun_with_other_eval_settings_is_refused_never_relabelled(
    tmp_path, tiny_model_dir, alma_dir, capsys
):
    test = alma_dir / "test.{src}-{tgt}.jsonl"
    assert main(["run", str(zero_shot_config(tmp_path, tiny_model_dir, test))]) == 0
    run = RunDir(tmp_path / "run")
    hyps = {p: p.read_bytes() for p in run.translations_dir.glob("*.hyp.txt")}
    scores = run.scores.read_bytes()
    for changed, key in (
        ({"beams": 2}, "eval.beams"),
        ({"max_examples": 2}, "eval.max_examples"),
        ({"max_new_tokens": 5}, "eval.max_new_tokens"),
    ):
        capsys.readouterr()
        assert main(["run", str(zero_shot_config(tmp_path, tiny_model_dir, test, **changed))]) == 2, changed
        err = capsys.readouterr().err
        assert key in err and "hyp.txt" in err and "new output_dir" in err, err
        assert {p: p.read_bytes() for p in hyps} == hyps  # nothing rebuilt
        assert run.scores.read_bytes() == scores  # nor scored under the new settings' name

    # Once the old translations are gone, the new settings make new ones, and say so.
    for p in [*run.translations_dir.iterdir(), run.scores]:
        p.unlink()
    assert main(["run", str(zero_shot_config(tmp_path, tiny_model_dir, test, beams=2))]) == 0
    assert json.loads(run.scores.read_text())["provenance"]["config"]["eval"]["beams"] == 2
    for d in ("de-en", "en-de"):
        assert artifacts.read_json(run.translations(d).info)["settings"]["eval.beams"] == 2


def test_merge_auto_dev_translations_are_keyed_by_eval_settings(
    tmp_path,
    tiny_model_dir,
    data_dir,  # noqa: F811 (the fixture)
    monkeypatch,
):
    from datm.eval import translate

    cfg = auto_config(tmp_path, tiny_model_dir, data_dir)
    run = RunDir(cfg.output_dir)
    real, calls = translate.Translator.translate, []

    def dies_on_the_second(self, *args, **kwargs):
        calls.append(kwargs["beams"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(translate.Translator, "translate", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _merge(cfg)  # one candidate's dev translations (beams 1) are kept
    cands = run.candidates("xx-en.slavic")
    assert len(list(cands.glob("*/translations.json"))) == 1

    # Resumed with beams 2: the kept beams-1 translations are not taken for beams-2 ones.
    cfg.eval.beams = 2
    calls.clear()
    monkeypatch.setattr(
        translate.Translator,
        "translate",
        lambda self, *a, **k: calls.append(k["beams"]) or real(self, *a, **k),
    )
    _merge(cfg)
    rows = artifacts.read_json(cands / "selection.json")["candidates"]
    assert calls == [2] * len([r for r in rows if r["same_as"] is None])
    for f in cands.glob("*/translations.json"):
        assert artifacts.read_json(f)["settings"]["eval.beams"] == 2
    selection = artifacts.read_json(run.merged("xx-en.slavic") / "merge_info.json")["selection"]
    assert selection["settings"]["eval.beams"] == 2

    # The chosen merge is finished: another beam size would relabel a choice made at beams 2.
    cfg.eval.beams = 3
    with pytest.raises(ConfigError, match=r"merged/xx-en.slavic.*eval.beams"):
        runner.run(cfg)


def test_translations_record_their_engine_and_another_engine_never_reuses_them(
    tmp_path, tiny_model_dir, alma_dir, capsys
):
    """The conftest model runs on transformers only (auto says so); a translation recorded as made by
    another engine is never taken for this one's, nor scored under its name."""
    test = alma_dir / "test.{src}-{tgt}.jsonl"
    cfg = zero_shot_config(tmp_path, tiny_model_dir, test)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(tmp_path / "run")
    assert json.loads(run.scores.read_text())["provenance"]["engines"] == {
        "de-en": "transformers",
        "en-de": "transformers",
    }
    info = artifacts.read_json(run.translations("de-en").info)
    assert info["settings"]["eval.engine"] == "transformers"
    assert "auto" in info["engines"]["__base__"]["why"]  # why not vLLM
    info["settings"]["eval.engine"] = "vllm"  # as if vLLM had made it
    artifacts.atomic_write_json(run.translations("de-en").info, info)
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "eval.engine='vllm'" in err and "eval.engine='transformers'" in err and "de-en.hyp.txt" in err
