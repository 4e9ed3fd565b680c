"""The translation engines (`eval.engine`): which engine translates which module, and the vLLM engine
against the transformers one on a tiny fp32 run, through `datm run` and `datm translate`.

The vLLM tests skip where vLLM is not installed, unless DATM_REQUIRE_SERVE=1 (as in CI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_runs import build_vllm_model_dir, datm_translate, leading_line_breaks, make_run

from datm.eval.engines import TRANSFORMERS, VLLM, choose, vllm_unsupported
from datm.merge.forms import DELTA, LORA
from datm.plan import BASE

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TEXTS = {
    "de": ["die katze sieht einen hund 0", "wir essen heute brot 1", "mein haus ist gross 2", "ja nein 3"],
    "cs": ["kocka vidi psa 0", "dnes jime chleba 1", "muj dum je velky 2", "ano ne 3"],
    "ru": ["koshka vidit sobaku 0", "my edim khleb segodnya 1", "moy dom bolshoy 2", "da net 3"],
    "en": ["the cat sees a dog 0", "we eat bread today 1", "my house is big 2", "yes no 3"],
}
LINES = [f"{x}-en\t{t}" for x in ("de", "cs", "ru") for t in TEXTS[x]]
LINES += [f"en-{x}\t{t}" for x in ("de", "cs", "ru") for t in TEXTS["en"]]


def need_vllm() -> None:
    if not os.environ.get("DATM_REQUIRE_SERVE"):
        pytest.importorskip("vllm")


def identical(a: list[str], b: list[str]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_choose_routes_deltas_and_beams_to_transformers(tiny_model_dir):
    path = str(tiny_model_dir)
    assert choose(TRANSFORMERS, path, LORA, 1).engine == TRANSFORMERS
    delta = choose("auto", path, DELTA, 1)
    assert delta.engine == TRANSFORMERS and "weight-delta" in delta.why
    beams = choose("auto", path, LORA, 4)
    assert beams.engine == TRANSFORMERS and "eval.beams: 4" in beams.why


def test_auto_says_why_it_does_not_take_vllm_for_a_model_it_cannot_run(tiny_model_dir):
    """The conftest model's attention heads are 8 wide: vLLM's CPU attention refuses them."""
    why = vllm_unsupported(str(tiny_model_dir))
    assert why is not None and ("head sizes" in why or "not installed" in why)
    got = choose("auto", str(tiny_model_dir), LORA, 1)
    assert got.engine == TRANSFORMERS and why in got.why
    from datm.eval.engines import EngineError

    with pytest.raises(EngineError, match="eval.engine: vllm, but"):
        choose(VLLM, str(tiny_model_dir), LORA, 1)


# ---------------------------------------------------------------------------------------------------
# vLLM against transformers on one tiny fp32 run (random LoRAs: each module visibly its own; a model
# whose outputs often begin with a line break, so the stop rule's continuation is exercised).
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    need_vllm()
    root = tmp_path_factory.mktemp("engines")
    return leading_line_breaks(build_vllm_model_dir(root / "model"))


@pytest.fixture(scope="module")
def runs(model):
    """The same run (same random adapters) translated by each engine through `datm run`."""
    return {e: make_run(model.parent, model, engine=e) for e in (TRANSFORMERS, VLLM)}


def hyps(run: Path) -> dict[str, list[str]]:
    from datm.artifacts import RunDir
    from datm.eval.evaluate import read_lines
    from datm.languages import Direction

    routes = json.loads((run / "plan.json").read_text())["routes"]
    return {d: read_lines(RunDir(run).translations(Direction.parse(d)).hyp) for d in routes}


def test_datm_run_with_each_engine_agrees_and_records_the_engine(runs):
    from datm.artifacts import RunDir
    from datm.languages import Direction

    by = {e: hyps(r) for e, r in runs.items()}
    flat = {e: [h for d in sorted(v) for h in v[d]] for e, v in by.items()}
    share = identical(flat[TRANSFORMERS], flat[VLLM])
    scores = {e: json.loads((r / "scores.json").read_text()) for e, r in runs.items()}
    print(f"identical segments {share:.3f}; " + "; ".join(f"{e}: {s['averages']}" for e, s in scores.items()))
    assert share >= 0.9
    for engine, run in runs.items():
        assert set(scores[engine]["provenance"]["engines"].values()) == {engine}
        for d in by[engine]:
            info = json.loads(RunDir(run).translations(Direction.parse(d)).info.read_text())
            assert info["settings"]["eval.engine"] == engine


def test_datm_translate_agrees_across_engines_and_repeats_itself(runs, tmp_path):
    run = runs[TRANSFORMERS]
    tr = datm_translate(run, LINES, tmp_path, "--engine", TRANSFORMERS)
    vl = datm_translate(run, LINES, tmp_path, "--engine", VLLM)
    assert datm_translate(run, LINES, tmp_path, "--engine", VLLM) == vl
    assert datm_translate(run, LINES, tmp_path, "--engine", TRANSFORMERS) == tr
    assert len(set(vl)) > 3 and all(vl)
    assert identical(tr, vl) >= 0.9, list(zip(tr, vl, strict=True))


def test_each_lora_is_applied_under_vllm(runs):
    """A LoRA silently not applied would answer as the base model: each module's vLLM output differs
    from the base model's (under vLLM too) and equals the transformers engine's on most segments."""
    from dataclasses import replace

    from datm.analysis.view import RunView
    from datm.eval.translate import Request
    from datm.eval.worker import Worker, translation_session
    from datm.languages import Direction

    view = RunView.open(runs[TRANSFORMERS])
    modules = {n: m.path for n, m in view.modules.items()}
    routes = view.routed_plan().routes
    requests = {d: [Request(Direction.parse(d), t) for t in TEXTS[d.split("-")[0]]] for d in routes}
    out = {}
    for engine in (VLLM, TRANSFORMERS):
        cfg = replace(view.config, eval=replace(view.config.eval, engine=engine))
        worker = Worker(cfg)
        try:
            with translation_session(worker, modules, cfg) as translate:
                for d, module in routes.items():
                    out[engine, d] = translate(requests[d], routes)
                    assert translate.last_info["engines"][module]["engine"] == engine
                    out[engine, d, BASE] = translate(requests[d], {d: BASE})
        finally:
            worker.close()
    for d in routes:
        assert identical(out[VLLM, d], out[VLLM, d, BASE]) <= 0.25, d  # the LoRA changes the output
        assert identical(out[VLLM, d], out[TRANSFORMERS, d]) >= 0.75, d
        assert (
            out[VLLM, d, BASE] == out[TRANSFORMERS, d, BASE]
            or identical(out[VLLM, d, BASE], out[TRANSFORMERS, d, BASE]) >= 0.75
        )


def test_changing_the_engine_never_reuses_the_other_engines_translations(runs, model):
    from serve_runs import run_config

    from datm import config
    from datm.config import ConfigError
    from datm.run import runner

    raw = run_config(model.parent, model, engine=VLLM).to_dict()
    cfg = config.from_dict({**raw, "output_dir": str(runs[TRANSFORMERS])}, source="test")
    with pytest.raises(ConfigError, match=r"eval\.engine='transformers'.*eval\.engine='vllm'"):
        runner.run(cfg)


def test_delta_modules_go_to_transformers_in_a_mixed_batch_under_vllm(model, tmp_path):
    """A run with dense merges: its LoRA routes go to vLLM, its delta routes to transformers, in one
    `datm translate` call; the answers are those of the transformers engine alone."""
    run = make_run(tmp_path, model, form="dense")
    tr = datm_translate(run, LINES, tmp_path, "--engine", TRANSFORMERS)
    vl = datm_translate(run, LINES, tmp_path, "--engine", VLLM)
    assert identical(tr, vl) >= 0.9
    from datm.artifacts import RunDir
    from datm.eval.engines import kind_of
    from datm.languages import Direction

    dense = make_run(tmp_path, model, form="dense", engine=VLLM)
    plan = json.loads((dense / "plan.json").read_text())
    merges = [m["name"] for m in plan["merges"]]
    kinds = {}
    for d, module in plan["routes"].items():
        kinds[module] = kind_of(module, {module: RunDir(dense).module(module, merges)})
        settings = json.loads(RunDir(dense).translations(Direction.parse(d)).info.read_text())["settings"]
        assert settings["eval.engine"] == (TRANSFORMERS if kinds[module] == DELTA else VLLM), (d, module)
    assert set(kinds.values()) == {DELTA, LORA}  # both kinds in the one run


def test_asking_vllm_for_a_model_it_cannot_run_fails_before_training(config_file, capsys):
    """The conftest model (heads 8 wide; or no vLLM at all): `eval.engine: vllm` is refused up front."""
    from datm.cli import main

    cfg = config_file("asks-vllm", eval={"max_examples": 3, "max_new_tokens": 6, "engine": "vllm"})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "eval.engine: vllm, but" in err and "set eval.engine to auto or transformers" in err
    assert not (cfg.parent / "asks-vllm" / "adapters").exists()  # nothing trained
