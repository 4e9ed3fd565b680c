"""Config validation at load: every numeric setting, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from datm import config as C
from datm.cli import main


def base_raw(**overrides) -> dict:
    raw = {
        "languages": ["de", "cs", "ru"],
        "groups": {"germanic": ["de"], "slavic": ["cs", "ru"]},
        "data": {"train": "train.{xx}-en.jsonl", "test": "test.{src}-{tgt}.jsonl"},
        "strategy": "datm",
        "train": {"steps": 3},
    }
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key:
            raw.setdefault(section, {})[key] = value
        else:
            raw[section] = value
    return raw


BAD_NUMBERS = [
    ("lora.r", -4),
    ("lora.r", 0),
    ("lora.r", 2.5),
    ("lora.r", True),
    ("lora.r", "16"),
    ("lora.alpha", 0),
    ("lora.alpha", -1),
    ("lora.alpha", False),
    ("lora.dropout", -0.1),
    ("lora.dropout", 1.0),
    ("lora.dropout", "0.1"),
    ("train.steps", 0),
    ("train.steps", -3),
    ("train.steps", True),
    ("train.steps", 1.5),
    ("train.batch_size", 0),
    ("train.batch_size", True),
    ("train.grad_accum", 0),
    ("train.lr", 0),
    ("train.lr", -1e-4),
    ("train.lr", "2e-4"),
    ("train.lr", float("nan")),
    ("train.lr", float("inf")),
    ("train.warmup_ratio", -0.1),
    ("train.warmup_ratio", 1.5),
    ("train.weight_decay", -0.01),
    ("train.max_length", 0),
    ("train.max_examples_per_pair", 0),
    ("train.max_examples_per_pair", -5),
    ("train.checkpoint_every", -1),
    ("train.seed", 1.5),
    ("merge.density", 0),
    ("merge.density", 1.5),
    ("merge.density", True),
    ("merge.rank", 0),
    ("merge.rank", -2),
    ("merge.weights", [1.0]),  # slavic merges 2 sources
    ("merge.weights", [1.0, 1.0, 1.0]),
    ("merge.weights", [1.0, True]),
    ("merge.weights", [1.0, -1.0]),
    ("merge.weights", [0.0, 0.0]),
    ("merge.weights", "1,1"),
    ("merge.scale", 0),
    ("merge.scale", -0.5),
    ("merge.scale", "0.5"),
    ("merge.scale", float("inf")),
    ("merge.normalize", "yes"),
    ("merge.normalize", 1),
    ("eval.beams", 0),
    ("eval.beams", True),
    ("eval.max_new_tokens", 0),
    ("eval.batch_size", -1),
    ("eval.max_examples", 0),
]


@pytest.mark.parametrize("key, value", BAD_NUMBERS, ids=[f"{k}={v!r}" for k, v in BAD_NUMBERS])
def test_bad_numeric_setting_is_refused_naming_the_key(key, value):
    from datm import auto

    with pytest.raises(C.ConfigError) as e:  # at load, or (merge weights per merge) by the plan builder
        auto.build_plan(C.from_dict(base_raw(**{key: value}), source="x.yaml"))
    assert key in str(e.value), str(e.value)


def test_bad_epochs_is_refused_naming_the_key():
    raw = base_raw()
    raw["train"] = {"epochs": -1}
    with pytest.raises(C.ConfigError, match=r"train\.epochs"):
        C.from_dict(raw, source="x.yaml")


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora.r", 1),
        ("lora.alpha", 0.5),
        ("lora.dropout", 0),
        ("train.lr", 1),
        ("train.warmup_ratio", 0),
        ("train.checkpoint_every", 0),
        ("train.max_examples_per_pair", None),
        ("merge.density", 1),
        ("merge.weights", [2, 1.5]),
        ("merge.scale", 0.4),
        ("merge.scale", 2),
        ("merge.normalize", False),
        ("eval.max_examples", None),
    ],
)
def test_good_numeric_settings_load(key, value):
    C.from_dict(base_raw(**{key: value}), source="x.yaml")


def test_negative_rank_exits_2_from_the_cli_before_any_model(tmp_path, monkeypatch, capsys):
    from datm import models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "meta_model", boom)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "languages: [de]\ndata:\n  train: t.{xx}-en.jsonl\n  test: t.{src}-{tgt}.jsonl\n"
        "strategy: dat\nlora: {r: -4}\ntrain: {steps: 2}\n"
    )
    for command in ("plan", "run"):
        assert main([command, str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("datm: error:") and "lora.r" in err and "-4" in err
    assert not (tmp_path / "runs").exists()


def test_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(C.ConfigError, match="is a directory"):
        C.load(tmp_path)


def test_zero_shot_needs_no_train_section():
    raw = base_raw(strategy="zero_shot")
    del raw["train"]
    cfg = C.from_dict(raw, source="x.yaml")
    assert cfg.strategy == "zero_shot"


def test_training_strategy_without_budget_is_still_refused():
    raw = base_raw()
    del raw["train"]
    with pytest.raises(C.ConfigError, match="steps"):
        C.from_dict(raw, source="x.yaml")


def test_missing_config_file_says_it_does_not_exist(tmp_path: Path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")


def test_every_registry_holds_exactly_the_names_the_config_accepts():
    """The config checks names against datm.config.names before any stage is imported; each stage's
    registry must hold exactly those (a method added to the registry but not the list, or the other
    way round, would be refused at load or accepted and then fail)."""
    from datm.auto import SOURCES
    from datm.config import names
    from datm.eval.engines import ENGINES
    from datm.merge import METHODS
    from datm.merge.forms import FORMS
    from datm.plan import STRATEGIES
    from datm.run.executors import EXECUTORS
    from datm.run.graph import KINDS

    for listed, registry in [
        (names.STRATEGIES, STRATEGIES),
        (names.MERGE_METHODS, METHODS),
        (names.MERGE_FORMS, FORMS),
        (names.EXECUTORS, EXECUTORS),
        (names.TASK_KINDS, KINDS),
        (names.AUTO_SOURCES, SOURCES),
        (names.ENGINES, ENGINES),
    ]:
        assert tuple(registry) == listed
    with pytest.raises(AssertionError, match="differs from datm.config.names"):
        names.check_registry("strategy", names.STRATEGIES, {**STRATEGIES, "extra": None})


@pytest.mark.parametrize(
    "evals, match",
    [
        ({"engine": "onnx"}, r"eval\.engine must be auto or one of \['transformers', 'vllm'\], got 'onnx'"),
        ({"engine": "vllm", "beams": 4}, r"eval\.engine: vllm decodes greedily, and eval\.beams is 4"),
    ],
)
def test_eval_engine_is_checked_at_load(evals, match):
    raw = base_raw()
    raw["eval"] = evals
    with pytest.raises(C.ConfigError, match=match):
        C.from_dict(raw, source="x.yaml")
    assert C.from_dict({**raw, "eval": {**evals, "engine": "transformers"}}, source="x.yaml")
