"""Tests of datm.merge on tiny Llama LoRA adapters made here (r=4, alpha=8, all linear layers)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils as peft_merge_utils
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from datm import artifacts
from datm.merge import (
    MergeError,
    apply_delta,
    delta_of,
    linear_merge,
    load_delta,
    lowrank_factor,
    merge_adapters,
    ops,
    ties_merge,
    ties_merge_factored,
    trim,
)
from datm.merge.methods import METHODS, MethodSettings

PREFIX = "base_model.model."
R, ALPHA = 4, 8
SCALING = ALPHA / R
INPUT_IDS = torch.tensor([[1, 5, 9, 22, 40, 63, 7, 3]])


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for seed in (1, 2, 3):
        model = tiny_base()
        torch.manual_seed(seed)
        lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(root / f"a{seed}")
        dirs.append(root / f"a{seed}")
    return dirs


def source_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha/r) · B @ A per module name, straight from the adapter's files."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            out[name] = SCALING * tensors[key.replace("lora_A", "lora_B")] @ a
    return out


def expected_ties(adapters: list[Path], density: float) -> dict[str, torch.Tensor]:
    per_source = [source_deltas(a) for a in adapters]
    return {name: ties_merge([d[name] for d in per_source], density) for name in per_source[0]}


def written_lora_delta(out: Path) -> dict[str, torch.Tensor]:
    config = json.loads((out / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(out / "adapter_model.safetensors")
    return {
        key.removeprefix(PREFIX).removesuffix(".lora_A.weight"): scaling
        * tensors[key.replace("lora_A", "lora_B")]
        @ a
        for key, a in tensors.items()
        if key.endswith(".lora_A.weight")
    }


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def test_ties_merge_matches_hand_computation() -> None:
    d1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.1, 0.2]])
    d2 = torch.tensor([[-1.5, 1.0, 0.4], [2.0, 0.3, -4.0]])
    d3 = torch.tensor([[0.5, -0.6, -0.7], [-2.5, 0.05, 1.0]])
    # Trim, density 0.5: keep ⌊0.5·6⌋ = 3 entries of largest magnitude in each.
    #   d1 keeps 3, -2, 1        -> t1 = [[ 1.0, -2, 0   ], [ 3.0, 0, 0 ]]
    #   d2 keeps -4, 2, -1.5     -> t2 = [[-1.5,  0, 0   ], [ 2.0, 0, -4]]
    #   d3 keeps -2.5, 1, -0.7   -> t3 = [[ 0,    0, -0.7], [-2.5, 0, 1 ]]
    assert torch.equal(trim(d1, 0.5), torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]]))
    # Elect: sum = [[-0.5, -2, -0.7], [2.5, 0, -3]] -> signs [[-, -, -], [+, + (sum 0), -]].
    # Disjoint mean over the nonzero values agreeing with the elected sign:
    #   (0,0): {-1.5} -> -1.5   (0,1): {-2} -> -2   (0,2): {-0.7} -> -0.7
    #   (1,0): {3, 2} -> 2.5    (1,1): all trimmed -> 0  (1,2): {-4} -> -4
    expected = torch.tensor([[-1.5, -2.0, -0.7], [2.5, 0.0, -4.0]])
    assert torch.allclose(ties_merge([d1, d2, d3], density=0.5), expected)
    # density 1 keeps everything: (0,0) sums to 1 - 1.5 + 0.5 = 0, which elects + (as peft and
    # mergekit do): the mean of the positive values 1 and 0.5.
    assert ties_merge([d1, d2, d3], density=1.0)[0, 0] == 0.75


def test_weighted_ties_is_the_weighted_disjoint_mean() -> None:
    d1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.1, 0.2]])
    d2 = torch.tensor([[-1.5, 1.0, 0.4], [2.0, 0.3, -4.0]])
    d3 = torch.tensor([[0.5, -0.6, -0.7], [-2.5, 0.05, 1.0]])
    # Trimmed at density 0.5 (see above): t1 = [[1, -2, 0], [3, 0, 0]], t2 = [[-1.5, 0, 0], [2, 0, -4]],
    # t3 = [[0, 0, -0.7], [-2.5, 0, 1]]. Weights [1, 3, 1] triple t2 before the election:
    # sum = [[1 - 4.5, -2, -0.7], [3 + 6 - 2.5, 0, -12 + 1]] -> signs [[-, -, -], [+, +, -]].
    # Weighted disjoint mean Σ w·t / Σ w over the agreeing sources:
    #   (0,0): t2 only -> 3·-1.5 / 3 = -1.5      (0,1): t1 only -> -2      (0,2): t3 only -> -0.7
    #   (1,0): t1, t2 -> (1·3 + 3·2) / (1 + 3) = 2.25     (1,1): none -> 0    (1,2): t2 -> -4
    expected = torch.tensor([[-1.5, -2.0, -0.7], [2.25, 0.0, -4.0]])
    assert torch.equal(ties_merge([d1, d2, d3], density=0.5, weights=[1, 3, 1]), expected)
    # The factored path, with ΔW_i = d_i @ I given as factors, computes the same.
    factors = [(torch.eye(3), d, 1.0) for d in (d1, d2, d3)]
    assert torch.equal(ties_merge_factored(factors, 0.5, [1, 3, 1]), expected)


def reference_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim spelled out with a full torch.kthvalue: keep magnitudes >= the keep-th largest."""
    keep = max(1, int(density * delta.numel()))
    threshold = torch.kthvalue(delta.abs().reshape(-1), delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def test_trim_threshold_is_exact_on_large_deltas_with_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    # 800×900 entries take the sampled-bound path; small integer factors make many equal magnitudes.
    delta = (
        torch.randint(-3, 4, (800, 2), generator=g).float()
        @ torch.randint(-3, 4, (2, 900), generator=g).float()
    )
    assert delta.numel() > 8 * ops.THRESHOLD_SAMPLE
    for density in (0.01, 0.2, 0.5, 0.97):
        trimmed = trim(delta, density)
        assert torch.equal(trimmed, reference_trim(delta, density)), density
        if density <= 0.5:  # (at 0.97 the threshold is 0: delta's own zeros are "kept")
            # Ties at the threshold are all kept, so more than ⌊density·n⌋ entries survive here.
            assert int((trimmed != 0).sum()) > int(density * delta.numel())
    # A sample that lands only on the largest entries gives a bound too high: the full kthvalue answers.
    monkeypatch.setattr(ops, "THRESHOLD_SAMPLE", 1000)
    sampled = torch.randint(
        delta.numel(), (1000,), generator=torch.Generator().manual_seed(ops.THRESHOLD_SEED)
    )
    rigged = delta.clone().reshape(-1)
    rigged[sampled] = 1000.0
    rigged = rigged.reshape(delta.shape)
    assert torch.equal(trim(rigged, 0.2), reference_trim(rigged, 0.2))


def test_trim_keeps_floor_of_density_times_n_like_peft() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(37, 23, generator=g)  # 851 entries, no two magnitudes equal
    for density in (0.3, 0.05, 0.999):  # 255.3, 42.55, 850.149 entries: none an integer
        trimmed = trim(delta, density)
        assert int((trimmed != 0).sum()) == int(density * delta.numel())
        assert torch.equal(trimmed, peft_merge_utils.magnitude_based_pruning(delta, density))
    assert int((trim(delta, 0.0001) != 0).sum()) == 1  # at least one entry, where peft keeps none


def test_ties_of_dense_deltas_equals_peft_ties_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(4)
    factors = [(torch.randn(4, 23, generator=g), torch.randn(37, 4, generator=g), s) for s in (2.0, 0.5, 1.0)]
    deltas = [delta_of(a, b, s) for a, b, s in factors]
    # An entry whose kept values cancel exactly: the sum 0 elects +, as peft's "total" method does.
    deltas[0][0, 0], deltas[1][0, 0], deltas[2][0, 0] = 50.0, -50.0, 0.0
    for density in (0.3, 0.55, 1.0):  # 255.3 and 468.05 of 851 entries are kept
        theirs = peft_merge_utils.ties(deltas, torch.ones(3), density, majority_sign_method="total")
        assert torch.equal(ties_merge(deltas, density), theirs), density
        assert ties_merge(deltas, density)[0, 0] == 50.0
    theirs = peft_merge_utils.ties(
        [delta_of(a, b, s) for a, b, s in factors], torch.ones(3), 0.3, majority_sign_method="total"
    )
    assert torch.equal(ties_merge_factored(factors, 0.3), theirs)


def test_factored_merges_equal_the_dense_merges_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    factors = []
    for scaling in (2.0, 0.5, 2.0, 1.0):
        a = torch.randint(-2, 3, (3, 900), generator=g).float()
        b = torch.randint(-2, 3, (800, 3), generator=g).float()
        factors.append((a, b, scaling))
    deltas = [delta_of(a, b, s) for a, b, s in factors]
    for density, weights in [(0.2, None), (0.35, [1.0, 0.7, -0.4, 2.5]), (1.0, [0.3, 1.0, 1.0, 0.1])]:
        expected = ties_merge(deltas, density, weights)
        assert torch.equal(ties_merge_factored(factors, density, weights), expected), (density, weights)
        settings = MethodSettings(density=density, seed=0)
        assert torch.equal(METHODS["ties"].merge(factors, weights or [1.0] * 4, settings), expected)
        assert expected.abs().sum() > 0
    assert torch.equal(
        METHODS["linear"].merge(factors, [0.5, 1.0, -1.0, 2.0], MethodSettings(density=1.0, seed=0)),
        linear_merge(deltas, [0.5, 1.0, -1.0, 2.0]),
    )
    with pytest.raises(MergeError, match="share one shape"):
        ties_merge_factored([factors[0], (factors[1][0][:, :10], factors[1][1], 1.0)], 0.2)


def test_linear_merge_and_lowrank_factor() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(5, 7, generator=g) for _ in range(3)]
    assert torch.allclose(linear_merge(deltas), (deltas[0] + deltas[1] + deltas[2]) / 3)
    assert torch.allclose(linear_merge(deltas, [0.5, -1, 2]), 0.5 * deltas[0] - deltas[1] + 2 * deltas[2])
    # Truncated SVD is the best rank-k approximation (Eckart–Young): its error is the tail spectrum.
    a, b = lowrank_factor(deltas[0], 2)
    assert a.shape == (2, 7) and b.shape == (5, 2)
    tail = torch.linalg.svdvals(deltas[0])[2:]
    assert math.isclose(float(torch.linalg.matrix_norm(deltas[0] - b @ a)), float(tail.norm()), rel_tol=1e-4)
    # A rank above min(out, in) pads with zeros and is exact.
    a, b = lowrank_factor(deltas[0], 9)
    assert a.shape == (9, 7) and torch.allclose(b @ a, deltas[0], atol=1e-5)
    # Large matrices take the randomized path; it must be deterministic and near-optimal.
    big = torch.randn(1100, 40, generator=g) @ torch.randn(40, 1200, generator=g)
    a1, b1 = lowrank_factor(big, 40)
    a2, b2 = lowrank_factor(big, 40)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert float(torch.linalg.matrix_norm(big - b1 @ a1) / torch.linalg.matrix_norm(big)) < 1e-4


# --------------------------------------------------------------------------------------------------
# merge_adapters
# --------------------------------------------------------------------------------------------------


def test_lowrank_full_rank_reproduces_ties_and_reports_truncation_error(
    adapters: list[Path], tmp_path: Path
) -> None:
    expected = expected_ties(adapters, 0.3)
    full = max(min(d.shape) for d in expected.values())  # 32: every module is kept whole
    res = merge_adapters(adapters, tmp_path / "full", density=0.3, rank=full, progress=False)
    written = written_lora_delta(tmp_path / "full")
    assert written.keys() == expected.keys() and res.n_modules == len(expected) == 14
    for name, delta in expected.items():
        assert torch.allclose(written[name], delta, atol=1e-5), name
    assert res.rel_error is not None and res.rel_error < 1e-5

    res = merge_adapters(adapters, tmp_path / "r4", density=0.3, progress=False)
    assert res.rank == R
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == R and not config["use_rslora"]
    info = json.loads((tmp_path / "r4" / "merge_info.json").read_text())
    written = written_lora_delta(tmp_path / "r4")
    error_sq = delta_sq = 0.0
    for name, delta in expected.items():
        err = float(torch.linalg.matrix_norm(delta - written[name]))
        norm = float(torch.linalg.matrix_norm(delta))
        assert math.isclose(info["modules"][name]["rel_error"], err / norm, rel_tol=1e-4)
        assert math.isclose(info["modules"][name]["kept_energy"], 1 - (err / norm) ** 2, rel_tol=1e-4)
        error_sq, delta_sq = error_sq + err**2, delta_sq + norm**2
    # TIES-trimmed deltas are not rank 4, so truncating to rank 4 loses something.
    assert 0.05 < res.rel_error < 1
    assert math.isclose(res.rel_error, math.sqrt(error_sq / delta_sq), rel_tol=1e-4)
    assert res.params == sum(R * sum(d.shape) for d in expected.values())
    assert res.bytes == (tmp_path / "r4" / "adapter_model.safetensors").stat().st_size
    assert [s["fingerprint"] for s in info["sources"]] == [
        artifacts.fingerprint_files([a / "adapter_model.safetensors"]) for a in adapters
    ]


def test_lowrank_output_loads_with_peft(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge_adapters(adapters, out, progress=False)
    written = written_lora_delta(out)
    base_weights = {k: v.clone() for k, v in tiny_base().state_dict().items()}

    merged = PeftModel.from_pretrained(tiny_base(), out).merge_and_unload()
    for name, delta in written.items():
        effective = merged.get_submodule(name).weight - base_weights[f"{name}.weight"]
        assert torch.allclose(effective, delta, atol=1e-6), name

    # transformers' own adapter loading gives the same model.
    via_load_adapter = tiny_base()
    via_load_adapter.load_adapter(str(out), adapter_name="merged")
    with torch.no_grad():
        assert torch.allclose(via_load_adapter(INPUT_IDS).logits, merged(INPUT_IDS).logits, atol=1e-5)


def test_factor_form_is_ties_on_a_and_b_separately(adapters: list[Path], tmp_path: Path) -> None:
    res = merge_adapters(adapters, tmp_path / "factor", density=0.5, form="factor", progress=False)
    config = json.loads((tmp_path / "factor" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
    sources = [load_file(a / "adapter_model.safetensors") for a in adapters]
    written = load_file(tmp_path / "factor" / "adapter_model.safetensors")
    for key in (
        f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight",
        f"{PREFIX}model.layers.0.self_attn.k_proj.lora_B.weight",
    ):
        assert torch.allclose(written[key], ties_merge([s[key] for s in sources], 0.5)), key
    # Merging the factors is not merging ΔW: the reported error measures how far it lands.
    name = "model.layers.1.mlp.down_proj"
    ties_delta = expected_ties(adapters, 0.5)[name]
    factor_delta = written_lora_delta(tmp_path / "factor")[name]
    info = json.loads((tmp_path / "factor" / "merge_info.json").read_text())
    err = float(torch.linalg.matrix_norm(ties_delta - factor_delta) / torch.linalg.matrix_norm(ties_delta))
    assert math.isclose(info["modules"][name]["rel_error"], err, rel_tol=1e-4) and err > 0.1
    assert res.rank == R


def test_dense_and_sparse_round_trip_and_apply(adapters: list[Path], tmp_path: Path) -> None:
    expected = expected_ties(adapters, 0.2)
    dense = merge_adapters(adapters, tmp_path / "dense", form="dense", progress=False)
    sparse = merge_adapters(adapters, tmp_path / "sparse", form="sparse", progress=False)
    for out in (tmp_path / "dense", tmp_path / "sparse"):
        loaded = load_delta(out)
        assert loaded.keys() == {f"{name}.weight" for name in expected}
        for name, delta in expected.items():
            assert torch.allclose(loaded[f"{name}.weight"], delta, atol=1e-6), (out.name, name)
        config = json.loads((out / "delta_config.json").read_text())
        assert config["form"] == out.name and len(config["modules"]) == len(expected)
    # Only the touched modules are stored; after TIES at density 0.2 each entry is nonzero only where
    # some source kept it, so at most 3 × 20% of the entries are stored, as int32 index + float32 value.
    n_entries = sum(d.numel() for d in expected.values())
    assert dense.params == n_entries and dense.rank is None and dense.rel_error == 0
    assert dense.bytes >= 4 * n_entries
    assert sparse.params == sum(int((d != 0).sum()) for d in expected.values()) <= 0.6 * n_entries + 14
    assert 8 * sparse.params <= sparse.bytes < 8 * sparse.params + 8192

    with_dense, with_sparse = tiny_base(), tiny_base()
    applied = apply_delta(with_dense, tmp_path / "dense")
    apply_delta(with_sparse, tmp_path / "sparse")
    # A PEFT-wrapped model gets the delta in its LoRA layers' base_layer weights.
    wrapped = get_peft_model(tiny_base(), LoraConfig(r=2, target_modules="all-linear")).eval()
    apply_delta(wrapped, tmp_path / "sparse")
    with torch.no_grad():
        logits = with_dense(INPUT_IDS).logits
        assert torch.equal(logits, with_sparse(INPUT_IDS).logits)
        assert torch.allclose(logits, wrapped(INPUT_IDS).logits, atol=1e-6)
        assert not torch.allclose(logits, tiny_base()(INPUT_IDS).logits, atol=1e-3)
    name = "model.layers.0.self_attn.q_proj"
    delta_applied = with_dense.get_submodule(name).weight - tiny_base().get_submodule(name).weight
    assert torch.allclose(delta_applied, expected[name], atol=1e-6)
    applied.restore()
    assert torch.equal(with_dense.get_submodule(name).weight, tiny_base().get_submodule(name).weight)


def test_delta_in_bf16_is_the_cast_fp32_sum_and_is_restored_bit_for_bit(
    adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "delta"
    # A small ΔW against W (as trained deltas are), where bf16 rounding matters.
    merge_adapters(adapters[:1], out, method="linear", form="dense", weights=[0.02], progress=False)
    model = tiny_base().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        apply_delta(model, out).restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # The reference: W + ΔW formed in float32 from the bf16 base weights, then cast to bf16 once.
    reference = tiny_base().to(torch.bfloat16)
    error_sq = delta_sq = 0.0
    with torch.no_grad():
        for name, delta in load_delta(out).items():
            weight = reference.get_submodule(name.removesuffix(".weight")).weight
            base = weight.float()
            weight.copy_((base + delta).to(torch.bfloat16))
            error_sq += float((weight.float() - base - delta).norm()) ** 2
            delta_sq += float(delta.norm()) ** 2
    with apply_delta(model, out) as applied, torch.no_grad():
        assert torch.equal(model(INPUT_IDS).logits, reference(INPUT_IDS).logits)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The error of ΔW as actually applied in bf16 is reported, and it is not small; in fp32 it is.
    assert math.isclose(applied.rel_error, math.sqrt(error_sq / delta_sq), rel_tol=1e-5)
    assert applied.rel_error > 0.01
    with apply_delta(tiny_base(), out) as in_fp32:
        assert in_fp32.rel_error < 1e-4


def test_linear_merge_is_the_weighted_sum(adapters: list[Path], tmp_path: Path) -> None:
    weights = [0.5, 0.3, -0.2]
    res = merge_adapters(
        adapters, tmp_path / "lin", method="linear", form="dense", weights=weights, progress=False
    )
    per_source = [source_deltas(a) for a in adapters]
    loaded = load_delta(tmp_path / "lin")
    for name in per_source[0]:
        weighted_sum = sum(w * d[name] for w, d in zip(weights, per_source, strict=True))
        assert torch.allclose(loaded[f"{name}.weight"], weighted_sum, atol=1e-6), name
    assert res.density == 1.0
    # One source, linear, lowrank at the source's rank: a lossless re-factoring of that adapter.
    single = merge_adapters(adapters[:1], tmp_path / "one", method="linear", progress=False)
    assert single.rel_error is not None and single.rel_error < 1e-5
    refactored = written_lora_delta(tmp_path / "one")
    for name, delta in per_source[0].items():
        assert torch.allclose(refactored[name], delta, atol=1e-5), name


def test_rank_and_alpha_patterns_and_rslora_set_each_modules_scaling(
    adapters: list[Path], tmp_path: Path
) -> None:
    patterned = tmp_path / "patterned"
    shutil.copytree(adapters[0], patterned)
    config = json.loads((patterned / "adapter_config.json").read_text())
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # r=8 overall but every module is rank 4 by rank_pattern; q_proj has its own alpha.
    config.update(r=8, rank_pattern=dict.fromkeys(kinds, R), alpha_pattern={"q_proj": 16}, use_rslora=True)
    (patterned / "adapter_config.json").write_text(json.dumps(config))
    merge_adapters([patterned], tmp_path / "out", method="linear", form="dense", progress=False)
    loaded = load_delta(tmp_path / "out")
    for name, delta in source_deltas(adapters[0]).items():
        rslora_scaling = (16 if name.endswith("q_proj") else ALPHA) / math.sqrt(R)
        assert torch.allclose(loaded[f"{name}.weight"], delta / SCALING * rslora_scaling, atol=1e-6), name


def test_finished_output_is_not_redone(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m"
    first = merge_adapters(adapters[:2], out, form="sparse", progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    os.utime(out / "delta.safetensors", ns=(1, 1))  # an older stamp shows any rewrite
    mtimes["delta.safetensors"] = 1
    again = merge_adapters(adapters[:2], out, form="sparse", progress=False)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(MergeError, match="density=0.2.*density=0.5"):
        merge_adapters(adapters[:2], out, form="sparse", density=0.5, progress=False)


def test_mismatched_sources_and_bad_arguments_fail_clearly(adapters: list[Path], tmp_path: Path) -> None:
    missing_module = tmp_path / "missing"
    shutil.copytree(adapters[1], missing_module)
    tensors = load_file(missing_module / "adapter_model.safetensors")
    for suffix in ("lora_A.weight", "lora_B.weight"):
        del tensors[f"{PREFIX}model.layers.1.mlp.up_proj.{suffix}"]
    save_file(tensors, missing_module / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"missing.*lacks LoRA module model\.layers\.1\.mlp\.up_proj"):
        merge_adapters([adapters[0], missing_module], tmp_path / "o1", progress=False)

    other_base = tmp_path / "other_base"
    shutil.copytree(adapters[1], other_base)
    config = json.loads((other_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-model"
    (other_base / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"other_base.*base_model_name_or_path.*some/other-model"):
        merge_adapters([adapters[0], other_base], tmp_path / "o2", progress=False)

    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(adapters[1], wrong_rank)
    config["base_model_name_or_path"], config["r"] = None, 8
    (wrong_rank / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"wrong_rank.*expected \[8, in\]"):
        merge_adapters([adapters[0], wrong_rank], tmp_path / "o3", progress=False)

    for kwargs, message in [
        ({"density": 0.0}, "density must be in"),
        ({"form": "svd"}, "unknown output form"),
        ({"method": "dare"}, "unknown merge method"),
        ({"rank": 0}, "rank must be"),
        ({"form": "dense", "rank": 4}, "rank applies to form=lowrank only"),
        ({"weights": [1.0]}, "1 weights for 2 sources"),
    ]:
        with pytest.raises(MergeError, match=message):
            merge_adapters(adapters[:2], tmp_path / "o4", progress=False, **kwargs)  # type: ignore[arg-type]
    not_finite = tmp_path / "not_finite"
    shutil.copytree(adapters[1], not_finite)
    tensors = load_file(not_finite / "adapter_model.safetensors")
    tensors[f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, not_finite / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"not_finite.*layers\.0\.mlp\.up_proj\.lora_A.*NaN or infinite"):
        merge_adapters([adapters[0], not_finite], tmp_path / "o6", progress=False)

    with pytest.raises(MergeError, match="TIES needs at least 2 sources"):
        merge_adapters(adapters[:1], tmp_path / "o5", progress=False)
    assert not (tmp_path / "o4").exists()
