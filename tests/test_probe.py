"""Gradient probe on the tiny model, its summaries, the `auto` plan it feeds, and the CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import save_config, tiny_config

from datm import data, models
from datm.auto.probe import (
    ProbeError,
    ProbeResult,
    auto_measurements_from_probe,
    family_similarity,
    layer_of,
    probe,
    write_probe,
)
from datm.cli import main
from datm.config import LoraConfig
from datm.languages import Direction
from datm.plan import MeasurementsRequired, auto_plan, make_plan

LORA = LoraConfig(r=4, alpha=8, dropout=0.1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run fastest on one thread, and two threads crawl on a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(str(tiny_model_dir)), models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def examples(tiny, alma_dir) -> dict[str, list[data.Example]]:
    """Six directions' examples, given En→XX first (the probe must reorder them)."""
    _, tok = tiny
    fmt = data.PromptFormat(tok, "alma")
    out = {}
    for d in ["en-de", "en-cs", "en-ru", "de-en", "cs-en", "ru-en"]:
        pairs = data.read_direction(str(alma_dir / "train.{xx}-en.jsonl"), Direction.parse(d))
        out[d] = data.tokenize_pairs(pairs[:6], fmt, 64)[0]
    return out


def lora_modules(model) -> list[str]:
    return [n for n, _ in model.named_modules() if "lora" in n.lower()]


def test_layer_index_from_parameter_names():
    assert layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight") == 3
    assert layer_of("transformer.h.11.attn.c_attn.lora_B.default.weight") == 11
    assert layer_of("base_model.model.lm_head.lora_B.default.weight") is None


def test_probe_matrix_properties_and_model_restored(tiny, examples):
    model, tok = tiny
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    result = probe(model, tok, examples, LORA, seed=3, batch_size=4)

    assert result.directions == ["de-en", "cs-en", "ru-en", "en-de", "en-cs", "en-ru"]
    n = len(result.directions)
    m = result.matrix
    assert len(m) == n and all(len(row) == n for row in m)
    assert all(m[i][i] == 1.0 for i in range(n))
    assert all(m[i][j] == m[j][i] for i in range(n) for j in range(n))
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for row in m for v in row)
    assert max(abs(m[i][j]) for i in range(n) for j in range(n) if i != j) < 0.999  # directions differ
    assert sorted(result.per_layer) == [0, 1]  # the tiny model's two layers
    for layer in result.per_layer.values():
        assert len(layer) == n and all(layer[i][j] == layer[j][i] for i in range(n) for j in range(n))
        assert all(math.isfinite(v) for row in layer for v in row)
    assert result.per_layer[0] != result.per_layer[1]
    assert result.examples == {d: 6 for d in result.directions}
    assert result.parameters > 0 and result.seconds >= 0

    # the model comes back as it was: no LoRA layers, same weights, trainable again, in train mode
    assert lora_modules(model) == []
    assert {n for n, _ in model.named_parameters()} == set(weights)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_probe_is_deterministic_with_a_seed_and_independent_of_batching(tiny, examples):
    model, tok = tiny
    first = probe(model, tok, examples, LORA, seed=5, batch_size=4)
    again = probe(model, tok, examples, LORA, seed=5, batch_size=4)
    assert again.matrix == first.matrix and again.per_layer == first.per_layer
    # the gradient is the mean over all target tokens, whatever the batches
    rebatched = probe(model, tok, examples, LORA, seed=5, batch_size=1)
    assert np.allclose(rebatched.matrix, first.matrix, atol=1e-5, rtol=0)
    # another seed is another LoRA initialisation, so other gradients
    other = probe(model, tok, examples, LORA, seed=6, batch_size=4)
    assert not np.allclose(other.matrix, first.matrix, atol=1e-3, rtol=0)


def test_same_data_under_two_names_has_cosine_one(tiny, examples):
    model, tok = tiny
    twins = {"de-en": examples["de-en"], "cs-en": examples["de-en"], "en-ru": examples["en-ru"]}
    result = probe(model, tok, twins, LORA, seed=1)
    assert result.similarity("de-en", "cs-en") == pytest.approx(1.0, abs=1e-6)
    assert all(layer[0][1] == pytest.approx(1.0, abs=1e-6) for layer in result.per_layer.values())
    assert result.similarity("de-en", "en-ru") < 0.99


def test_probe_refuses_bad_input(tiny, examples):
    model, tok = tiny
    with pytest.raises(ProbeError, match="at least 2"):
        probe(model, tok, {"de-en": examples["de-en"]}, LORA)
    with pytest.raises(ProbeError, match=r"no examples for direction\(s\) \['cs-en'\]"):
        probe(model, tok, {"de-en": examples["de-en"], "cs-en": []}, LORA)
    from peft import get_peft_model

    from datm.train import peft_lora_config

    wrapped = get_peft_model(model, peft_lora_config(LORA))
    try:
        with pytest.raises(ProbeError, match="already carries LoRA"):
            probe(model, tok, examples, LORA)
    finally:
        wrapped.unload()
        model.requires_grad_(True)


def constructed(directions: list[str], matrix: list[list[float]], groups=None) -> ProbeResult:
    return ProbeResult(directions, matrix, {0: matrix}, 0.0, groups=groups)


DIRS = ["de-en", "cs-en", "ru-en", "en-de", "en-cs", "en-ru"]
MATRIX = [
    [1.0, 0.1, 0.3, 0.0, 0.0, 0.0],
    [0.1, 1.0, -0.2, 0.0, 0.0, 0.0],
    [0.3, -0.2, 1.0, 0.0, 0.0, 0.5],
    [0.0, 0.0, 0.0, 1.0, 0.6, 0.4],
    [0.0, 0.0, 0.0, 0.6, 1.0, 0.2],
    [0.0, 0.0, 0.5, 0.4, 0.2, 1.0],
]


def test_family_similarity_means_over_pairs():
    sims = family_similarity(DIRS, MATRIX)
    assert sims["xx-en"] == pytest.approx((0.1 + 0.3 - 0.2) / 3)
    assert sims["en-xx"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)
    assert sims["cross"] == pytest.approx(0.5 / 9)
    assert family_similarity(["de-en", "cs-en"], [[1, 0.2], [0.2, 1]])["en-xx"] is None


def test_auto_measurements_are_means_within_group_and_family():
    groups = {"west": ["de"], "east": ["cs", "ru"]}
    got = auto_measurements_from_probe(constructed(DIRS, MATRIX, groups))
    assert got == {
        "de-en": 0.0,  # alone in its group: nobody to train with
        "cs-en": pytest.approx(-0.2),
        "ru-en": pytest.approx(-0.2),
        "en-de": 0.0,
        "en-cs": pytest.approx(0.2),
        "en-ru": pytest.approx(0.2),
    }
    one_group = auto_measurements_from_probe(constructed(DIRS, MATRIX).to_dict(), {"all": ["de", "cs", "ru"]})
    assert one_group["de-en"] == pytest.approx((0.1 + 0.3) / 2)
    with pytest.raises(ProbeError, match="no groups"):
        auto_measurements_from_probe(constructed(DIRS, MATRIX))


LANGS = ["de", "is", "cs", "ru", "zh"]
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"], "cjk": ["zh"]}


def partition(plan) -> set[frozenset[str]]:
    """Which directions share a module, whatever the modules are called."""
    by_module: dict[str, set[str]] = {}
    for d, module in plan.routes.items():
        by_module.setdefault(module, set()).add(d)
    return {frozenset(v) for v in by_module.values()}


def test_auto_plan_follows_its_rule():
    measurements = {
        "de-en": 0.3,  # the only joint XX→En direction of germanic: own adapter, merged
        "is-en": -0.1,
        "cs-en": 0.2,  # cs-en and ru-en: one joint adapter
        "ru-en": 0.5,
        "zh-en": 0.0,  # = threshold: separate
        "en-de": 0.4,
        "en-is": 0.5,
        "en-cs": -0.2,
        "en-ru": 0.1,
        "en-zh": 0.0,
    }
    plan = auto_plan(LANGS, GROUPS, measurements)
    adapters = {a.name: a.directions for a in plan.adapters}
    assert adapters == {
        "de-en": ["de-en"],
        "is-en": ["is-en"],
        "en-xx.germanic.joint": ["en-de", "en-is"],
        "xx-en.slavic.joint": ["cs-en", "ru-en"],
        "en-cs": ["en-cs"],
        "en-ru": ["en-ru"],
        "zh-en": ["zh-en"],
        "en-zh": ["en-zh"],
    }
    assert [(m.name, m.sources, m.method) for m in plan.merges] == [
        ("xx-en.germanic", ["de-en", "is-en"], "ties")
    ]
    assert plan.routes["de-en"] == plan.routes["is-en"] == "xx-en.germanic"
    assert plan.routes["en-cs"] == "en-cs" and plan.routes["en-ru"] == "en-ru"  # En→XX: never merged
    assert plan.routes["cs-en"] == "xx-en.slavic.joint" and plan.routes["zh-en"] == "zh-en"
    assert plan.notes["cs-en"] == "joint (probe cos 0.20 > 0.00) in xx-en.slavic.joint"
    assert plan.notes["is-en"] == "separate (probe cos -0.10 <= 0.00); merged into xx-en.germanic (ties)"
    assert plan.notes["de-en"].startswith("own adapter: joint (probe cos 0.30 > 0.00)")
    assert plan.notes["en-cs"] == "separate (probe cos -0.20 <= 0.00); shipped unmerged"
    assert plan.notes["zh-en"] == "separate (probe cos 0.00 <= 0.00)"
    assert "rule" in plan.notes and set(plan.notes) - {"rule"} == set(plan.routes)
    assert plan.strategy == "auto" and list(plan.routes) == [
        str(d) for d in make_plan("dat", LANGS, GROUPS).directions()
    ]

    # a higher threshold turns joint directions separate
    strict = auto_plan(LANGS, GROUPS, measurements, threshold=0.45, source="pilot", method="linear")
    assert strict.routes["cs-en"] == "xx-en.slavic" and strict.merges[-1].method == "linear"
    assert strict.notes["ru-en"].startswith("own adapter: joint (pilot Δ 0.50 > 0.45)")


def test_auto_plan_reproduces_datm_when_measurements_agree_with_the_paper():
    # XX→En conflicts, En→XX shares: DATM's structure
    measurements = {f"{x}-en": -0.1 for x in LANGS} | {f"en-{x}": 0.3 for x in LANGS}
    measurements["en-zh"] = 0.0  # a one-language group measures 0
    plan = auto_plan(LANGS, GROUPS, measurements)
    assert partition(plan) == partition(make_plan("datm", LANGS, GROUPS))


def test_auto_needs_measurements():
    with pytest.raises(MeasurementsRequired, match=r"datm\.auto\.build_plan"):
        make_plan("auto", LANGS, GROUPS)
    with pytest.raises(ValueError, match=r"missing \['en-zh'\].*not in this config \['fr-en'\]"):
        auto_plan(
            LANGS,
            GROUPS,
            {f"{x}-en": 0.1 for x in LANGS} | {f"en-{x}": 0.1 for x in LANGS[:-1]} | {"fr-en": 1},
        )
    with pytest.raises(ValueError, match="finite"):
        auto_plan(["de"], {"g": ["de"]}, {"de-en": float("nan"), "en-de": 0.0})


def write_config(tmp_path: Path, model_dir: Path, data_dir: Path, strategy: str = "auto") -> Path:
    raw = tiny_config(
        model_dir,
        data_dir,
        "out",
        data={"train": f"{data_dir}/train.{{xx}}-en.jsonl"},
        strategy=strategy,
        auto={"source": "probe", "probe_examples": 5},
        train={"steps": 1, "batch_size": 4, "max_examples_per_pair": 8, "seed": 2},
        merge=None,
        eval=None,
    )
    return save_config(tmp_path / "probe.yaml", raw)


def test_probe_and_auto_plan_commands(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    assert main(["plan", str(cfg)]) == 0  # no probe yet: says how to take it
    printed = capsys.readouterr().out
    assert "auto: source probe, threshold 0" in printed and "run `datm probe CONFIG`" in printed
    assert main(["plan", str(cfg), "--json"]) == 2  # no plan to print as JSON
    assert "probe.json does not exist yet" in capsys.readouterr().err

    assert main(["probe", str(cfg), "--examples", "5"]) == 0
    printed = capsys.readouterr().out
    probe_json = tmp_path / "out" / "probe" / "probe.json"
    assert str(probe_json) in printed and "within XX→En" in printed
    saved = json.loads(probe_json.read_text())
    assert saved["directions"] == ["de-en", "cs-en", "ru-en", "en-de", "en-cs", "en-ru"]
    assert saved["examples"] == dict.fromkeys(saved["directions"], 5)
    assert saved["groups"] == {"germanic": ["de"], "slavic": ["cs", "ru"]}
    assert set(saved["per_layer"]) == {"0", "1"} and len(saved["matrix"]) == 6
    assert saved["family_similarity"] == family_similarity(saved["directions"], saved["matrix"])
    image = matplotlib.image.imread(tmp_path / "out" / "probe" / "probe.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 200

    # `datm plan` of an auto config reads <output_dir>/probe/probe.json and applies the rule
    assert main(["plan", str(cfg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    measured = auto_measurements_from_probe(probe_json)
    assert plan["routes"]["de-en"] == "de-en" and plan["notes"]["de-en"].startswith(
        "separate (probe cos 0.00"
    )
    slavic_xx = plan["routes"]["cs-en"] == plan["routes"]["ru-en"] == "xx-en.slavic.joint"
    assert slavic_xx == (measured["cs-en"] > 0)
    assert f"{measured['en-cs']:.2f}" in plan["notes"]["en-cs"]
    assert main(["plan", str(cfg), "--threshold", "1.0"]) == 0  # nothing is above 1: all separate
    text = capsys.readouterr().out
    assert "xx-en.slavic " in text and ".joint" not in text and "shipped unmerged" in text

    # --out, and --measurements refused for a fixed strategy
    other = tmp_path / "elsewhere"
    assert main(["probe", str(cfg), "--out", str(other), "--examples", "2"]) == 0
    assert json.loads((other / "probe.json").read_text())["examples"]["en-ru"] == 2
    fixed = write_config(tmp_path, tiny_model_dir, alma_dir, strategy="datm")
    assert main(["plan", str(fixed), "--measurements", str(probe_json)]) == 2
    assert "are for strategy auto; the config has strategy 'datm'" in capsys.readouterr().err


def test_write_probe_roundtrip(tmp_path):
    result = constructed(DIRS, MATRIX, {"g": ["de", "cs", "ru"]})
    path = write_probe(result, tmp_path / "p")
    loaded = ProbeResult.from_dict(json.loads(path.read_text()))
    assert loaded.matrix == MATRIX and loaded.per_layer == {0: MATRIX} and loaded.groups == result.groups
    with pytest.raises(ProbeError, match="must be 6×6"):
        ProbeResult.from_dict({**result.to_dict(), "matrix": MATRIX[:5]}, "x.json")
