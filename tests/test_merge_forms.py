"""Every registered merge form × every registered method, through merge → Translator next to a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_lora
from safetensors.torch import load_file

from datm import models
from datm.eval.translate import Request, Translator
from datm.languages import Direction
from datm.merge import load_delta, merge_adapters
from datm.merge.forms import DELTA, FORMS
from datm.merge.methods import METHODS
from datm.plan import BASE

PREFIX = "base_model.model."
REQS = [
    Request(Direction("de", "en"), "die katze sieht einen hund"),
    Request(Direction("en", "de"), "we eat bread today"),
    Request(Direction("de", "en"), "wir essen heute brot"),
    Request(Direction("en", "de"), "my house is big"),
]
ROUTES = {"de-en": "M", "en-de": "L"}


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("form-adapters")
    return {
        name: random_lora(tiny_model_dir, root / name, seed, b_std=0.125)
        for seed, name in enumerate(["s1", "s2", "L"])
    }


def written_delta(out: Path) -> dict[str, torch.Tensor]:
    """ΔW per base weight name, as the merged module on disk holds it (whatever its form)."""
    if (out / "delta_config.json").is_file():
        return load_delta(out)
    config = json.loads((out / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(out / "adapter_model.safetensors")
    return {
        key.removeprefix(PREFIX).removesuffix(".lora_A.weight") + ".weight": scaling
        * tensors[key.replace("lora_A", "lora_B")].float()
        @ a.float()
        for key, a in tensors.items()
        if key.endswith(".lora_A.weight")
    }


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_and_method_serves_its_merged_delta_beside_a_lora(
    tiny_model_dir: Path, lora_dirs: dict[str, Path], tmp_path: Path, form: str, method: str
) -> None:
    out = tmp_path / "merged"
    res = merge_adapters(
        [lora_dirs["s1"], lora_dirs["s2"]], out, method=method, form=form, density=0.5, progress=False
    )
    # The form's size in bytes (float32 values here) is the tensor file's, less its small header.
    assert 0 <= res.bytes - FORMS[form].bytes(res.params, 4) < 8192
    assert FORMS[form].recognise(out)
    tok = models.load_tokenizer(str(tiny_model_dir))
    both = Translator(models.load_model(str(tiny_model_dir)), tok, {"M": out, "L": lora_dirs["L"]})
    assert both.kinds["M"] == FORMS[form].applied_as and both.kinds["L"] != DELTA
    got = both.translate(REQS, ROUTES, max_new_tokens=8, batch_size=4, progress=False)

    # What the form promises: the base model with W + ΔW (ΔW as written) serves the merged direction ...
    with_delta = models.load_model(str(tiny_model_dir))
    with torch.no_grad():
        for name, delta in written_delta(out).items():
            weight = with_delta.get_submodule(name.removesuffix(".weight")).weight
            weight.add_(delta)
    promised = Translator(with_delta, tok, {}).translate(
        REQS, dict.fromkeys(ROUTES, BASE), max_new_tokens=8, progress=False
    )
    # ... and the LoRA beside it serves its direction as it does alone.
    alone = Translator(models.load_model(str(tiny_model_dir)), tok, {"L": lora_dirs["L"]})
    lora_only = alone.translate(REQS, dict.fromkeys(ROUTES, "L"), max_new_tokens=8, progress=False)
    bare = Translator(models.load_model(str(tiny_model_dir)), tok, {}).translate(
        REQS, dict.fromkeys(ROUTES, BASE), max_new_tokens=8, progress=False
    )
    for i, r in enumerate(REQS):
        want = promised[i] if ROUTES[str(r.direction)] == "M" else lora_only[i]
        assert got[i] == want, (form, method, i)
    assert [promised[i] for i in (0, 2)] != [bare[i] for i in (0, 2)]  # the merge changes the outputs


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_from_the_cli(
    method: str, lora_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from datm.cli import main

    sources = [str(lora_dirs["s1"]), str(lora_dirs["s2"])]
    out = tmp_path / "merged"
    assert main(["merge", *sources, "--out", str(out), "--method", method, "--density", "0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == method and (out / "merge_info.json").is_file()
    with pytest.raises(SystemExit) as bad:  # argparse names the registered methods
        main(["merge", *sources, "--out", str(tmp_path / "bad"), "--method", "nope"])
    assert bad.value.code == 2 and method in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_rank_above_what_the_merge_holds_is_not_zero_padding(
    method: str, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Σ w_i ΔW_i-like merges (linear, cat, knots, tsv, iso_c, core_space) have rank ≤ Σ r_i: asked for
    more, the lowrank form ships rank Σ r_i, exact, not a bigger adapter of zeros. Trimming merges
    (ties, dare_ties) are full rank, so the asked rank is what they ship."""
    sources = [lora_dirs["s1"], lora_dirs["s2"]]  # rank 4 each
    bounded = METHODS[method].max_rank([4, 4])
    res = merge_adapters(sources, tmp_path / "m", method=method, form="lowrank", rank=20, density=0.5)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    if method in ("ties", "dare_ties"):
        assert bounded is None and res.rank == config["r"] == 20 and ranks == {20}
    else:
        assert bounded == 8 and res.rank == config["r"] == 8 and ranks == {8}
        assert res.rel_error is not None and res.rel_error < 1e-3  # nothing of ΔW was cut
    # The same request again is answered by the finished merge (the request is what was asked).
    again = merge_adapters(sources, tmp_path / "m", method=method, form="lowrank", rank=20, density=0.5)
    assert again == res


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scale_half_writes_exactly_half_from_the_cli(
    method: str, lora_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`datm merge A B C --method M --density 0.5 --form dense --scale 0.5` writes exactly half of
    `--scale 1` (issue 24: a mean cancelled uniform weights, so nothing could halve a ties merge)."""
    from datm.cli import main

    sources = [str(lora_dirs[n]) for n in ("s1", "s2", "L")]
    written = {}
    for scale in ("1", "0.5"):
        out = tmp_path / f"s{scale}"
        args = ["merge", *sources, "--out", str(out), "--method", method, "--density", "0.5"]
        assert main([*args, "--form", "dense", "--scale", scale]) == 0
        assert json.loads(capsys.readouterr().out)["scale"] == float(scale)
        written[scale] = written_delta(out)
    assert written["1"].keys() == written["0.5"].keys()
    for name, full in written["1"].items():
        assert float(full.abs().max()) > 0 and torch.equal(written["0.5"][name], full * 0.5), name
    with pytest.raises(Exception, match="scale"):
        merge_adapters([lora_dirs["s1"], lora_dirs["s2"]], tmp_path / "bad", method=method, scale=-1.0)
    asked_again = tmp_path / "s0.5"  # a finished merge at another λ is not reused
    with pytest.raises(Exception, match="scale"):
        merge_adapters([Path(s) for s in sources], asked_again, method=method, density=0.5, form="dense")


def test_scale_multiplies_the_lowrank_and_factor_forms(lora_dirs: dict[str, Path], tmp_path: Path) -> None:
    sources = [lora_dirs["s1"], lora_dirs["s2"]]
    for form in ("lowrank", "factor"):
        one = written_delta(merge_adapters(sources, tmp_path / f"{form}1", method="ties", form=form).out)
        scaled = merge_adapters(sources, tmp_path / f"{form}3", method="ties", form=form, scale=3.0)
        for name, full in one.items():
            err = torch.linalg.matrix_norm(written_delta(scaled.out)[name] - 3.0 * full)
            assert float(err / torch.linalg.matrix_norm(3.0 * full)) < 1e-5, (form, name, float(err))


def test_normalize_sums_or_averages_dare_ties_and_is_refused_elsewhere(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    sources = [lora_dirs["s1"], lora_dirs["s2"]]
    paper = merge_adapters(sources, tmp_path / "sum", method="dare_ties", density=1.0, form="dense")
    mean = merge_adapters(
        sources, tmp_path / "mean", method="dare_ties", density=1.0, form="dense", normalize=True
    )
    ties = merge_adapters(sources, tmp_path / "ties", method="ties", density=1.0, form="dense")
    assert paper.normalize is False and mean.normalize is True and ties.normalize is True
    for name, t in written_delta(ties.out).items():
        assert torch.equal(written_delta(mean.out)[name], t)  # TIES at density 1
        assert float(written_delta(paper.out)[name].norm()) > 1.2 * float(t.norm())  # the agreeing sum
    with pytest.raises(Exception, match="normalize applies to"):
        merge_adapters(sources, tmp_path / "k", method="knots", normalize=False)
