"""Tiny in-process models and tokenizers, and tiny parallel data written by the tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models: one thread avoids oversubscribing the 2 cores (several times faster here).
torch.set_num_threads(1)

WORDS = {
    "en": [
        "the cat sees a dog",
        "we eat bread today",
        "my house is big",
        "the sun is warm",
        "i like green tea",
    ],
    "de": [
        "die katze sieht einen hund",
        "wir essen heute brot",
        "mein haus ist gross",
        "die sonne ist warm",
        "ich mag gruenen tee",
    ],
    "cs": ["kocka vidi psa", "dnes jime chleba", "muj dum je velky", "slunce je teple", "mam rad zeleny caj"],
    "ru": [
        "koshka vidit sobaku",
        "my edim khleb segodnya",
        "moy dom bolshoy",
        "solntse teploe",
        "ya lyublyu zelenyy chay",
    ],
}


def write_alma(path: Path, lang: str, n: int = 12) -> Path:
    """n ALMA records lang<->en, built from the tiny phrase lists above."""
    lines = []
    for i in range(n):
        k = i % len(WORDS["en"])
        lines.append(
            json.dumps({"translation": {lang: f"{WORDS[lang][k]} {i}", "en": f"{WORDS['en'][k]} {i}"}})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_valid(path: Path, lang: str, n: int = 5) -> Path:
    """Dev records unlike the test set's (test lines end in their index; these in 'dev N')."""
    lines = [
        json.dumps(
            {"translation": {lang: f"{WORDS[lang][i % 5]} dev {i}", "en": f"{WORDS['en'][i % 5]} dev {i}"}}
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(model: Path, data: Path, output_dir: str | Path, /, **sections: Any) -> dict[str, Any]:
    """The tests' one config: the tiny model on `alma_dir`'s data (de, cs, ru in two groups), DATM at a
    few steps. Each keyword replaces a top-level key whole (None removes it)."""
    raw: dict[str, Any] = {
        "base_model": str(model),
        "languages": ["de", "cs", "ru"],
        "groups": {"germanic": ["de"], "slavic": ["cs", "ru"]},
        "data": {"train": f"{data}/train.{{xx}}-en.jsonl", "test": f"{data}/test.{{src}}-{{tgt}}.jsonl"},
        "strategy": "datm",
        "lora": {"r": 4, "alpha": 8},
        "train": TRAIN,
        "merge": {"method": "ties", "density": 0.5},
        # transformers: the tiny model's 8-wide heads are not vLLM's, and deciding so would import vLLM
        # in every process of a test (tests/test_engines.py holds the engines and `auto`)
        "eval": {"max_examples": 3, "beams": 1, "max_new_tokens": 6, "engine": "transformers"},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


# tiny_config's training section, for tests that change one of its keys
TRAIN: dict[str, Any] = {
    "steps": 3,
    "batch_size": 4,
    "lr": 0.002,
    "max_examples_per_pair": 8,
    "seed": 1,
    "checkpoint_every": 0,
}


def save_config(path: Path, raw: dict[str, Any]) -> Path:
    """A config file (YAML) holding `raw`."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path: Path, tiny_model_dir: Path, alma_dir: Path) -> Callable[..., Path]:
    """`config_file(name, **sections)`: tiny_config written to tmp_path/NAME.yaml, its output_dir NAME
    (relative to the config file); `sections` replace top-level keys as in tiny_config."""

    def make(name: str = "run", **sections: Any) -> Path:
        raw = tiny_config(tiny_model_dir, alma_dir, name, **sections)
        return save_config(tmp_path / f"{name}.yaml", raw)

    return make


def build_tokenizer(texts: list[str]):
    from datm.tiny import build_tokenizer

    return build_tokenizer(texts)


def corpus_texts() -> list[str]:
    from datm.data import alma_prompt

    texts = []
    for lang in ("de", "cs", "ru"):
        for i, s in enumerate(WORDS[lang]):
            texts.append(alma_prompt(lang, "en", f"{s} {i}") + " " + WORDS["en"][i])
            texts.append(alma_prompt("en", lang, WORDS["en"][i]) + " " + s)
    return texts * 3 + [str(i) for i in range(100)]


def build_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """datm.tiny's default model (2 layers, hidden size 32), its tokenizer trained on corpus_texts()."""
    from datm.tiny import build_model_dir

    return build_model_dir(path, corpus_texts(), arch=arch, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-gemma"), arch="gemma3")


@pytest.fixture
def alma_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for lang in ("de", "cs", "ru"):
        write_alma(d / f"train.{lang}-en.jsonl", lang, 12)
        write_alma(d / f"test.{lang}-en.jsonl", lang, 4)
        write_alma(d / f"test.en-{lang}.jsonl", lang, 4)
    return d


def random_lora(model_dir: Path, out: Path, seed: int, b_std: float = 1.0) -> Path:
    """A LoRA (r=4, alpha=32, all linear layers) with random B ~ N(0, b_std²): its greedy outputs
    differ visibly from the base model's and from other such adapters'."""
    from peft import LoraConfig, get_peft_model

    from datm import models

    base = models.load_model(str(model_dir))
    torch.manual_seed(seed)
    pm = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std)
    pm.save_pretrained(out)
    return out
