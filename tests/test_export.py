"""`datm export RUN --to DIR [--fold]`: PEFT modules with model cards, routes.json, the vLLM command,
and folded full models that translate exactly as the module does on the base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_runs import ExportedVllmServer, build_vllm_model_dir, datm_translate, leading_line_breaks, make_run

from datm import models
from datm.cli import main
from datm.data import alma_prompt
from datm.eval.translate import Request, Translator, first_nonempty_line
from datm.languages import Direction
from datm.plan import BASE
from datm.serve.export import BASE_NAME

TEXTS = {
    "de": ["die katze sieht einen hund 0", "mein haus ist gross 2"],
    "cs": ["kocka vidi psa 0", "muj dum je velky 2"],
    "ru": ["koshka vidit sobaku 0", "moy dom bolshoy 2"],
    "en": ["the cat sees a dog 0", "my house is big 2"],
}


def translate(model_dir: str, modules: dict[str, Path], routes: dict[str, str]) -> list[str]:
    tr = Translator(models.load_model(model_dir), models.load_tokenizer(model_dir), modules)
    reqs = [Request(Direction.parse(d), t) for d in routes for t in TEXTS[Direction.parse(d).src]]
    return tr.translate(reqs, routes, max_new_tokens=8, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), tiny_model_dir, random_adapters=False)


def test_export_writes_peft_modules_cards_routes_and_the_vllm_command(trained_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((trained_run / "plan.json").read_text())
    scores = json.loads((trained_run / "scores.json").read_text())
    shipped = ["de-en", "en-xx.germanic", "en-xx.slavic", "xx-en.slavic"]

    routes = json.loads((out / "routes.json").read_text())
    assert routes["routes"] == plan["routes"] and routes["prompt"] == "alma"
    assert sorted(routes["modules"]) == shipped
    for name in shipped:
        d = out / routes["modules"][name]["path"]
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    assert (out / "modules" / "de-en" / "train_info.json").is_file()
    assert (out / "modules" / "xx-en.slavic" / "merge_info.json").is_file()

    card = (out / "modules" / "xx-en.slavic" / "README.md").read_text()
    assert "directions served: cs-en, ru-en" in card and "Merged from cs-en, ru-en with ties" in card
    train = json.loads((trained_run / "adapters" / "cs-en" / "train_info.json").read_text())
    assert f"| cs-en | cs-en | {train['result']['examples']} | 3 | 4 | 0.002 |" in card
    for d in ("cs-en", "ru-en"):
        s = scores["directions"][d]
        assert f"| {d} | {s['bleu']:.2f} | {s['chrf']:.2f} | 4 |" in card
    assert (
        "base_model: " + str(Path(json.loads((trained_run / "config.json").read_text())["base_model"]))
        in card
    )

    script = (out / "serve_vllm.sh").read_text()
    assert "--enable-lora --max-loras 4 --max-cpu-loras 4 --max-lora-rank 8 --lora-modules" in script
    for name in shipped:
        assert f" {name}=modules/{name}" in script and f" {name}={out.resolve()}/modules/{name}" in printed
    assert "python3 -m vllm.entrypoints.openai.api_server --model" in printed

    # the exported modules are the run's modules: PEFT loads them and they translate the same
    base = routes["base_model"]
    run_modules = {n: trained_run / ("merged" if n == "xx-en.slavic" else "adapters") / n for n in shipped}
    exported = {n: out / "modules" / n for n in shipped}
    assert translate(base, exported, plan["routes"]) == translate(base, run_modules, plan["routes"])

    assert main(["export", str(trained_run), "--to", str(out)]) == 2  # never written into
    assert "not an empty directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense_run(tiny_model_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("dense"), tiny_model_dir, form="dense")


def test_delta_modules_get_no_vllm_command_without_fold(dense_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(dense_run), "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "xx-en.slavic are weight deltas" in printed and "--fold" in printed
    assert not (out / "serve_vllm.sh").exists()
    assert (out / "modules" / "xx-en.slavic" / "delta_config.json").is_file()
    assert "weight delta (form dense)" in (out / "modules" / "xx-en.slavic" / "README.md").read_text()


def test_folded_models_translate_as_the_module_on_the_base(dense_run, tmp_path, capsys):
    out = tmp_path / "folded"
    assert main(["export", str(dense_run), "--to", str(out), "--fold"]) == 0
    routes = json.loads((out / "routes.json").read_text())
    base = routes["base_model"]
    script = (out / "serve_vllm.sh").read_text()
    assert script.count("vllm.entrypoints.openai.api_server --model models/") == 4
    for name, info in routes["modules"].items():
        folded = out / info["path"]
        assert (folded / "config.json").is_file() and (folded / "tokenizer.json").is_file()
        module = dense_run / ("merged" if name == "xx-en.slavic" else "adapters") / name
        on_base = translate(base, {name: module}, dict.fromkeys(info["directions"], name))
        alone = translate(str(folded), {}, dict.fromkeys(info["directions"], BASE))
        assert alone == on_base, name
        # the folded weights differ from the base's: folding changed the model
        assert alone != translate(base, {}, dict.fromkeys(info["directions"], BASE)), name


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """A run on a model vLLM's CPU attention accepts, where some outputs begin with a line break."""
    root = tmp_path_factory.mktemp("vllm-export")
    return make_run(root, leading_line_breaks(build_vllm_model_dir(root / "model")))


def test_exported_script_starts_vllm_and_the_readme_request_gives_datm_translate_output(vllm_run, tmp_path):
    """serve_vllm.sh runs under the installed vLLM, and a client following the export's README gets
    what `datm translate` gives, also where the output begins with a line break."""
    if not os.environ.get("DATM_REQUIRE_SERVE"):
        pytest.importorskip("vllm")
    import httpx

    out = tmp_path / "exported"
    assert main(["export", str(vllm_run), "--to", str(out)]) == 0
    readme = (out / "README.md").read_text(encoding="utf-8")
    request = json.loads(readme.split("-d '", 1)[1].split("'", 1)[0])  # the README's curl body
    assert "stop" not in request and "first non-empty line" in readme
    routes = json.loads((out / "routes.json").read_text())["routes"]
    reqs = [(d, t) for d in routes for t in TEXTS[Direction.parse(d).src]]
    want = datm_translate(vllm_run, [f"{d}\t{t}" for d, t in reqs], tmp_path)
    tok = models.load_tokenizer(json.loads((out / "routes.json").read_text())["base_model"])
    leading = 0
    server = ExportedVllmServer(out, tmp_path / "vllm.log")
    try:
        for (d, text), expected in zip(reqs, want, strict=True):
            src, tgt = d.split("-")
            model = BASE_NAME if routes[d] == BASE else routes[d]
            body = {**request, "model": model, "prompt": alma_prompt(src, tgt, text)}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            choice = httpx.post(server.url + "/v1/completions", json={**body, "return_token_ids": True})
            decoded = tok.decode(choice.json()["choices"][0]["token_ids"], skip_special_tokens=True)
            assert first_nonempty_line(decoded) == expected, (d, text, decoded)
            if "\ufffd" not in decoded:  # the completion's text is the same, unless cut inside a character
                completion = r.json()["choices"][0]["text"]
                assert first_nonempty_line(completion) == expected, (d, text, completion)
            leading += decoded.startswith("\n")
        assert leading  # the rule that a bare newline stop breaks was exercised
    finally:
        server.stop()
