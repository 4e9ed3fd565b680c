from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_lora

from datm import models
from datm.eval.translate import Request, Translator, newline_token_ids, read_requests
from datm.languages import Direction
from datm.merge import merge_adapters
from datm.plan import BASE


@pytest.fixture(scope="module")
def three_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {n: random_lora(tiny_model_dir, root / n, s) for s, n in enumerate(["A", "B", "C"])}


REQS = [
    Request(Direction("de", "en"), "die katze sieht einen hund"),
    Request(Direction("en", "de"), "we eat bread today"),
    Request(Direction("cs", "en"), "muj dum je velky"),
    Request(Direction("de", "en"), "wir essen heute brot"),
    Request(Direction("en", "cs"), "the sun is warm"),
    Request(Direction("en", "de"), "my house is big"),
]
ROUTES = {"de-en": "A", "en-de": "B", "cs-en": "C", "en-cs": BASE}


def test_each_direction_goes_to_its_module(tiny_model_dir, three_adapters):
    tok = models.load_tokenizer(str(tiny_model_dir))
    mixed = Translator(models.load_model(str(tiny_model_dir)), tok, three_adapters)
    got = mixed.translate(REQS, ROUTES, max_new_tokens=8, batch_size=4, progress=False)
    # Reference: every request served alone by the one module its direction should use.
    alone = {}
    for name in ("A", "B", "C", BASE):
        mods = {} if name == BASE else {name: three_adapters[name]}
        tr = Translator(
            models.load_model(str(tiny_model_dir)), models.load_tokenizer(str(tiny_model_dir)), mods
        )
        every = dict.fromkeys(ROUTES, name)
        alone[name] = tr.translate(REQS, every, max_new_tokens=8, batch_size=1, progress=False)
    # the modules are distinguishable on these inputs ...
    assert len({tuple(v) for v in alone.values()}) == 4
    # ... and the mixed, batched translator matches the routed module on every request, in order
    for i, r in enumerate(REQS):
        assert got[i] == alone[ROUTES[str(r.direction)]][i], (i, r)


@pytest.fixture(scope="module")
def delta_module(three_adapters, tmp_path_factory):
    """A dense delta module: adapter C's ΔW, stored as a datm delta directory."""
    out = tmp_path_factory.mktemp("delta") / "D"
    merge_adapters([three_adapters["C"]], out, method="linear", form="dense", progress=False)
    return out


def _translator(model_dir, modules):
    return Translator(models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir)), modules)


def test_delta_routed_direction_gets_no_lora_on_top(tiny_model_dir, three_adapters, delta_module):
    routes = {"de-en": "D", "en-de": "L", "cs-en": "D", "en-cs": "L"}
    mixed = _translator(tiny_model_dir, {"L": three_adapters["A"], "D": delta_module})
    got = mixed.translate(REQS, routes, max_new_tokens=8, batch_size=2, progress=False)
    delta_alone = _translator(tiny_model_dir, {"D": delta_module}).translate(
        REQS, dict.fromkeys(routes, "D"), max_new_tokens=8, batch_size=1, progress=False
    )
    lora_alone = _translator(tiny_model_dir, {"L": three_adapters["A"]}).translate(
        REQS, dict.fromkeys(routes, "L"), max_new_tokens=8, batch_size=1, progress=False
    )
    assert delta_alone != lora_alone
    for i, r in enumerate(REQS):
        want = delta_alone if routes[str(r.direction)] == "D" else lora_alone
        assert got[i] == want[i], (i, r)


def test_base_requests_in_a_lora_pass_get_the_bare_base_model(tiny_model_dir, three_adapters):
    routes = {"de-en": "L", "en-de": BASE, "cs-en": BASE, "en-cs": "L"}
    bare = _translator(tiny_model_dir, {}).translate(
        REQS, dict.fromkeys(routes, BASE), max_new_tokens=8, batch_size=1, progress=False
    )
    lora_alone = _translator(tiny_model_dir, {"L": three_adapters["A"]}).translate(
        REQS, dict.fromkeys(routes, "L"), max_new_tokens=8, batch_size=1, progress=False
    )
    assert bare != lora_alone
    mixed = _translator(tiny_model_dir, {"L": three_adapters["A"]})
    for batch_size in (1, 3):  # only-base chunks, and base mixed with LoRA requests in one batch
        got = mixed.translate(REQS, routes, max_new_tokens=8, batch_size=batch_size, progress=False)
        for i, r in enumerate(REQS):
            want = bare if routes[str(r.direction)] == BASE else lora_alone
            assert got[i] == want[i], (batch_size, i, r)


def test_beam_search_with_mixed_adapters(tiny_model_dir, three_adapters):
    tok = models.load_tokenizer(str(tiny_model_dir))
    tr = Translator(models.load_model(str(tiny_model_dir)), tok, three_adapters)
    out = tr.translate(REQS, ROUTES, beams=3, max_new_tokens=6, batch_size=6, progress=False)
    assert len(out) == len(REQS) and all("\n" not in o for o in out)


def test_unrouted_direction_is_an_error(tiny_model_dir, three_adapters):
    tr = Translator(models.load_model(str(tiny_model_dir)), models.load_tokenizer(str(tiny_model_dir)), {})
    with pytest.raises(ValueError, match="no module serves direction ru-en"):
        tr.translate([Request(Direction("ru", "en"), "x")], ROUTES, progress=False)


def test_newline_tokens_found(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    ids = newline_token_ids(tok)
    assert ids and all("\n" in tok.decode([i]) for i in ids)
    assert tok("a\nb", add_special_tokens=False)["input_ids"][1] in ids or any(
        i in ids for i in tok("a\nb", add_special_tokens=False)["input_ids"]
    )


def test_read_requests():
    assert read_requests(["de-en\thallo"], None) == [Request(Direction("de", "en"), "hallo")]
    assert read_requests(["x y"], "en-cs")[0].direction == Direction("en", "cs")
    with pytest.raises(ValueError, match="input line 2"):
        read_requests(["de-en\tok", "no tab here"], None)


def test_delta_passes_leave_bf16_base_weights_bit_identical(tiny_model_dir, delta_module):
    model = models.load_model(str(tiny_model_dir)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Translator(model, models.load_tokenizer(str(tiny_model_dir)), {"D": delta_module})
    reqs = [r for r in REQS if r.direction == Direction("de", "en")]
    first = tr.translate(reqs, {"de-en": "D"}, max_new_tokens=4, progress=False)
    for _ in range(4):  # five passes in all, each adding the delta and taking it away again
        assert tr.translate(reqs, {"de-en": "D"}, max_new_tokens=4, progress=False) == first
    applied = tr.last_info["delta_modules"]["D"]
    assert applied["dtype"] == "bfloat16" and applied["applied_rel_error"] > 0
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, changed


def _force_line_breaks(model, newline_id, at=(0, 4)):
    """Make `model` emit `newline_id` as its generated tokens number `at` (0 = the first), otherwise
    generate freely. Steps are counted by forward calls: the prefill picks token 0, each decode one more."""
    step = [0]

    def hook(_module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:  # prefill: a new generation starts
            step[0] = 0
        if step[0] in at:
            output.logits[:, -1, newline_id] += 1e4
        step[0] += 1
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def _translated_with_leading_line_breaks(model_dir: Path) -> tuple[Any, Any, Translator, list, list[str]]:
    """(tokenizer, model, Translator, requests, hypotheses) of a model whose outputs begin with "\\n"."""
    tok = models.load_tokenizer(str(model_dir))
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
    model = _force_line_breaks(models.load_model(str(model_dir)), newline)
    tr = Translator(model, tok, {})
    reqs = REQS[:3]
    got = tr.translate(reqs, dict.fromkeys(ROUTES, BASE), max_new_tokens=12, batch_size=2, progress=False)
    return tok, model, tr, reqs, got


def test_output_after_a_leading_line_break_is_its_first_non_empty_line(tiny_model_dir):
    tok, model, tr, reqs, got = _translated_with_leading_line_breaks(tiny_model_dir)
    # Reference: the same model generating without any line-break stop; its first non-empty line.
    for r, hyp in zip(reqs, got, strict=True):
        prompt = torch.tensor([tr.format.prompt_ids(r.direction.src, r.direction.tgt, r.text)])
        gen = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
        raw = tok.decode(gen[0, prompt.shape[1] :], skip_special_tokens=True)
        assert raw.startswith("\n") and raw.strip().count("\n") >= 1  # a second line follows
        first_line = next(line.strip() for line in raw.split("\n") if line.strip())
        assert hyp == first_line and hyp != ""
    assert tr.leading_line_breaks == 3
    assert tr.last_info["leading_line_breaks"] == 3
    # Once text is out, a line break does stop generation (token 4 here), for greedy and beam search.
    prompts = [tr.format.prompt_ids(r.direction.src, r.direction.tgt, r.text) for r in reqs]
    for beams in (1, 2):
        for raw in tr._generate(prompts, [BASE] * 3, beams=beams, max_new_tokens=40):
            assert raw.startswith("\n") and raw.endswith("\n") and "\n" not in raw.strip(), (beams, raw)


def test_line_stop_cuts_a_free_generation_where_the_translator_stops(tiny_model_dir):
    """The vLLM engine cuts its streamed output with LineStop.cut: on a generation that went on past
    the rule, the cut gives the Translator's hypothesis (the leading line break did not stop it)."""
    tok, model, tr, reqs, got = _translated_with_leading_line_breaks(tiny_model_dir)
    for r, hyp in zip(reqs, got, strict=True):
        prompt = torch.tensor([tr.format.prompt_ids(r.direction.src, r.direction.tgt, r.text)])
        gen = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
        free = gen[0, prompt.shape[1] :].tolist()
        ids, ended = tr.stop.cut(free)
        assert ended and len(ids) < len(free) and tr.stop.text(ids).startswith("\n")
        assert tr.stop.hypothesis(ids) == tr.stop.hypothesis(free) == hyp != ""
