"""The adapter cache: runs that would train the same adapter train it once, with the same result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import TRAIN, save_config, tiny_config

from datm import config as C
from datm.cli import main
from datm.train.cache import REUSED, adapter_key


def write_config(tmp_path: Path, model: Path, data: Path, strategy: str, out: str, cache: bool) -> Path:
    raw = tiny_config(model, data, tmp_path / out, strategy=strategy, train={**TRAIN, "steps": 2}, merge=None)
    if cache:
        raw["adapter_cache"] = str(tmp_path / "cache")
    return save_config(tmp_path / f"{out}.yaml", raw)


def test_a_second_run_takes_identical_adapters_from_the_cache_and_gets_the_same_results(
    tmp_path, tiny_model_dir, alma_dir, capsys
):
    # separate trains de-en, cs-en, ru-en, en-de, en-cs, en-ru; group_family trains the germanic
    # group ({de}) as de-en and en-de: the very adapters separate trained.
    sep = write_config(tmp_path, tiny_model_dir, alma_dir, "separate", "sep", cache=True)
    joint = write_config(tmp_path, tiny_model_dir, alma_dir, "group_family", "joint", cache=True)
    plain = write_config(tmp_path, tiny_model_dir, alma_dir, "group_family", "plain", cache=False)
    assert main(["run", str(sep)]) == 0
    assert main(["run", str(joint)]) == 0
    out = capsys.readouterr().out
    assert out.count("in the cache") == 2
    adapters = tmp_path / "joint" / "adapters"
    for name in ("de-en", "en-de"):
        reused = json.loads((adapters / name / REUSED).read_text())
        assert reused["adapter"] == name and reused["run"] == str(tmp_path / "joint")
        mine = (adapters / name / "adapter_model.safetensors").stat()
        theirs = (tmp_path / "sep" / "adapters" / name / "adapter_model.safetensors").stat()
        assert mine.st_ino == theirs.st_ino  # hard links, not copies
    for name in ("xx-en.slavic.joint", "en-xx.slavic.joint"):
        assert not (adapters / name / REUSED).exists()  # trained here: no run had it

    # The same plan without the cache trains every adapter itself: same bytes, same translations.
    assert main(["run", str(plain)]) == 0
    for name in ("de-en", "en-de", "xx-en.slavic.joint"):
        cached = (adapters / name / "adapter_model.safetensors").read_bytes()
        trained = (tmp_path / "plain" / "adapters" / name / "adapter_model.safetensors").read_bytes()
        assert cached == trained, name
    for hyp in (tmp_path / "plain" / "translations").glob("*.hyp.txt"):
        assert (tmp_path / "joint" / "translations" / hyp.name).read_text() == hyp.read_text()

    # Resuming the cached run rebuilds nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in adapters.rglob("*") if p.is_file()}
    assert main(["run", str(joint)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_the_key_changes_with_what_trains_the_adapter_and_only_with_that():
    base = {
        "model_fingerprint": "m",
        "data_fingerprint": "d",
        "directions": ["de-en"],
        "lora": C.LoraConfig(),
        "train": C.TrainConfig(),
        "prompt": "alma",
        "device_type": "cpu",
        "world_size": 1,
        "precision": "bf16",
        "versions": {"torch": "2.13.0", "peft": "0.18", "python": "3.11"},
    }
    key = adapter_key(**base)
    assert adapter_key(**{**base, "train": dataclasses.replace(C.TrainConfig(), checkpoint_every=7)}) == key
    # auto and what it resolved to are one key; the python patch level is not part of it
    assert adapter_key(**{**base, "train": dataclasses.replace(C.TrainConfig(), precision="bf16")}) == key
    assert adapter_key(**{**base, "versions": {**base["versions"], "python": "3.12"}}) == key
    changed = [
        {"data_fingerprint": "e"},
        {"model_fingerprint": "n"},
        {"directions": ["de-en", "cs-en"]},
        {"lora": dataclasses.replace(C.LoraConfig(), r=32)},
        {"train": dataclasses.replace(C.TrainConfig(), lr=0.1)},
        {"train": dataclasses.replace(C.TrainConfig(), seed=2)},
        {"prompt": "chat"},
        {"device_type": "cuda"},
        {"world_size": 2},
        {"precision": "no"},  # what train.precision: auto resolved to
        {"versions": {"torch": "2.14.0", "peft": "0.18", "python": "3.11"}},
    ]
    for change in changed:
        assert adapter_key(**{**base, **change}) != key, change


@pytest.mark.parametrize("value", [3, "", ["a"]])
def test_a_bad_adapter_cache_is_a_config_error(value):
    raw = {"languages": ["de"], "data": {"train": "t.jsonl", "test": "t.jsonl"}, "adapter_cache": value}
    with pytest.raises(C.ConfigError, match="adapter_cache"):
        C.from_dict(raw, source="x.yaml")
