from __future__ import annotations

import json

import pytest

from datm import config as C
from datm import data
from datm.languages import Direction


def test_alma_jsonl_feeds_both_directions(alma_dir):
    pattern = str(alma_dir / "train.{xx}-en.jsonl")
    de_en = data.read_direction(pattern, Direction("de", "en"))
    en_de = data.read_direction(pattern, Direction("en", "de"))
    assert len(de_en) == len(en_de) == 12
    assert de_en[0].src == en_de[0].tgt and de_en[0].tgt == en_de[0].src
    assert de_en[0].origin.endswith("train.de-en.jsonl:1")


def test_json_list_tsv_and_reverse_file(tmp_path):
    recs = [{"translation": {"de": "hallo", "en": "hello"}}, {"translation": {"de": "welt", "en": "world"}}]
    (tmp_path / "x.de-en.json").write_text(json.dumps(recs))
    got = data.read_direction(str(tmp_path / "x.{src}-{tgt}.json"), Direction("en", "de"))
    assert [(p.src, p.tgt) for p in got] == [("hello", "hallo"), ("world", "welt")]
    (tmp_path / "t.cs-en.tsv").write_text("ahoj\thello\nsvet\tworld\n")
    fwd = data.read_direction(str(tmp_path / "t.{xx}-en.tsv"), Direction("cs", "en"))
    rev = data.read_direction(str(tmp_path / "t.{xx}-en.tsv"), Direction("en", "cs"))
    assert (fwd[1].src, fwd[1].tgt) == ("svet", "world") and (rev[1].src, rev[1].tgt) == ("world", "svet")


def test_datasets_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"translation": {"ru": "privet", "en": "hi"}}])
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "ds-ru"))
    got = data.read_direction(str(tmp_path / "ds-{xx}"), Direction("en", "ru"), fmt="datasets", split="test")
    assert [(p.src, p.tgt) for p in got] == [("hi", "privet")]


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"translation": {"de": "a"}}', "missing key 'en'"),
        ('{"translation": {"de": "", "en": "b"}}', "empty or non-text 'de'"),
        ('{"translation": {"de": "a", "en": "b"', "broken JSON"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, line, why):
    f = tmp_path / "bad.de-en.jsonl"
    f.write_text('{"translation": {"de": "a", "en": "b"}}\n' + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.read_direction(str(tmp_path / "bad.{xx}-en.jsonl"), Direction("de", "en"))
    assert f"{f}:2" in str(e.value) and why in str(e.value)
    rep = data.ReadReport()
    got = data.read_direction(
        str(tmp_path / "bad.{xx}-en.jsonl"), Direction("de", "en"), on_bad="skip", report=rep
    )
    assert len(got) == 1 and len(rep.skipped) == 1 and f"{f}:2" in rep.skipped[0]


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_direction(str(tmp_path / "none.{xx}-en.jsonl"), Direction("de", "en"))


def test_select_is_seeded_and_shared_by_both_directions(alma_dir):
    pattern = str(alma_dir / "train.{xx}-en.jsonl")
    a = data.select(data.read_direction(pattern, Direction("de", "en")), 5, seed=3)
    b = data.select(data.read_direction(pattern, Direction("en", "de")), 5, seed=3)
    assert [p.origin for p in a] == [p.origin for p in b]
    assert len(a) == 5
    c = data.select(data.read_direction(pattern, Direction("de", "en")), 5, seed=4)
    assert [p.origin for p in a] != [p.origin for p in c]


def test_alma_prompt_text():
    assert (
        data.alma_prompt("de", "en", "Hallo")
        == "Translate this from German to English:\nGerman: Hallo\nEnglish:"
    )


def test_labels_only_on_target_and_eos(tiny_model_dir):
    from datm.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    fmt = data.PromptFormat(tok, "alma")
    pair = data.Pair("de", "en", "die katze 1", "the cat 1", "x:1")
    (ex,), rep = data.tokenize_pairs([pair], fmt, max_length=256)
    prompt_ids = fmt.prompt_ids("de", "en", "die katze 1")
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids and ex.n_prompt == len(prompt_ids)
    labels = ex.labels
    assert all(x == data.IGNORE_INDEX for x in labels[: len(prompt_ids)])
    assert labels[-1] == tok.eos_token_id
    assert tok.decode([x for x in labels if x != data.IGNORE_INDEX], skip_special_tokens=True) == " the cat 1"
    # truncation is counted, and a prompt longer than max_length is dropped and counted
    short, rep = data.tokenize_pairs([pair], fmt, max_length=len(prompt_ids) + 2)
    assert rep.truncated == 1 and len(short[0].input_ids) == len(prompt_ids) + 2
    none, rep = data.tokenize_pairs([pair], fmt, max_length=5)
    assert none == [] and rep.dropped == 1


def test_chat_style_uses_template(tiny_model_dir):
    from datm.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    fmt = data.PromptFormat(tok, "chat")
    text = fmt.prompt("de", "en", "hallo")
    assert text.startswith("<|user|>\nTranslate this from German to English:") and text.endswith(
        "<|assistant|>\n"
    )
    tok.chat_template = None
    with pytest.raises(data.DataError, match="chat template"):
        data.PromptFormat(tok, "chat")


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("languages: [de]\ndata: {train: a, test: b}\ntrain: {steps: 1, bogus: 2}\n")
    with pytest.raises(C.ConfigError, match=r"train: unknown key\(s\) \['bogus'\]"):
        C.load(f)
    f.write_text("languages: [de]\ndata: {train: a}\ntrain: {batch_size: 2}\n")
    with pytest.raises(C.ConfigError, match="steps"):
        C.load(f)
    f.write_text("languages: [de, xx]\ndata: {train: a}\ntrain: {steps: 1}\n")
    with pytest.raises(C.ConfigError, match="unknown language code 'xx'"):
        C.load(f)
    f.write_text("languages: [de]\n  bad: [\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        C.load(f)


def test_config_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "c.yaml"
    f.write_text(
        "languages: [de]\ndata: {train: '../d/train.{xx}-en.jsonl'}\ntrain: {epochs: 1}\noutput_dir: out\n"
    )
    cfg = C.load(f)
    assert cfg.data.train == str(tmp_path / "sub" / "../d/train.{xx}-en.jsonl")
    assert cfg.output_dir == str(tmp_path / "sub" / "out")


def test_flores_directory_by_flores_code(tmp_path):
    root = tmp_path / "flores200_dataset"
    (root / "devtest").mkdir(parents=True)
    (root / "devtest" / "deu_Latn.devtest").write_text("Hallo Welt\nGuten Tag\n")
    (root / "devtest" / "eng_Latn.devtest").write_text("Hello world\nGood day\n")
    got = data.read_direction(f"flores:{root}", Direction("en", "de"), split="devtest")
    assert [(p.src, p.tgt) for p in got] == [("Hello world", "Hallo Welt"), ("Good day", "Guten Tag")]
    with pytest.raises(data.DataError, match="ces_Latn"):
        data.read_direction(f"flores:{root}", Direction("en", "cs"), split="devtest")
    (root / "devtest" / "eng_Latn.devtest").write_text("Hello world\n")
    with pytest.raises(data.DataError, match="not aligned"):
        data.read_direction(f"flores:{root}", Direction("en", "de"), split="devtest")


def test_datasets_load_dataset_path_with_split(tmp_path):
    """The `load_dataset` path (as for hub test sets like X-ALMA's), on a local data dir."""
    d = tmp_path / "wmt23-like"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps({"translation": {"en": "one", "de": "eins"}}) + "\n")
    got = data.read_direction(str(d), Direction("en", "de"), fmt="datasets", split="test")
    assert [(p.src, p.tgt) for p in got] == [("one", "eins")]
    with pytest.raises(data.DataError, match="no split 'train'"):
        data.read_direction(str(d), Direction("en", "de"), fmt="datasets", split="train")
