"""COMET end to end, in its own environment: a tiny COMET model built here (no download), scored by
`datm evaluate --comet` and by a run with `eval.comet`, through COMET's real `predict`.

The COMET environment's Python comes from DATM_TEST_COMET_PYTHON (CI creates it with
`datm comet-env`), else from .ci-comet-venv/ or .venv-comet/ in the repository. Without one the
tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from datm import cli
from datm import config as C
from datm.eval.comet import CometError
from datm.run import runner

HERE = Path(__file__).parent
TRIPLES = [
    {"src": "die katze sieht einen hund", "mt": "the cat sees a dog", "ref": "the cat sees a dog"},
    {"src": "wir essen heute brot", "mt": "we eat today bread", "ref": "we eat bread today"},
    {"src": "mein haus ist gross", "mt": "my tea is green", "ref": "my house is big"},
]


def _comet_python() -> str | None:
    named = os.environ.get("DATM_TEST_COMET_PYTHON")
    if named:
        return named
    for env in (".ci-comet-venv", ".venv-comet"):
        python = HERE.parent / env / "bin" / "python"
        if python.is_file():
            return str(python)
    return None


@pytest.fixture(scope="module")
def comet_python() -> str:
    python = _comet_python()
    if python is None:
        why = (
            "no COMET environment: set DATM_TEST_COMET_PYTHON (.ci/run does) or `datm comet-env .venv-comet`"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)  # CI must run these, not skip them
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def tiny_comet(comet_python, tmp_path_factory) -> Path:
    """A tiny COMET model directory (with expected.json: COMET's own scores of TRIPLES)."""
    tmp = tmp_path_factory.mktemp("comet")
    (tmp / "triples.json").write_text(json.dumps(TRIPLES))
    model = tmp / "tiny-comet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [comet_python, str(HERE / "comet_tiny.py"), str(model), str(tmp / "triples.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return model


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return path


def test_evaluate_scores_with_comet_in_its_environment(
    tiny_comet, comet_python, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {k: _write(tmp_path / f"{k}.txt", [t[k] for t in TRIPLES]) for k in ("src", "mt", "ref")}
    argv = ["evaluate", "--pair", "de-en", "--hyp", str(files["mt"]), "--ref", str(files["ref"])]
    argv += ["--src", str(files["src"]), "--comet", str(tiny_comet), "--comet-python", comet_python]
    assert cli.main([*argv, "--comet-batch-size", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    expected = json.loads((tiny_comet / "expected.json").read_text())
    assert got["comet"] == pytest.approx(expected["system"], abs=1e-6)
    assert got["comet_segments"] == pytest.approx(expected["segments"], abs=1e-6)
    assert len(set(got["comet_segments"])) == 3  # a model that tells the segments apart
    version = subprocess.run(
        [comet_python, "-c", "import importlib.metadata as m; print(m.version('unbabel-comet'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert got["signatures"]["comet"] == f"model:{tiny_comet}|comet:{version}"

    assert cli.main(argv) == 0  # the plain-text report names the model and COMET's version too
    assert f"COMET = {got['comet']:.4f} model:{tiny_comet}|comet:{version}" in capsys.readouterr().out


def test_run_with_eval_comet_records_scores_model_and_version(
    tiny_comet, comet_python, tiny_model_dir, alma_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base_model: {tiny_model_dir}\nlanguages: [de, cs]\ngroups: {{g: [de, cs]}}\n"
        f"data: {{test: '{alma_dir}/test.{{src}}-{{tgt}}.jsonl'}}\nstrategy: zero_shot\n"
        "train: {steps: 1}\n"
        f"eval: {{max_examples: 3, max_new_tokens: 8, comet: {{model: {tiny_comet}, python: {comet_python}, "
        "batch_size: 2}}\noutput_dir: out\n"
    )
    runner.run(C.load(cfg))
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    for d, row in scores["directions"].items():
        assert isinstance(row["comet"], float) and len(row["comet_segments"]) == row["n"] == 3, d
        assert row["comet"] == pytest.approx(sum(row["comet_segments"]) / 3)
    for family in ("xx-en", "en-xx", "all"):
        assert "comet" in scores["averages"][family]
    prov = scores["provenance"]["comet"]
    assert prov["model"] == str(tiny_comet) and prov["python"] == comet_python
    assert prov["version"].startswith("2.") and prov["encoder"] == str(tiny_comet / "encoder")
    assert prov["versions"]["transformers"].startswith("4.")  # COMET's environment, not datm's
    assert scores["signatures"]["comet"] == f"model:{tiny_comet}|comet:{prov['version']}"
    assert "COMET" in (tmp_path / "out" / "report.md").read_text()


def test_hub_model_missing_offline_names_model_and_encoder(comet_python, tmp_path, capsys, monkeypatch):
    """The worker's own error: COMET imports, but the model is neither local nor in the cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    files = [_write(tmp_path / f"{k}.txt", ["a"]) for k in ("src", "mt", "ref")]
    argv = ["evaluate", "--pair", "de-en", "--src", str(files[0]), "--hyp", str(files[1])]
    argv += ["--ref", str(files[2]), "--comet", "Unbabel/wmt22-comet-da", "--comet-python", comet_python]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "'Unbabel/wmt22-comet-da' is not available: HF_HUB_OFFLINE is set" in err
    assert "xlm-roberta-large" in err and "Traceback" not in err


def test_missing_interpreter_or_comet_or_model_is_a_clear_error_before_work(tmp_path, capsys):
    files = [_write(tmp_path / f"{k}.txt", ["a"]) for k in ("src", "mt", "ref")]
    argv = ["evaluate", "--pair", "de-en", "--src", str(files[0]), "--hyp", str(files[1])]
    argv += ["--ref", str(files[2])]

    assert cli.main([*argv, "--comet", "m", "--comet-python", str(tmp_path / "nowhere" / "python")]) == 2
    assert "nowhere/python does not exist" in capsys.readouterr().err

    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # a Python without comet
    python = str(bare / "bin" / "python")
    assert cli.main([*argv, "--comet", "m", "--comet-python", python]) == 2
    err = capsys.readouterr().err
    assert f"{python} has no comet" in err and "datm comet-env DIR" in err

    # a local model that is not there: found before any interpreter is started
    assert cli.main([*argv, "--comet", str(tmp_path / "no-model.ckpt"), "--comet-python", python]) == 2
    assert (
        "no-model.ckpt does not exist (expected a .ckpt file or a model directory)" in capsys.readouterr().err
    )
    (tmp_path / "empty-model").mkdir()
    assert cli.main([*argv, "--comet", str(tmp_path / "empty-model"), "--comet-python", python]) == 2
    assert "empty-model has no checkpoints/model.ckpt" in capsys.readouterr().err


def test_run_checks_comet_before_training(tmp_path, tiny_model_dir, alma_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base_model: {tiny_model_dir}\nlanguages: [de]\n"
        f"data: {{train: '{alma_dir}/train.{{xx}}-en.jsonl'}}\n"
        "strategy: multilingual\ntrain: {steps: 1}\n"
        "eval: {comet: {model: Unbabel/wmt22-comet-da, python: ./no-env/bin/python}}\noutput_dir: out\n"
    )
    with pytest.raises(CometError, match=r"no-env/bin/python does not exist.*datm comet-env"):
        runner.run(C.load(cfg))
    assert not (tmp_path / "out" / "adapters").exists()


def test_eval_comet_config_forms(tmp_path):
    base = {"languages": ["de"], "data": {}, "train": {"steps": 1}}
    plain = C.from_dict({**base, "eval": {"comet": "Unbabel/wmt22-comet-da"}}, base_dir=tmp_path)
    assert plain.eval.comet == C.CometConfig("Unbabel/wmt22-comet-da")
    full = {"model": "models/tiny", "python": "envs/comet/bin/python", "batch_size": 4, "device": "cuda"}
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    got = C.from_dict({**base, "eval": {"comet": full}}, base_dir=tmp_path).eval.comet
    assert got == C.CometConfig(
        str(tmp_path / "models" / "tiny"), str(tmp_path / "envs/comet/bin/python"), 4, "cuda"
    )
    assert C.from_dict(
        {**base, "eval": {"comet": {"model": "m", "python": "python3"}}}
    ).eval.comet.python == (
        "python3"  # a command, looked up on PATH
    )
    for bad, why in (
        ({"model": "m", "gpus": 1}, r"unknown key\(s\) \['gpus'\]"),
        ({"python": "p"}, "expected a COMET model"),
        (3, "expected a COMET model"),
        ({"model": "m", "device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"model": "m", "batch_size": 0}, "batch_size must be an integer >= 1"),
    ):
        with pytest.raises(C.ConfigError, match=f"eval.comet: .*{why}"):
            C.from_dict({**base, "eval": {"comet": bad}})


def test_comet_env_refuses_a_folder_that_is_not_an_environment(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["comet-env", str(tmp_path)]) == 2
    assert "is not a Python environment; give a new folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing installed over it
