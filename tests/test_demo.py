"""The embedded demo corpus and `datm demo --dry-run` (no model needed)."""

from __future__ import annotations

import json

from datm import demo
from datm import languages as L
from datm.cli import main


def test_corpus_is_complete_clean_and_aligned():
    corpus = demo.read_corpus()
    en = corpus["en"]
    assert len(en) >= 300
    groups = {g for g, members in L.XALMA_GROUPS.items() for x in demo.DEMO_LANGUAGES if x in members}
    assert len(demo.DEMO_LANGUAGES) >= 8 and len(groups) >= 3
    for g in groups:
        assert sum(x in L.XALMA_GROUPS[g] for x in demo.DEMO_LANGUAGES) >= 2
    for lang, lines in corpus.items():
        assert len(lines) == len(en), lang  # every language has every sentence
        assert all(s.strip() == s and s for s in lines), lang  # no empty or padded lines
        assert len(set(lines)) == len(lines), lang  # no duplicates
        assert all("\t" not in s for s in lines), lang
        if lang != "en":
            assert sum(a == b for a, b in zip(lines, en, strict=True)) == 0, lang
    words = [len(s.split()) for s in en]
    assert min(words) >= 5 and max(words) <= 30


def test_split_keeps_test_out_of_train():
    corpus = demo.read_corpus()
    for lang, lines in corpus.items():
        train, test = demo.split(lines)
        assert len(test) >= 50 and len(train) + len(test) == len(lines)
        assert not set(test) & set(train), lang


def test_written_data_matches_split(tmp_path):
    train, test = demo.write_data(tmp_path, ["de", "cs"])
    recs = [json.loads(x) for x in (tmp_path / "test.cs-en.jsonl").read_text().splitlines()]
    _, cs_test = demo.split(demo.read_corpus(["cs"])["cs"])
    assert [r["translation"]["cs"] for r in recs] == cs_test
    assert train.endswith("train.{xx}-en.jsonl") and test.endswith("test.{xx}-en.jsonl")


def test_dry_run_json(capsys, tmp_path):
    assert main(["demo", "--dry-run", "--json", "--out", str(tmp_path / "d")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["languages"] == demo.DEMO_LANGUAGES
    assert info["sentences"]["de"] == {"train": 256, "test": 64}
    plan = info["plans"]["datm"]
    assert len(plan["adapters"]) == 8 + 4 and len(plan["merges"]) == 4
    assert set(info["plans"]) == {"zero_shot", "datm"}
    assert not (tmp_path / "d").exists()  # a dry run writes nothing
    assert main(["demo", "--dry-run", "--json", "--compare", "--languages", "de,nl"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["plans"]) == {"zero_shot", "datm", "multilingual"} and info["groups"] == {
        "group1": ["nl", "de"]
    }


def test_unknown_demo_language(capsys):
    assert main(["demo", "--dry-run", "--languages", "de,zz"]) == 2
    assert "no demo data for ['zz']" in capsys.readouterr().err
