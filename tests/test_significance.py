"""The paired bootstrap's numbers are pinned: same inputs and seed, same outputs as before the
significance module was split out of evaluate and analyze (values in data/bootstrap_pins.json were
computed by the code of commit 8cad8ce, `datm.evaluate.paired_bootstrap` and `datm.analyze.analyze`)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from datm.analysis.analyze import analyze
from datm.data import write_text
from datm.eval.significance import paired_bootstrap
from datm.plan import make_plan

PINS = json.loads((Path(__file__).parent / "data" / "bootstrap_pins.json").read_text(encoding="utf-8"))
WORDS = "the cat sat on a mat while dog ran to house in garden near old tree".split()
SIZES = {"de-en": 24, "cs-en": 24, "en-de": 30, "en-cs": 21}  # En→XX sizes differ: independent draws


def systems(seed: int, n: int) -> tuple[list[str], list[str], list[str]]:
    """References, a weak system (40% exact) and a strong one (80% exact)."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    refs = [sentence() for _ in range(n)]
    weak = [r if rng.random() < 0.4 else sentence() for r in refs]
    strong = [r if rng.random() < 0.8 else sentence() for r in refs]
    return refs, weak, strong


def bootstrap_cases() -> dict[str, dict[str, Any]]:
    refs, weak, strong = systems(7, 40)
    out = {}
    for metric in ("bleu", "chrf"):
        for seed in (12345, 3):
            r = paired_bootstrap(weak, strong, refs, "en", metric=metric, n_samples=150, seed=seed)
            out[f"{metric}:{seed}"] = r.to_json()
    return out


def write_run(path: Path, strategy: str, quality: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    (path / "plan.json").write_text(
        json.dumps(make_plan(strategy, ["de", "cs"], {"g": ["de", "cs"]}).to_dict())
    )
    (path / "translations").mkdir()
    for k, (d, n) in enumerate(SIZES.items()):
        refs, weak, strong = systems(100 + k, n)
        hyps = {"weak": weak, "strong": strong, "ref": refs}[quality[d]]
        (path / "translations" / f"{d}.ref.txt").write_text(write_text(refs), encoding="utf-8")
        (path / "translations" / f"{d}.hyp.txt").write_text(write_text(hyps), encoding="utf-8")
    return path


def analysis_case(tmp_path: Path) -> dict[str, Any]:
    sep = write_run(
        tmp_path / "sep", "separate", {"de-en": "weak", "cs-en": "strong", "en-de": "strong", "en-cs": "weak"}
    )
    jnt = write_run(
        tmp_path / "jnt",
        "multilingual",
        {"de-en": "strong", "cs-en": "weak", "en-de": "weak", "en-cs": "strong"},
    )
    mrg = write_run(
        tmp_path / "mrg",
        "separate_merged",
        {"de-en": "weak", "cs-en": "ref", "en-de": "weak", "en-cs": "weak"},
    )
    result = analyze(sep, jnt, mrg, sep, n_samples=120, seed=11)
    data = result.to_json()
    data = json.loads(json.dumps(data))
    data["runs"] = {role: run["strategy"] for role, run in data["runs"].items()}  # paths differ per test
    return data


def test_paired_bootstrap_numbers_are_unchanged() -> None:
    # compared as JSON text: the key order of the results is part of the contract too
    assert json.dumps(bootstrap_cases()) == json.dumps(PINS["paired_bootstrap"])


def test_analysis_numbers_are_unchanged(tmp_path: Path) -> None:
    assert json.dumps(analysis_case(tmp_path)) == json.dumps(PINS["analysis"])
