"""The test split never decides: the pilot's and `merge: auto`'s dev data are compared with the test
split as files and as content, whatever their patterns look like, before anything trains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_valid

from datm.cli import main


def _config(tmp_path: Path, model: Path, data: Path, valid: str, strategy: str, merge: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""
base_model: {model}
languages: [de, cs]
groups: {{g: [de, cs]}}
data:
  train: {data}/train.{{xx}}-en.jsonl
  test: {data}/test.{{src}}-{{tgt}}.jsonl
  valid: {valid}
strategy: {strategy}
auto: {{pilot: {{fraction: 0.5}}}}
lora: {{r: 4, alpha: 8}}
train: {{steps: 2, batch_size: 4, max_examples_per_pair: 8, seed: 1, checkpoint_every: 0}}
merge: {merge}
eval: {{max_examples: 2, max_new_tokens: 4}}
output_dir: {tmp_path / "out"}
"""
    )
    return cfg


PILOT = ("auto", "{method: ties, density: 0.5}")
MERGE_AUTO = ("datm", "{method: auto, candidates: [{method: ties, density: 0.5}], dev_size: 2}")


def _copy_test_as_valid(data: Path) -> str:
    for lang in ("de", "cs"):
        shutil.copy(data / f"test.{lang}-en.jsonl", data / f"dev-copy.{lang}-en.jsonl")
    return f"{data}/dev-copy.{{xx}}-en.jsonl"


@pytest.mark.parametrize("who", [PILOT, MERGE_AUTO], ids=["pilot", "merge-auto"])
@pytest.mark.parametrize(
    "valid",
    [
        lambda d: f"{d}/test.{{src}}-{{tgt}}.jsonl",  # the test pattern itself
        lambda d: f"{d}/./test.{{src}}-{{tgt}}.jsonl",  # the same files, written another way
        lambda d: f"{d}/test.{{xx}}-en.jsonl",  # another pattern that names the xx-en test files
        _copy_test_as_valid,  # other files, the test set's content
    ],
    ids=["same-pattern", "same-files", "other-pattern", "same-content"],
)
def test_dev_data_that_is_the_test_split_is_refused_before_training(
    tmp_path, tiny_model_dir, alma_dir, capsys, who, valid
):
    strategy, merge = who
    cfg = _config(tmp_path, tiny_model_dir, alma_dir, valid(alma_dir), strategy, merge)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "test split" in err and "test.de-en.jsonl" in err, err
    assert not (tmp_path / "out" / "adapters").exists() and not (tmp_path / "out" / "pilot").exists()


def test_a_dev_split_apart_from_the_test_split_is_accepted(tmp_path, tiny_model_dir, alma_dir):
    from datm import auto
    from datm import config as C
    from datm.run import preflight

    for lang in ("de", "cs"):
        write_valid(alma_dir / f"valid.{lang}-en.jsonl", lang)
    valid = f"{alma_dir}/valid.{{xx}}-en.jsonl"
    pilot = C.load(_config(tmp_path, tiny_model_dir, alma_dir, valid, *PILOT))
    preflight.check_auto_data(pilot)
    merge_auto = C.load(_config(tmp_path, tiny_model_dir, alma_dir, valid, *MERGE_AUTO))
    preflight.check_merge_dev(merge_auto, auto.build_plan(merge_auto))
