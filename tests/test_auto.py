"""`strategy: auto`: its config keys, one plan builder for `plan` and `run`, and the pilot end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TRAIN, tiny_config, write_alma, write_valid

from datm import config as C
from datm import models
from datm.analysis import analyze
from datm.cli import main


def auto_raw(**auto: Any) -> dict[str, Any]:
    return {
        "languages": ["de", "cs"],
        "groups": {"g": ["de", "cs"]},
        "strategy": "auto",
        "data": {
            "train": "/d/train.{xx}-en.jsonl",
            "test": "/d/test.{src}-{tgt}.jsonl",
            "valid": "/d/v.jsonl",
        },
        "train": {"steps": 4},
        "auto": auto,
    }


def test_auto_defaults_to_a_pilot_at_threshold_0():
    cfg = C.from_dict(auto_raw())
    assert (cfg.auto.source, cfg.auto.threshold, cfg.auto.pilot.fraction) == ("pilot", 0.0, 0.25)
    assert cfg.to_dict()["auto"]["pilot"]["metric"] == "chrf"


@pytest.mark.parametrize(
    ("auto", "key"),
    [
        ({"source": "oracle"}, "auto.source"),
        ({"source": ["pilot"]}, "auto.source"),
        ({"threshold": "high"}, "auto.threshold"),
        ({"threshold": float("nan")}, "auto.threshold"),
        ({"threshold": True}, "auto.threshold"),
        ({"probe_examples": 0}, "auto.probe_examples"),
        ({"pilot": {"fraction": 0}}, "auto.pilot.fraction"),
        ({"pilot": {"fraction": 1.5}}, "auto.pilot.fraction"),
        ({"pilot": {"max_examples": -1}}, "auto.pilot.max_examples"),
        ({"pilot": {"samples": 0}}, "auto.pilot.samples"),
        ({"pilot": {"metric": "ter"}}, "auto.pilot.metric"),
        ({"pilot": {"budget": 3}}, "auto.pilot: unknown key(s) ['budget']"),
        ({"pilot": 0.5}, "auto.pilot: expected a mapping"),
        ({"oracle": 1}, "auto: unknown key(s) ['oracle']"),
        ({"measurements": "m.json"}, "auto.measurements is read only with auto.source: file"),
        ({"source": "file"}, "auto.source file needs auto.measurements"),
        ({"source": "file", "measurements": "/no/such.json"}, "/no/such.json does not exist"),
    ],
)
def test_bad_auto_setting_is_refused_at_load_naming_the_key(auto, key):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(auto_raw(**auto), source="c.yaml")
    assert key in str(e.value) and str(e.value).startswith("c.yaml")


def test_pilot_without_data_valid_holds_out_training_pairs():
    raw = auto_raw()
    del raw["data"]["valid"]
    cfg = C.from_dict(raw)  # every direction's dev pairs are held-out training pairs
    assert cfg.dev_rule().holdout == 200 and cfg.dev_rule().valid is None
    raw["data"]["valid_holdout"] = 0
    with pytest.raises(C.ConfigError, match=r"data\.valid_holdout must be"):
        C.from_dict(raw)


def write_analysis_file(path: Path, deltas: dict[str, float]) -> Path:
    rows = {d: {"delta": v} for d, v in deltas.items()}
    path.write_text(json.dumps({"metric": "chrf", "directions": rows}))
    return path


def test_threshold_override_needs_strategy_auto(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("languages: [de]\ndata: {train: t}\ntrain: {steps: 1}\nstrategy: dat\n")
    assert main(["run", str(cfg), "--threshold", "0.5"]) == 2
    assert "are for strategy auto; the config has strategy 'dat'" in capsys.readouterr().err


def config_text(model: Path, data: Path, auto: str, steps: int = 2) -> str:
    """tiny_config as strategy auto with a dev split; `auto`: the auto section in YAML."""
    raw = tiny_config(
        model,
        data,
        "out",
        data={
            "train": f"{data}/train.{{xx}}-en.jsonl",
            "test": f"{data}/test.{{src}}-{{tgt}}.jsonl",
            "valid": f"{data}/valid.{{xx}}-en.jsonl",
        },
        strategy="auto",
        auto=yaml.safe_load(auto),
        train={**TRAIN, "steps": steps},
        eval={"max_examples": 3, "beams": 1, "max_new_tokens": 4},
    )
    return yaml.safe_dump(raw, sort_keys=False)


def test_plan_and_run_build_the_same_auto_plan(tmp_path, tiny_model_dir, alma_dir, capsys):
    deltas = {"de-en": 0.4, "cs-en": 1.2, "ru-en": 0.3, "en-de": -1.0, "en-cs": 2.0, "en-ru": -0.5}
    measured = write_analysis_file(tmp_path / "analysis.json", deltas)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        config_text(tiny_model_dir, alma_dir, f"{{source: file, measurements: {measured}, threshold: 0.35}}")
    )
    assert main(["plan", str(cfg), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    # threshold 0.35 from the config: ru-en (0.3) is separate, so cs-en has no joint partner
    assert planned["routes"]["cs-en"] == planned["routes"]["ru-en"] == "xx-en.slavic"
    assert planned["decided_by"]["threshold"] == 0.35 and planned["decided_by"]["source"] == "file"
    assert planned["decided_by"]["values"] == deltas
    assert main(["run", str(cfg)]) == 0
    ran = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert ran == planned
    capsys.readouterr()

    # an override goes through the same builder for both commands, and a run directory refuses it
    assert main(["plan", str(cfg), "--json", "--threshold", "0.25"]) == 0
    lower = json.loads(capsys.readouterr().out)
    assert lower["routes"]["cs-en"] == lower["routes"]["ru-en"] == "xx-en.slavic.joint"
    assert main(["run", str(cfg), "--threshold", "0.25"]) == 2
    assert "plan.json was written by a different plan" in capsys.readouterr().err


def test_pilot_end_to_end_decides_the_plan_on_the_dev_split(tmp_path, tiny_model_dir, alma_dir, capsys):
    for lang in ("de", "cs", "ru"):
        write_valid(alma_dir / f"valid.{lang}-en.jsonl", lang)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(tiny_model_dir, alma_dir, "{pilot: {fraction: 0.5, samples: 20}}", steps=2))

    # before the pilot: `datm plan` prints what the pilot costs and says how it is run
    assert main(["plan", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "auto: source pilot, threshold 0" in printed
    assert "0.5 of the training budget per adapter, 1 steps (full: 2)" in printed
    assert "scored on the dev pairs" in printed and "; data.valid;" in printed and "`datm run`" in printed

    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    pilot = out / "pilot"
    for role, strategy in (("separate", "separate"), ("joint", "group_family")):
        assert json.loads((pilot / role / "plan.json").read_text())["strategy"] == strategy
        run_cfg = json.loads((pilot / role / "config.json").read_text())
        assert run_cfg["train"]["steps"] == 1 and run_cfg["data"]["eval_on"] == "dev"
        for d in ("de-en", "en-cs"):  # scored on the dev split, not the test split
            refs = (pilot / role / "translations" / f"{d}.ref.txt").read_text().splitlines()
            assert len(refs) == 3 and all(" dev " in r for r in refs)
    # the joint run's one-direction adapters are the separate run's, trained once
    for name in ("de-en", "en-de"):
        sep, joint = (
            pilot / r / "adapters" / name / "adapter_model.safetensors" for r in ("separate", "joint")
        )
        assert sep.stat().st_ino == joint.stat().st_ino
    assert json.loads((pilot / "joint" / "plan.json").read_text())["routes"]["cs-en"] == "xx-en.slavic.joint"

    # the measurements are `datm analyze`'s Δ of the two pilot runs, and decide the final plan
    analysis = json.loads((pilot / "analysis" / "analysis.json").read_text())
    again = analyze.analyze(pilot / "separate", pilot / "joint", n_samples=20, seed=1)
    assert {d: r["delta"] for d, r in analysis["directions"].items()} == {
        d: r.delta for d, r in again.directions.items()
    }
    assert analysis["pilot"]["fraction"] == 0.5 and analysis["pilot"]["train"]["steps"] == 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["decided_by"]["source"] == "pilot" and plan["decided_by"]["kind"] == "pilot"
    deltas = {d: r["delta"] for d, r in analysis["directions"].items()}
    assert plan["decided_by"]["values"] == deltas
    for d in ("cs-en", "ru-en", "en-cs", "en-ru"):
        assert "pilot Δ" in plan["notes"][d]
    both = [d for d in ("cs-en", "ru-en") if deltas[d] > 0]
    assert (plan["routes"]["cs-en"] == "xx-en.slavic.joint") == (len(both) == 2)
    assert set(json.loads((out / "scores.json").read_text())["directions"]) == set(plan["routes"])
    test_refs = (out / "translations" / "de-en.ref.txt").read_text().splitlines()
    assert not any(" dev " in r for r in test_refs)  # the final run is scored on the test split

    # `datm plan` now builds the same plan; a second run trains nothing (resumed)
    capsys.readouterr()
    assert main(["plan", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan
    assert main(["plan", str(cfg), "--json", "--threshold", "-1000"]) == 0  # every Δ is above it
    lowered = json.loads(capsys.readouterr().out)
    assert lowered["routes"]["cs-en"] == lowered["routes"]["ru-en"] == "xx-en.slavic.joint"
    assert main(["run", str(cfg)]) == 0
    assert "running the pilot" not in capsys.readouterr().out

    # a pilot made with other settings is refused, not silently reused
    cfg.write_text(cfg.read_text().replace("fraction: 0.5", "fraction: 1.0"))
    assert main(["plan", str(cfg), "--json"]) == 2
    err = capsys.readouterr().err
    assert "made by a pilot with other settings" in err and "fraction" in err


def test_auto_data_is_checked_before_the_pilot_loads_a_model(tmp_path, alma_dir, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "load_tokenizer", boom)
    for lang in ("de", "cs"):  # no dev file for ru: its dev pairs are held out of its training pairs
        write_valid(alma_dir / f"valid.{lang}-en.jsonl", lang)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(tmp_path / "no-model", alma_dir, "{source: pilot}"))
    assert main(["run", str(cfg)]) == 2  # the default data.valid_holdout (200) leaves nothing to train on
    assert "ru has no data.valid and only" in capsys.readouterr().err.replace("en-ru", "ru").replace(
        "ru-en", "ru"
    )
    write_valid(alma_dir / "valid.ru-en.jsonl", "ru")
    (alma_dir / "test.en-ru.jsonl").unlink()  # the final run's test set is checked before the pilot too
    assert main(["run", str(cfg)]) == 2
    assert "test.en-ru.jsonl does not exist" in capsys.readouterr().err
    write_alma(alma_dir / "test.en-ru.jsonl", "ru", 4)
    (alma_dir / "train.cs-en.jsonl").unlink()
    assert main(["train", str(cfg)]) == 2
    assert "train.cs-en.jsonl does not exist" in capsys.readouterr().err


def test_merge_weights_are_counted_against_the_auto_plans_merges(tmp_path):
    from datm import auto

    measured = write_analysis_file(
        tmp_path / "a.json", {"de-en": -1.0, "cs-en": -1.0, "en-de": 1.0, "en-cs": 1.0}
    )
    raw = auto_raw(source="file", measurements=str(measured))
    raw["merge"] = {"weights": [1.0, 2.0, 3.0]}
    cfg = C.from_dict(raw, source="c.yaml")  # which merges auto makes is known only once measured
    with pytest.raises(
        C.ConfigError, match=r"merge\.weights has 3 value\(s\), but merge\(s\) \{'xx-en\.g': 2\}"
    ):
        auto.build_plan(cfg)
    raw["merge"] = {"weights": [1.0, 2.0]}
    assert auto.build_plan(C.from_dict(raw)).merges[0].sources == ["de-en", "cs-en"]


def test_held_out_dev_pairs_never_reach_training_and_a_stopped_pilot_resumes(
    tmp_path, tiny_model_dir, alma_dir, capsys, monkeypatch
):
    from datm.data import dev
    from datm.languages import Direction
    from datm.run import bodies, runner

    for lang in ("de", "cs"):  # ru has no dev file: its dev pairs are 3 held-out training pairs
        write_valid(alma_dir / f"valid.{lang}-en.jsonl", lang)
    raw = yaml.safe_load(config_text(tiny_model_dir, alma_dir, "{pilot: {fraction: 0.5, samples: 20}}"))
    raw["data"]["valid_holdout"] = 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    held = dev.held_out(C.load(cfg).dev_rule(), Direction.parse("ru-en"))
    origins = {p.origin for p in held}
    assert len(origins) == 3

    trained: dict[str, list] = {}  # run directory / adapter -> the pairs it trained on
    real_train_pairs = bodies.train_pairs

    def spy(c, directions, report, exclude=frozenset()):
        got = real_train_pairs(c, directions, report, exclude)
        trained[f"{c.output_dir}/{'+'.join(directions)}"] = got
        return got

    monkeypatch.setattr(bodies, "train_pairs", spy)
    real_run = runner.run

    def stop_at_the_joint_pilot(c, *a, **k):  # as if killed after the separate pilot finished
        if c.output_dir.endswith("pilot/joint"):
            raise KeyboardInterrupt
        return real_run(c, *a, **k)

    monkeypatch.setattr(runner, "run", stop_at_the_joint_pilot)
    assert main(["run", str(cfg)]) != 0
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    separate = tmp_path / "out" / "pilot" / "separate" / "adapters" / "ru-en" / "adapter_model.safetensors"
    before = separate.stat().st_mtime_ns
    monkeypatch.setattr(runner, "run", real_run)
    trained.clear()
    assert main(["run", str(cfg)]) == 0
    assert separate.stat().st_mtime_ns == before  # the finished pilot run was resumed, not redone
    assert not any("pilot/separate" in k for k in trained)
    assert any("pilot/joint" in k for k in trained) and any(k.startswith(f"{tmp_path}/out/") for k in trained)
    for name, pairs in trained.items():  # no training of the run, pilot or final, saw a held-out line
        assert not {p.origin for p in pairs} & origins, name
    ru = [p for k, ps in trained.items() if "ru" in k for p in ps]
    assert ru and {p.src_lang for p in ru} >= {"ru", "en"}  # both directions of the file skip them
    pilot_refs = (tmp_path / "out" / "pilot" / "joint" / "translations" / "ru-en.ref.txt").read_text()
    assert pilot_refs.splitlines() == [p.tgt for p in held]  # the pilot scored ru-en on them
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["dev"] == {
        "valid": ["de-en", "cs-en", "en-de", "en-cs"],
        "held_out": ["ru-en", "en-ru"],
        "valid_holdout": 3,
        "seed": raw["train"]["seed"],
    }


def full_pilot_config(tmp_path: Path) -> C.Config:
    raw = auto_raw(source="full_pilot")
    raw["output_dir"] = str(tmp_path / "out")
    return C.from_dict(raw, source="c.yaml")


def write_pilot_analysis(cfg: C.Config, rows: dict[str, tuple[float, float, float]]) -> None:
    """A finished pilot's analysis.json: per direction (Δ, low, high)."""
    from datm.auto import pilot

    path = pilot.analysis_path(cfg)
    path.parent.mkdir(parents=True)
    directions = {d: {"delta": v, "low": lo, "high": hi, "p_value": 0.5} for d, (v, lo, hi) in rows.items()}
    path.write_text(json.dumps({"metric": "chrf", "directions": directions, "pilot": pilot.settings(cfg)}))


def test_full_pilot_follows_significant_deltas_and_the_prior_elsewhere(tmp_path):
    from datm import auto

    cfg = full_pilot_config(tmp_path)
    write_pilot_analysis(
        cfg,
        {
            "de-en": (-2.0, -3.0, -1.0),  # a conflict above the noise: separate
            "cs-en": (0.5, -1.0, 2.0),  # within the noise: the prior, XX→En separate
            "en-de": (-0.3, -1.0, 0.4),  # within the noise: the prior, En→XX joint
            "en-cs": (1.5, 0.5, 2.5),  # a synergy above the noise: joint
        },
    )
    plan = auto.build_plan(cfg)
    assert plan.routes == {
        "de-en": "xx-en.g",
        "cs-en": "xx-en.g",
        "en-de": "en-xx.g.joint",
        "en-cs": "en-xx.g.joint",
    }
    assert plan.decided_by["prior"]["directions"] == ["cs-en", "en-de"] and "note" not in plan.decided_by
    assert "includes 0.00: the paper's prior" in plan.notes["en-de"] and "prior" not in plan.notes["en-cs"]
    # `pilot` at the same budget (the same numbers) follows every Δ's sign, noise included
    cfg.auto.source, cfg.auto.pilot.fraction = "pilot", 1.0
    assert auto.build_plan(cfg).routes["en-de"] == "en-de"


def test_full_pilot_says_when_nothing_is_above_the_noise(tmp_path, capsys):
    from datm import auto
    from datm.run import describe

    cfg = full_pilot_config(tmp_path)
    write_pilot_analysis(cfg, {d: (0.1, -1.0, 1.0) for d in ("de-en", "cs-en", "en-de", "en-cs")})
    plan = auto.build_plan(cfg)
    assert plan.routes == {
        "de-en": "xx-en.g",
        "cs-en": "xx-en.g",
        "en-de": "en-xx.g.joint",
        "en-cs": "en-xx.g.joint",
    }
    assert "no direction's pilot interval excludes 0" in plan.decided_by["note"]
    assert "no direction's pilot interval excludes 0" in describe.format_plan(plan)


def test_full_pilot_costs_the_full_budget_and_hands_its_adapters_over(tmp_path):
    from datm import artifacts, auto
    from datm.auto import pilot

    cfg = full_pilot_config(tmp_path)
    text = auto.describe(cfg)  # what `datm plan` prints before anything trains
    assert "pilot: 1 of the training budget per adapter, 4 steps (full: 4)" in text
    assert "its adapters are the run's own (linked, trained once)" in text
    assert pilot.pilot_train(cfg)["steps"] == cfg.train.steps
    write_pilot_analysis(
        cfg, {"de-en": (-2, -3, -1), "cs-en": (-2, -3, -1), "en-de": (2, 1, 3), "en-cs": (2, 1, 3)}
    )
    for role, name in (("separate", "de-en"), ("separate", "cs-en"), ("joint", "en-xx.g.joint")):
        adapter = pilot.pilot_dir(cfg) / role / "adapters" / name
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(name.encode())
        artifacts.mark_done(adapter, {"kind": "adapter"})
    plan = auto.build_plan(cfg)
    auto.hand_over(cfg, plan)
    for role, name in (("separate", "de-en"), ("separate", "cs-en"), ("joint", "en-xx.g.joint")):
        got = tmp_path / "out" / "adapters" / name / "adapter_model.safetensors"
        src = pilot.pilot_dir(cfg) / role / "adapters" / name / "adapter_model.safetensors"
        assert got.stat().st_ino == src.stat().st_ino  # linked: trained once


def test_full_pilot_run_trains_nothing_twice(tmp_path, tiny_model_dir, alma_dir, capsys):
    for lang in ("de", "cs", "ru"):
        write_valid(alma_dir / f"valid.{lang}-en.jsonl", lang)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(tiny_model_dir, alma_dir, "{source: full_pilot, pilot: {samples: 20}}"))
    assert main(["plan", str(cfg)]) == 0
    assert "pilot: 1 of the training budget per adapter, 2 steps (full: 2)" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["decided_by"]["source"] == "full_pilot" and "prior" in plan["decided_by"]
    pilot_files = {f.stat().st_ino for f in (out / "pilot").glob("*/adapters/*/adapter_model.safetensors")}
    for a in plan["adapters"]:  # every adapter of the run is a pilot's, linked
        assert (out / "adapters" / a["name"] / "adapter_model.safetensors").stat().st_ino in pilot_files
