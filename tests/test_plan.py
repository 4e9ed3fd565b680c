from __future__ import annotations

import pytest

from datm.languages import XALMA_GROUPS, resolve_groups
from datm.plan import BASE, Plan, make_plan, shipped_parameters
from datm.run.describe import format_plan

LANGS = ["de", "is", "cs", "ru", "zh"]
GROUPS = {"germanic": ["de", "is"], "slavic": ["cs", "ru"], "cjk": ["zh"]}
ALL_DIRS = {f"{x}-en" for x in LANGS} | {f"en-{x}" for x in LANGS}


def covered(plan: Plan) -> None:
    """Every direction is routed, to a module the plan builds, trained on that direction."""
    assert set(plan.routes) == ALL_DIRS
    adapters = {a.name: set(a.directions) for a in plan.adapters}
    merges = {m.name: m.sources for m in plan.merges}
    for d, mod in plan.routes.items():
        if mod in merges:
            assert any(d in adapters[s] for s in merges[mod]), (d, mod)
        else:
            assert d in adapters[mod], (d, mod)


def test_multilingual_one_adapter_all_directions():
    p = make_plan("multilingual", LANGS, GROUPS)
    assert [a.name for a in p.adapters] == ["multilingual"]
    assert set(p.adapters[0].directions) == ALL_DIRS
    assert p.merges == [] and p.shipped == ["multilingual"]
    covered(p)


def test_separate_one_adapter_per_direction():
    p = make_plan("separate", LANGS, GROUPS)
    assert len(p.adapters) == 10 and all(len(a.directions) == 1 for a in p.adapters)
    assert all(p.routes[d] == d for d in ALL_DIRS)
    covered(p)


def test_group_one_adapter_per_group_both_directions():
    p = make_plan("group", LANGS, GROUPS)
    assert {a.name: sorted(a.directions) for a in p.adapters} == {
        "group-germanic": ["de-en", "en-de", "en-is", "is-en"],
        "group-slavic": ["cs-en", "en-cs", "en-ru", "ru-en"],
        "group-cjk": ["en-zh", "zh-en"],
    }
    covered(p)


def test_dat_separate_xx_en_and_group_en_xx():
    p = make_plan("dat", LANGS, GROUPS)
    names = {a.name: a.directions for a in p.adapters}
    assert {n for n in names if n.endswith("-en")} == {f"{x}-en" for x in LANGS}
    assert names["en-xx.germanic"] == ["en-de", "en-is"]
    assert names["en-xx.slavic"] == ["en-cs", "en-ru"]
    assert p.routes["en-ru"] == "en-xx.slavic" and p.routes["ru-en"] == "ru-en"
    assert p.merges == [] and len(p.shipped) == 8
    covered(p)


def test_datm_merges_xx_en_per_group_and_ships_two_modules_per_group():
    p = make_plan("datm", LANGS, GROUPS)
    assert {m.name: m.sources for m in p.merges} == {
        "xx-en.germanic": ["de-en", "is-en"],
        "xx-en.slavic": ["cs-en", "ru-en"],
    }
    assert all(m.method == "ties" for m in p.merges)
    assert p.routes["is-en"] == "xx-en.germanic" and p.routes["en-is"] == "en-xx.germanic"
    # a one-language group needs no merge: its adapter is the group's XX→En module
    assert p.routes["zh-en"] == "zh-en"
    # two modules per group shipped; the per-language XX→En adapters of merged groups are not
    assert sorted(p.shipped) == sorted(
        ["xx-en.germanic", "xx-en.slavic", "zh-en"] + [f"en-xx.{g}" for g in GROUPS]
    )
    covered(p)


def test_separate_merged_merges_both_families():
    p = make_plan("separate_merged", LANGS, GROUPS)
    assert len(p.adapters) == 10 and len(p.merges) == 4  # the one-language cjk group is not merged
    assert p.routes["en-cs"] == "en-xx.slavic" and p.routes["cs-en"] == "xx-en.slavic"
    assert p.routes["en-zh"] == "en-zh"
    covered(p)


def test_zero_shot_routes_to_base():
    p = make_plan("zero_shot", LANGS, GROUPS)
    assert p.adapters == [] and set(p.routes.values()) == {BASE} and p.shipped == []


def test_plan_roundtrip_and_parameter_count():
    p = make_plan("datm", LANGS, GROUPS)
    q = Plan.from_dict(p.to_dict())
    assert q == p
    assert shipped_parameters(p, 1000, 10) == 1000 + 6 * 10  # 2 per group
    assert shipped_parameters(make_plan("separate", LANGS, GROUPS), 1000, 10) == 1000 + 10 * 10
    text = format_plan(p, 1000, 10)
    assert "modules shipped: 6" in text and "1,060" in text


def test_default_groups_are_xalma():
    assert sum(len(v) for v in XALMA_GROUPS.values()) == 49  # + English = X-ALMA's 50 languages
    g = resolve_groups(["de", "is", "cs", "zh"], None)
    assert g == {"group1": ["de", "is"], "group5": ["cs"], "group6": ["zh"]}


def test_bad_groups_and_languages():
    with pytest.raises(ValueError, match="known codes"):
        resolve_groups(["xx"], None)
    with pytest.raises(ValueError, match="in two groups"):
        resolve_groups(["de", "is"], {"a": ["de", "is"], "b": ["de"]})
    with pytest.raises(ValueError, match="in no group"):
        resolve_groups(["de", "is"], {"a": ["de"]})
    with pytest.raises(ValueError, match="unknown strategy"):
        make_plan("nope", LANGS, GROUPS)


def test_shipped_size_follows_the_merge_form():
    from datm.merge.forms import merged_module_parameters

    p = make_plan("datm", LANGS, GROUPS)
    low = merged_module_parameters(p, "lowrank", 10, 1000, 0.2)
    assert low == {"xx-en.germanic": 10, "xx-en.slavic": 10}
    assert shipped_parameters(p, 5000, 10, low) == 5000 + 6 * 10
    dense = merged_module_parameters(p, "dense", 10, 1000, 0.2)
    assert shipped_parameters(p, 5000, 10, dense) == 5000 + 4 * 10 + 2 * 1000
    sparse = merged_module_parameters(p, "sparse", 10, 1000, 0.2)
    assert sparse["xx-en.slavic"] == 400  # at most density x sources of the entries
    text = format_plan(p, 5000, 10, sparse, "sparse")
    assert "merged (sparse): ≤ 400, ≤ 400" in text and f"{5000 + 40 + 800:,}" in text
