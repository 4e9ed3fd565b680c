"""Model fingerprints cover every byte of what defines a model, and the adapter cache trusts nothing less."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import corpus_texts
from safetensors import safe_open
from safetensors.torch import save_file

from datm import models
from datm.cli import main
from datm.train.cache import REUSED


def _flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, keeping the file's size and (as a careless copy tool would) its mtime."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


@pytest.mark.parametrize("size_mib", [1.5, 3.0])
def test_a_change_anywhere_in_a_weights_file_changes_the_fingerprint(tmp_path, size_mib):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    n = int(size_mib * (1 << 20)) // 4
    save_file({"w": torch.arange(n, dtype=torch.float32)}, str(d / "model.safetensors"))
    before = models.fingerprint(d)
    # the middle of the file: past the first MiB, before the last MiB
    _flip_byte(d / "model.safetensors", (1 << 20) + 100_000)
    assert models.fingerprint(d) != before


def test_tokenizer_files_of_any_name_are_part_of_the_fingerprint(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "merges.txt").write_text("a b\n")
    (d / "README.md").write_text("a model card")
    before = models.fingerprint(d)
    (d / "README.md").write_text("another model card")  # documentation does not change the model
    assert models.fingerprint(d) == before
    (d / "merges.txt").write_text("a c\n")  # a BPE merge list does
    assert models.fingerprint(d) != before


def test_the_digest_cache_never_serves_a_stale_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("DATM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 5000)
    first = models.file_digest(f)
    assert models.file_digest(f) == first  # served from the cache
    _flip_byte(f, 2500)
    assert models.file_digest(f) != first
    f.write_bytes(b"a" * 5000)
    assert models.file_digest(f) == first
    # a corrupt cache entry is recomputed, not trusted
    for entry in (tmp_path / "cache").rglob("*.json"):
        entry.write_text("{not json")
    assert models.file_digest(f) == first


def _model_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two base models, B a copy of A with one weight changed in the middle of a 1-2 MiB file."""
    from datm.tiny import build_model_dir

    a = build_model_dir(tmp_path / "baseA", corpus_texts(), hidden_size=128, intermediate_size=256)
    weights = a / "model.safetensors"
    size = weights.stat().st_size
    assert (1 << 20) < size < (2 << 20), size  # where the old fingerprint read only the first MiB
    with safe_open(str(weights), "pt") as f:
        header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
        meta = json.loads(weights.read_bytes()[8:header])
        name = next(
            k for k, v in meta.items() if k != "__metadata__" and v["data_offsets"][0] + header > (1 << 20)
        )
        assert name in f.keys()
    b = tmp_path / "baseB"
    shutil.copytree(a, b)
    _flip_byte(b / "model.safetensors", header + meta[name]["data_offsets"][0] + 2)
    return a, b


def test_the_adapter_cache_never_hands_an_adapter_of_one_base_model_to_another(tmp_path, alma_dir, capsys):
    a, b = _model_dirs(tmp_path)
    cache = tmp_path / "cache"
    for base in (a, b):
        (tmp_path / f"{base.name}.yaml").write_text(
            f"""
base_model: {base}
languages: [de]
groups: {{g: [de]}}
data:
  train: {alma_dir}/train.{{xx}}-en.jsonl
  test: {alma_dir}/test.{{src}}-{{tgt}}.jsonl
strategy: separate
lora: {{r: 4, alpha: 8}}
train: {{steps: 1, batch_size: 4, max_examples_per_pair: 4, seed: 1, checkpoint_every: 0}}
eval: {{max_examples: 1, max_new_tokens: 2}}
output_dir: {tmp_path / ("run-" + base.name)}
adapter_cache: {cache}
"""
        )
        assert main(["run", str(tmp_path / f"{base.name}.yaml")]) == 0
    assert "in the cache" not in capsys.readouterr().out
    for name in ("de-en", "en-de"):
        adapter = tmp_path / "run-baseB" / "adapters" / name
        assert not (adapter / REUSED).exists(), f"{name} of baseB was taken from baseA's training"
        done = json.loads((adapter / "train_info.json").read_text())
        assert done["model_fingerprint"] == models.fingerprint(b) != models.fingerprint(a)
