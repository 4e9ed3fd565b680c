"""Tests of datm.merge.recent on small hand-made sources with known answers (float32 math, checked
against dense float64 references of each paper's algorithm)."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from datm.errors import DatmError
from datm.merge.recent import (
    LowRank,
    MethodError,
    cat,
    core_space,
    core_space_svd,
    dare_ties,
    derive_seed,
    iso_c,
    iso_c_core,
    iso_c_core_svd,
    iso_c_svd,
    knots,
    knots_svd,
    tsv,
    tsv_svd,
)

OUT, IN = 24, 18


def random_factors(ranks: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, IN, generator=generator), torch.randn(OUT, r, generator=generator), 0.5 + i)
        for i, r in enumerate(ranks)
    ]


def orthogonal_factors(n: int, r: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Sources whose column spaces are mutually orthogonal, and so are their row spaces."""
    generator = torch.Generator().manual_seed(seed)
    cols = torch.linalg.qr(torch.randn(OUT, n * r, generator=generator))[0]
    rows = torch.linalg.qr(torch.randn(IN, n * r, generator=generator))[0]
    return [
        (
            torch.randn(r, r, generator=generator) @ rows[:, i * r : (i + 1) * r].T,
            cols[:, i * r : (i + 1) * r] @ torch.randn(r, r, generator=generator),
            1.5,
        )
        for i in range(n)
    ]


def delta(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return (b.double() @ a.double()) * s


def close(x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Equal up to float32 round-off, relative to the size of y."""
    return float((x.double() - y.double()).norm()) <= rtol * max(float(y.double().norm()), 1e-12)


# ---- dense float64 references, written from the papers -----------------------------------------


def ref_ties(blocks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    kept = []
    for x in blocks:
        k = max(1, int(density * x.numel()))
        threshold = x.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(x.abs() >= threshold, x, torch.zeros_like(x)))
    stacked = torch.stack(kept)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *[1] * blocks[0].dim())
    sign = (stacked * w).sum(0).sign()
    agrees = (stacked * sign) > 0
    return (stacked * w * agrees).sum(0) / (w * agrees).sum(0).clamp(min=1e-30)


def ref_knots(factors, weights, density) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(torch.cat([delta(*f) for f in factors], dim=1), full_matrices=False)
    k = int((s > s[0] * 1e-8).sum())
    blocks = [s[:k, None] * block for block in vh[:k].split(IN, dim=1)]
    return u[:, :k] @ ref_ties(blocks, weights, density)


def ref_tsv(factors, fraction) -> torch.Tensor:
    us, ss, vs = [], [], []
    for a, b, s in factors:
        u, sv, vh = torch.linalg.svd(delta(a, b, s), full_matrices=False)
        k = int(fraction * a.shape[0])
        us, ss, vs = us + [u[:, :k]], ss + [sv[:k]], vs + [vh[:k]]

    def polar(x: torch.Tensor) -> torch.Tensor:
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
        return p @ qh

    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 0))


def ref_core(factors, weights, density) -> torch.Tensor:
    u_ref = torch.linalg.svd(torch.cat([b.double() for _, b, _ in factors], 1), full_matrices=False)[0]
    vh_ref = torch.linalg.svd(torch.cat([a.double() for a, _, _ in factors], 0), full_matrices=False)[2]
    cores = [u_ref.T @ delta(*f) @ vh_ref.T for f in factors]
    return u_ref @ ref_ties(cores, weights, density) @ vh_ref


# ---- known answers -------------------------------------------------------------------------------


def test_identical_sources_give_the_source_back() -> None:
    a, b, s = random_factors((3,))[0]
    source, n = delta(a, b, s), 4
    copies = [(a, b, s)] * n
    assert close(dare_ties(copies, density=1.0, normalize=True), source)  # the mean; the sum is n×
    assert close(knots(copies, density=1.0), source)
    assert close(core_space(copies, density=1.0), source)
    assert close(tsv(copies), source)  # shared directions are counted once: weights 1 give the source
    a_cat, b_cat = cat(copies, weights=[1 / n] * n)  # cat and iso_c sum: weights 1/n give the mean
    assert close(b_cat @ a_cat, source, rtol=1e-6)
    flat = torch.linalg.qr(torch.randn(OUT, 3))[0] @ torch.linalg.qr(torch.randn(IN, 3))[0].T * 2.0
    assert close(iso_c_core([(flat, torch.eye(OUT), 1.0)] * n, weights=[1 / n] * n), flat)
    # Iso-C at the paper's level: the 3 singular values 2 spread over min(out, in) = 18.
    assert close(iso_c([(flat, torch.eye(OUT), 1.0)] * n, weights=[1 / n] * n), flat * 3 / IN)


def test_orthogonal_sources_reduce_to_the_sum() -> None:
    factors = orthogonal_factors(n=3, r=3)
    summed = sum(delta(*f) for f in factors)
    assert close(tsv(factors), summed)
    assert close(knots(factors, density=1.0), summed)
    assert close(core_space(factors, density=1.0), summed)


@pytest.mark.parametrize("weights", [None, [0.5, -2.0, 3.0]])
def test_cat_is_exact_for_any_sources(weights: list[float] | None) -> None:
    factors = random_factors((2, 3, 5), seed=1)
    a_cat, b_cat = cat(factors, weights)
    assert a_cat.shape == (10, IN) and b_cat.shape == (OUT, 10)
    w = weights or [1.0, 1.0, 1.0]
    expected = sum(wi * delta(*f) for wi, f in zip(w, factors, strict=True))
    assert close(b_cat @ a_cat, expected, rtol=1e-6)


def test_iso_c_core_flattens_the_spectrum_over_the_sums_span() -> None:
    factors = random_factors((2, 3, 2), seed=2)
    weights = [1.0, 0.5, 2.0]
    summed = sum(w * delta(*f) for w, f in zip(weights, factors, strict=True))
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    merged = iso_c_core(factors, weights).double()
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values[:7], s[:7].mean().expand(7), rtol=1e-4)  # rank 7 = Σr, all equal σ̄
    assert float(values[7:].max()) < 1e-4 * float(values[0])
    assert close(u[:, :7] @ (u[:, :7].T @ merged), merged)  # inside the sum's column space
    assert close((merged @ vh[:7].T) @ vh[:7], merged)  # and row space
    assert iso_c_core_svd(factors, weights).rank == iso_c_svd(factors, weights).rank == 7


# ---- each method equals its dense definition ----------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.35])
def test_knots_equals_the_dense_svd_of_the_concatenated_updates(density: float) -> None:
    factors = random_factors((3, 2, 4), seed=3)
    weights = [1.0, 2.0, 0.5]
    assert close(knots(factors, weights, density), ref_knots(factors, weights, density))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_tsv_equals_the_papers_dense_algorithm(fraction: float) -> None:
    factors = random_factors((4, 4, 2), seed=4)
    assert close(tsv(factors, fraction=fraction), ref_tsv(factors, fraction))


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_core_space_equals_ties_on_the_dense_cores(density: float) -> None:
    factors = random_factors((3, 3, 2), seed=5)
    weights = [2.0, 1.0, 1.0]
    assert close(core_space(factors, weights, density), ref_core(factors, weights, density))


@pytest.mark.parametrize("method", [knots_svd, tsv_svd, iso_c_svd, core_space_svd])
def test_svd_forms_are_thin_svds(method) -> None:
    merged = method(random_factors((3, 2, 3), seed=9))
    eye = torch.eye(merged.rank)
    assert merged.rank <= 8 and merged.u.dtype == torch.float32
    assert torch.allclose(merged.u.T @ merged.u, eye, atol=1e-5)
    assert torch.allclose(merged.vh @ merged.vh.T, eye, atol=1e-5)
    assert bool((merged.s[:-1] >= merged.s[1:]).all()) and bool((merged.s > 0).all())


def test_lowrank_factors_are_the_truncated_svd_and_pad() -> None:
    merged = core_space_svd(random_factors((3, 3), seed=6), density=0.5)
    dense = merged.dense().double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    a, b = merged.factors(4)
    assert close(b @ a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    a, b = merged.factors(merged.rank + 3)
    assert a.shape == (merged.rank + 3, IN) and b.shape == (OUT, merged.rank + 3)
    assert close(b @ a, dense) and not a[merged.rank :].any()
    assert isinstance(merged, LowRank)


# ---- dare_ties ------------------------------------------------------------------------------------


def test_dare_ties_is_reproducible_from_its_seed() -> None:
    factors = random_factors((3, 3, 3), seed=7)
    first = dare_ties(factors, density=0.4, seed=derive_seed(11, "layers.0.q_proj"))
    assert torch.equal(first, dare_ties(factors, density=0.4, seed=derive_seed(11, "layers.0.q_proj")))
    assert not torch.equal(first, dare_ties(factors, density=0.4, seed=derive_seed(11, "layers.0.k_proj")))
    assert derive_seed(11, "x") == derive_seed("11", "x") and 0 <= derive_seed(11, "x") < 2**63


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
def test_dare_ties_at_density_1_is_ties() -> None:
    factors = random_factors((3, 2, 4), seed=8)
    stacked = torch.stack([delta(*f).float() for f in factors])
    expected = merge_utils.ties(list(stacked), torch.ones(3), density=1.0)  # peft's, equal weights
    assert close(dare_ties(factors, density=1.0, normalize=True), expected, rtol=1e-6)


def test_weighted_ties_is_the_weighted_disjoint_mean_by_hand() -> None:
    one = torch.ones(1, 1)
    sources = [(torch.tensor([[1.0, -2.0, 3.0]]), one, 1.0), (torch.tensor([[3.0, 1.0, -1.0]]), one, 1.0)]
    # Σ w·x = [10, 1, 0]: entry 0 both agree (1·1 + 3·3)/(1 + 3); entry 1 only source 2; entry 2's sum
    # is 0, which elects + (every TIES path's rule): source 1's 3 alone.
    mean = dare_ties(sources, weights=[1.0, 3.0], density=1.0, normalize=True)
    assert torch.equal(mean, torch.tensor([[2.5, 1.0, 3.0]]))
    assert torch.equal(dare_ties(sources, weights=[1.0, 3.0], density=1.0), torch.tensor([[10.0, 3.0, 3.0]]))


def test_dare_ties_drops_at_its_rate_and_rescales() -> None:
    """Constant sources, so the 256² entries are independent draws of one distribution."""
    column, row = torch.ones(256, 1), torch.ones(1, 256)
    single = dare_ties([(row, column, 2.0)], density=0.5, seed=1)
    assert abs(float((single != 0).float().mean()) - 0.5) < 0.02  # dropped at rate 1 − density
    assert abs(float(single.mean()) - 2.0) < 0.05  # rescaled by 1/density: unbiased for one source
    pair = dare_ties([(row, column, 1.0), (row, column, 3.0)], density=0.5, seed=1, normalize=True)
    # The disjoint mean of rescaled entries is biased: E = (x1 + x2)(1 − p/2) = 3, not the mean 2;
    # the agreeing entries' sum (the default: the paper's, mergekit's) is unbiased: E = x1 + x2 = 4.
    assert abs(float(pair.mean()) - 3.0) < 0.05
    summed = dare_ties([(row, column, 1.0), (row, column, 3.0)], density=0.5, seed=1)
    assert abs(float(summed.mean()) - 4.0) < 0.05


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f, w: ([f[0], (f[1][0], f[1][1][:, :2], 1.0)], w),
            "source 1: lora_A is [3, 18] and lora_B is",
        ),
        (
            lambda f, w: ([f[0], (f[1][0][:, :5], f[1][1], 1.0)], w),
            "source 1: its ΔW is 24×5 but source 0's is",
        ),
        (lambda f, w: ([], w), "nothing to merge"),
        (lambda f, w: (f, [1.0]), "got 1 weights for 2 sources"),
        (lambda f, w: (f, [1.0, float("nan")]), "weights must be finite"),
        (lambda f, w: ([f[0], (f[1][0] * float("inf"), f[1][1], 1.0)], w), "source 1: lora_A or lora_B"),
    ],
)
def test_bad_sources_raise_a_clear_method_error(change, message: str) -> None:
    factors, weights = change(random_factors((3, 3)), [1.0, 1.0])
    for method in (cat, dare_ties, knots, tsv, iso_c, core_space):
        with pytest.raises(MethodError, match=message.replace("[", r"\[").replace("]", r"\]")):
            method(factors, weights)


def test_bad_parameters_raise_a_method_error() -> None:
    factors = random_factors((3, 3))
    assert issubclass(MethodError, DatmError)
    for bad in (0.0, 1.5, True):
        with pytest.raises(MethodError, match="density must be in"):
            knots(factors, density=bad)
        with pytest.raises(MethodError, match="fraction must be in"):
            tsv(factors, fraction=bad)
    for method in (dare_ties, knots, core_space):
        with pytest.raises(MethodError, match="needs positive weights"):
            method(factors, [1.0, -1.0])
