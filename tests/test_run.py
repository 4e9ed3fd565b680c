"""`datm run` end to end on a tiny model: plan → train → merge → translate → score → report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import save_config, tiny_config

from datm.cli import main


def write_config(tmp_path: Path, model_dir: Path, data_dir: Path, strategy: str, out: str) -> Path:
    return save_config(tmp_path / f"{out}.yaml", tiny_config(model_dir, data_dir, out, strategy=strategy))


@pytest.mark.parametrize("strategy", ["dat", "datm"])
def test_run_end_to_end(tmp_path, tiny_model_dir, alma_dir, strategy, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, strategy, f"run-{strategy}")
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / f"run-{strategy}"
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["routes"]) == {"de-en", "cs-en", "ru-en", "en-de", "en-cs", "en-ru"}
    adapters = {a["name"] for a in plan["adapters"]}
    assert adapters == {"de-en", "cs-en", "ru-en", "en-xx.germanic", "en-xx.slavic"}
    for a in adapters:
        assert (out / "adapters" / a / "adapter_model.safetensors").is_file()
    if strategy == "datm":
        assert {m["name"] for m in plan["merges"]} == {"xx-en.slavic"}  # germanic has one language
        assert plan["routes"]["de-en"] == "de-en"
        info = json.loads((out / "merged" / "xx-en.slavic" / "merge_info.json").read_text())
        assert info["method"] == "ties" and len(info["sources"]) == 2
        assert plan["routes"]["cs-en"] == "xx-en.slavic"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["directions"]) == set(plan["routes"])
    for d, s in scores["directions"].items():
        assert 0 <= s["bleu"] <= 100 and 0 <= s["chrf"] <= 100 and s["n"] == 3
        assert len((out / "translations" / f"{d}.hyp.txt").read_text().splitlines()) == 3
    assert {"xx-en", "en-xx"} <= set(scores["averages"])
    assert any("tok:13a" in v for v in scores["signatures"].values())
    prov = scores["provenance"]
    assert prov["seed"] == 1 and prov["model_fingerprint"] and prov["versions"]["transformers"]
    report = (out / "report.md").read_text()
    assert "de-en" in report and "en-ru" in report

    # A second invocation reuses everything: no file is rewritten, scores identical.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    hyps = {p: p.read_text() for p in (out / "translations").glob("*.hyp.txt")}
    assert main(["run", str(cfg)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert all(p.read_text() == t for p, t in hyps.items())
    again = json.loads((out / "scores.json").read_text())
    assert again["directions"] == scores["directions"]


def test_run_refuses_a_different_plan_in_the_same_output_dir(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "zero_shot", "shared-out")
    assert main(["run", str(cfg)]) == 0
    other = write_config(tmp_path, tiny_model_dir, alma_dir, "multilingual", "shared-out")
    assert main(["run", str(other)]) == 2
    assert "different plan" in capsys.readouterr().err


def test_plan_command_prints_table_and_parameter_counts(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "datm", "p")
    assert main(["plan", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "xx-en.slavic" in text and "modules shipped: 4" in text and "parameters shipped:" in text
    assert main(["plan", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "datm"
    assert not (tmp_path / "p").exists()  # planning runs nothing


def test_bad_data_line_stops_run_with_file_and_line(tmp_path, tiny_model_dir, alma_dir, capsys):
    bad = alma_dir / "train.cs-en.jsonl"
    bad.write_text(bad.read_text() + '{"translation": {"cs": "x"}}\n')
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "separate", "bad")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:13" in err and "missing key 'en'" in err


def test_translate_command_routes_stdin(tmp_path, tiny_model_dir, alma_dir, capsys, monkeypatch):
    import io

    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "datm", "tr")
    assert main(["run", str(cfg)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(
        "sys.stdin",
        io.TextIOWrapper(io.BytesIO(b"de-en\tdie katze sieht einen hund 1\nen-ru\tmy house is big 2\n")),
    )
    assert main(["translate", "--run", str(tmp_path / "tr"), "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    os.environ.pop("DATM_NOTHING", None)


def test_run_auto_probes_then_plans_from_measurements(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "auto", "auto")
    cfg.write_text(cfg.read_text() + "auto: {source: probe}\n")  # the default source is a pilot
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "auto"
    assert (out / "probe" / "probe.json").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"] == "auto"
    notes = {d: n for d, n in plan["notes"].items() if d != "rule"}
    assert set(notes) == set(plan["routes"]) and all("probe cos" in n for n in notes.values())
    assert set(json.loads((out / "scores.json").read_text())["directions"]) == set(plan["routes"])


def test_config_check_tolerates_new_settings_but_not_changes():
    from datm.run.runner import _differences

    old = {"data": {"train": "a"}, "train": {"steps": 3}}
    assert _differences(old, {"data": {"train": "a", "test_split": None}, "train": {"steps": 3}}) == []
    assert _differences(old, {"data": {"train": "b"}, "train": {"steps": 3}}) == ["data.train"]
    assert _differences(old, {"data": {}, "train": {"steps": 3}}) == ["data.train"]
