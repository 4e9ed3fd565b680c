"""One line discipline for segment text: every writer puts one segment on one line whatever line-break
characters it holds, every reader ends lines at '\\n' (or '\\r\\n') only: a run's score stage, a rerun
and `datm translate` from a file or from stdin all see the same segments."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from datm.cli import main

# Characters that str.splitlines() or universal newlines break at, inside one segment.
HOSTILE = ["a\rb", "c\u2028d", "e\x85f\x0cg", "h\x0bi\x1cj\u2029k"]


def write_test_file(path: Path, rows: list[tuple[str, str]]) -> None:
    """ALMA records written as other tools write them: raw (not \\u-escaped) U+2028, U+0085."""
    recs = [json.dumps({"translation": {"de": s, "en": t}}, ensure_ascii=False) for s, t in rows]
    path.write_text("\n".join(recs) + "\n", encoding="utf-8")


def zero_shot_config(tmp_path: Path, model_dir: Path, test: Path, **eval_: int) -> Path:
    settings = {"max_examples": 4, "beams": 1, "max_new_tokens": 4, "precision": "fp32", **eval_}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"""
base_model: {model_dir}
languages: [de]
data:
  test: {test}
strategy: zero_shot
eval: {json.dumps(settings)}
output_dir: {tmp_path / "run"}
"""
    )
    return cfg


def test_run_scores_segments_with_line_breaks_inside_and_reruns(tmp_path, tiny_model_dir, monkeypatch):
    from datm.eval.translate import Translator

    rows = [(f"die katze {h} {i}", f"the cat {h} {i}") for i, h in enumerate(HOSTILE)]
    for d in ("de-en", "en-de"):
        write_test_file(tmp_path / f"test.{d}.jsonl", rows)
    translate = Translator.translate

    def hostile_hypotheses(self, *args, **kwargs):  # e.g. Gemma 3's '\r' token, which is no stop token
        return [f"{h}\r{HOSTILE[i]}" for i, h in enumerate(translate(self, *args, **kwargs))]

    monkeypatch.setattr(Translator, "translate", hostile_hypotheses)
    cfg = zero_shot_config(tmp_path, tiny_model_dir, tmp_path / "test.{src}-{tgt}.jsonl")
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    for kind in ("src", "ref", "hyp"):
        raw = (run / "translations" / f"de-en.{kind}.txt").read_bytes()
        assert raw.count(b"\n") == 4 and len(raw.decode().splitlines()) == 4, (kind, raw)
    scores = json.loads((run / "scores.json").read_text())
    assert {d: s["n"] for d, s in scores["directions"].items()} == {"de-en": 4, "en-de": 4}
    assert main(["run", str(cfg)]) == 0  # the finished translations score again
    assert json.loads((run / "scores.json").read_text())["directions"] == scores["directions"]
    # a run whose hypotheses an older datm wrote with a raw '\r' inside scores again too
    hyp = run / "translations" / "de-en.hyp.txt"
    hyp.write_bytes(hyp.read_bytes().replace(b" ", b"\r", 1))
    assert main(["run", str(cfg)]) == 0


def test_evaluate_reads_crlf_and_keeps_other_breaks_inside_a_segment(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_bytes("one two\r\nthree\u2028four\r\nfive\rsix\r\n".encode())
    ref.write_bytes(b"one two\nthree four\nfive six\n")
    assert main(["evaluate", "--pair", "de-en", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3


class EchoTranslator:
    """Stands in for a run's translation (`datm.serve.offline.translate_run`): records the requests,
    answers each with its text."""

    def __init__(self) -> None:
        self.requests: list = []

    def translate(self, run, requests, args):
        self.requests.append(list(requests))
        return [r.text for r in requests]


@pytest.mark.parametrize("pair", [None, "de-en"])
def test_translate_splits_a_file_and_stdin_alike(tmp_path, monkeypatch, capsys, pair):
    echo = EchoTranslator()
    monkeypatch.setattr("datm.serve.offline.open_run", lambda run: None)
    monkeypatch.setattr("datm.serve.offline.translate_run", echo.translate)
    head = "" if pair else "de-en\t"
    raw = "".join(f"{head}{h}\r\n" for h in HOSTILE).encode() + f"{head}last".encode()
    src = tmp_path / "in.txt"
    src.write_bytes(raw)
    args = ["translate", "--run", str(tmp_path)] + (["--pair", pair] if pair else [])
    assert main([*args, "--input", str(src), "--output", str(tmp_path / "out.txt")]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    assert main(args) == 0
    from_file, from_stdin = echo.requests
    assert from_file == from_stdin
    assert [r.text for r in from_file] == [*HOSTILE, "last"]
    assert {str(r.direction) for r in from_file} == {"de-en"}
    # one output line per request, on stdout and in --output, whatever the translation holds
    out = capsys.readouterr().out
    assert out.encode() == (tmp_path / "out.txt").read_bytes()
    assert out.count("\n") == len(out.splitlines()) == len(HOSTILE) + 1


def test_translate_input_not_utf8_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("datm.serve.offline.open_run", lambda run: None)
    monkeypatch.setattr("datm.serve.offline.translate_run", EchoTranslator().translate)
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"de-en\tgr\xfcn\n")
    assert main(["translate", "--run", str(tmp_path), "--input", str(src)]) == 2
    assert "latin1.txt: not UTF-8" in capsys.readouterr().err
