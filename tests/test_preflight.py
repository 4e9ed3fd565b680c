"""Data files are checked before any model loads; test sets are never read backwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_alma

from datm import data, models
from datm.cli import main
from datm.languages import Direction


def config(
    tmp_path: Path, data_dir: Path, strategy: str = "separate", test: str = "test.{src}-{tgt}"
) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""
base_model: {tmp_path / "no-model-needed"}
languages: [de, cs]
groups: {{germanic: [de], slavic: [cs]}}
data:
  train: {data_dir}/train.{{src}}-{{tgt}}.jsonl
  test: {data_dir}/{test}.jsonl
strategy: {strategy}
lora: {{r: 2, alpha: 4}}
train: {{steps: 1, batch_size: 2, max_examples_per_pair: 4, checkpoint_every: 0}}
eval: {{max_examples: 2, max_new_tokens: 3}}
output_dir: out
"""
    )
    return cfg


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "load_tokenizer", boom)


def both_ways(d: Path, lang: str, n: int = 6) -> None:
    write_alma(d / f"train.{lang}-en.jsonl", lang, n)
    write_alma(d / f"test.{lang}-en.jsonl", lang, 3)
    write_alma(d / f"test.en-{lang}.jsonl", lang, 3)


@pytest.mark.parametrize("command", ["run", "train"])
def test_missing_train_file_errors_before_the_model_loads(tmp_path, no_model, capsys, command):
    d = tmp_path / "data"
    d.mkdir()
    both_ways(d, "de")
    write_alma(d / "test.cs-en.jsonl", "cs", 3)
    write_alma(d / "test.en-cs.jsonl", "cs", 3)  # no train file for cs at all
    assert main([command, str(config(tmp_path, d))]) == 2
    err = capsys.readouterr().err
    assert "train.cs-en.jsonl" in err and "does not exist" in err


def test_missing_test_file_errors_before_the_model_loads(tmp_path, no_model, capsys):
    d = tmp_path / "data"
    d.mkdir()
    both_ways(d, "de")
    both_ways(d, "cs")
    (d / "test.en-cs.jsonl").unlink()
    assert main(["run", str(config(tmp_path, d, strategy="zero_shot"))]) == 2
    assert "test.en-cs.jsonl" in capsys.readouterr().err


def test_unreadable_train_file_errors_before_the_model_loads(tmp_path, no_model, capsys):
    d = tmp_path / "data"
    d.mkdir()
    both_ways(d, "de")
    both_ways(d, "cs")
    (d / "train.cs-en.jsonl").unlink()
    (d / "train.cs-en.jsonl").mkdir()
    assert main(["train", str(config(tmp_path, d))]) == 2
    assert "train.cs-en.jsonl is a directory" in capsys.readouterr().err


def test_test_set_never_falls_back_to_the_reverse_direction(tmp_path):
    write_alma(tmp_path / "test.is-en.jsonl", "de", 3)  # only the is-en set exists
    pattern = str(tmp_path / "test.{src}-{tgt}.jsonl")
    with pytest.raises(data.DataError) as e:
        data.read_direction(pattern, Direction("en", "de"), split="test", allow_reverse=False)
    assert "test.en-de.jsonl" in str(e.value)
    write_alma(tmp_path / "test.de-en.jsonl", "de", 3)
    with pytest.raises(data.DataError) as e:
        data.check_readable(pattern, Direction("en", "de"), allow_reverse=False, split="test")
    assert "test.en-de.jsonl does not exist" in str(e.value) and "test.de-en.jsonl" in str(e.value)


def test_run_refuses_to_score_en_xx_on_the_xx_en_test_set(tmp_path, no_model, capsys):
    d = tmp_path / "data"
    d.mkdir()
    both_ways(d, "de")
    both_ways(d, "cs")
    (d / "test.en-cs.jsonl").unlink()  # test.cs-en.jsonl is there: must not be used backwards
    assert main(["run", str(config(tmp_path, d, strategy="zero_shot"))]) == 2
    err = capsys.readouterr().err
    assert "test.en-cs.jsonl does not exist" in err and "never scores en-cs on the cs-en set" in err


def test_training_on_the_reverse_file_is_recorded_in_train_info(tmp_path, tiny_model_dir, capsys):
    d = tmp_path / "data"
    d.mkdir()
    both_ways(d, "de")
    both_ways(d, "cs")
    cfg = config(tmp_path, d)
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "no-model-needed"), str(tiny_model_dir)))
    # train.{src}-{tgt}: only the xx-en files exist, so en-xx reads them backwards
    assert main(["train", str(cfg), "--adapter", "en-cs"]) == 0
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "adapters" / "en-cs" / "train_info.json").read_text())
    reversed_files = info["reversed_files"]
    assert reversed_files == {"en-cs": str(d / "train.cs-en.jsonl")}
    assert "reverse direction's file" in out
