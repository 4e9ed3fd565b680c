"""Every registered merge method against an independent dense float64 re-implementation of its
paper's formula (issue 24), with the global scale λ, on random LoRA deltas of a few sources.

The oracles below form each source's dense ΔW_i in float64 and follow the papers' reference code
(dense SVDs of out×in or out×n·in matrices, argsort-based trims), not datm's factored paths. Where
datm departs on purpose (the trim count ⌊density·n⌋, per-module trims, TSV's kept fraction, Iso-C's
null space), the oracle departs the same way and says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from datm.merge import ops
from datm.merge.base import derive_seed
from datm.merge.methods import METHODS, MethodSettings, dense_of, get_method

OUT, IN = 24, 20
RANKS = (3, 4, 2)
WEIGHTS = [1.0, 0.7, 1.3]
SEED = 5
RTOL = 1e-9  # the oracles' numerical rank cut, relative to the largest singular value

Factors = list[tuple[torch.Tensor, torch.Tensor, float]]


def random_factors(seed: int = 0, ranks: tuple[int, ...] = RANKS) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g) * 0.1, 2.0 / r) for r in ranks]


def dense64(factors: Factors) -> list[torch.Tensor]:
    return [s * b.double() @ a.double() for a, b, s in factors]


def top_k_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """The ⌊density·n⌋ entries of largest magnitude (peft's and mergekit's count), by a full sort."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    keep = max(1, int(density * x.numel()))
    order = torch.argsort(x.abs().reshape(-1), descending=True)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(x.shape)


def ties64(blocks: list[torch.Tensor], weights: list[float], mean: bool = True) -> torch.Tensor:
    """TIES steps 2–3 (Yadav et al. 2023; mergekit's `get_mask(..., "sum")`): the sign of Σ w_i x_i, + where
    it is 0; the agreeing entries' weighted sum, divided by their weights' sum when `mean`."""
    weighted = torch.stack([w * x for w, x in zip(weights, blocks, strict=True)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(weighted) == majority
    total = (weighted * agree).sum(0)
    if not mean:
        return total
    divisor = (torch.tensor(weights, dtype=torch.float64)[:, None, None] * agree).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def svd64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense SVD cut at numerical rank."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = int((s > s[0] * RTOL).sum())
    return u[:, :k], s[:k], vh[:k]


def oracle_ties(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    return ties64([d * top_k_mask(d, density) for d in dense64(factors)], w)


def oracle_dare_ties(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024): keep each entry with probability p, rescale by 1/p; TIES election; the
    agreeing entries summed (the paper, mergekit's dare_ties). The masks are datm's documented draw."""
    dropped = []
    for i, d in enumerate(dense64(factors)):
        if density < 1:
            g = torch.Generator().manual_seed(derive_seed(seed, i))
            d = d * (torch.rand(d.shape, generator=g) < density) / density
        dropped.append(d)
    return ties64(dropped, w, mean=False)


def oracle_linear(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    return sum(x * d for x, d in zip(w, dense64(factors), strict=True))


def oracle_knots(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """KnOTS (Stoica et al. 2025): SVD of [ΔW_1 … ΔW_n] = U S [V_1ᵀ … V_nᵀ]; TIES on the blocks S V_iᵀ
    (trimmed per module); U · merged."""
    u, s, vh = svd64(torch.cat(dense64(factors), dim=1))
    width = factors[0][0].shape[1]
    blocks = [s[:, None] * vh[:, i * width : (i + 1) * width] for i in range(len(factors))]
    return u @ ties64([c * top_k_mask(c, density) for c in blocks], w)


def oracle_tsv(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025) keeping every direction of each rank-r_i source: concatenated singular
    vectors replaced by their nearest orthonormal matrices (U Vᵀ of their SVDs), singular values kept."""
    us, ss, vs = [], [], []
    for x, d, r in zip(w, dense64(factors), RANKS, strict=True):
        u, s, vh = svd64(d)
        us.append(u[:, :r])
        ss.append(x * s[:r])
        vs.append(vh[:r].T)

    def polar(m: torch.Tensor) -> torch.Tensor:
        p, _, qh = torch.linalg.svd(m, full_matrices=False)
        return p @ qh

    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, dim=1)).T


def oracle_iso_c(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025, the reference's `iso_c`): the sum's singular values all replaced by
    their mean over min(out, in), i.e. Σσ / min(out, in). The reference flattens the null space too
    (arbitrary directions for a low-rank sum); datm keeps the sum's span, and so does this oracle."""
    u, s, vh = svd64(oracle_linear(factors, w, density, seed))
    return (s.sum() / min(OUT, IN)) * u @ vh


def oracle_iso_c_core(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """Isotropic in the sum's span (Core Space's "isotropize in core"): the mean over the numerical rank."""
    u, s, vh = svd64(oracle_linear(factors, w, density, seed))
    return s.mean() * u @ vh


def oracle_core_space(factors: Factors, w: list[float], density: float, seed: int) -> torch.Tensor:
    """Core Space (Panariello et al. 2025): U_B from svd([B_1 … B_n]), V_A from svd([A_1; …; A_n]); the
    cores U_Bᵀ ΔW_i V_A trimmed and TIES-merged; U_B · M · V_Aᵀ."""
    u_ref = svd64(torch.cat([b.double() for _, b, _ in factors], dim=1))[0]
    v_ref = svd64(torch.cat([a.double() for a, _, _ in factors], dim=0))[2].T
    cores = [u_ref.T @ d @ v_ref for d in dense64(factors)]
    return u_ref @ ties64([m * top_k_mask(m, density) for m in cores], w) @ v_ref.T


ORACLES = {
    "ties": oracle_ties,
    "dare_ties": oracle_dare_ties,
    "linear": oracle_linear,
    "cat": oracle_linear,
    "knots": oracle_knots,
    "tsv": oracle_tsv,
    "iso_c": oracle_iso_c,
    "iso_c_core": oracle_iso_c_core,
    "core_space": oracle_core_space,
}


def run(name: str, factors: Factors, density: float, scale: float, weights: list[float] = WEIGHTS):
    settings = MethodSettings(density=density, seed=SEED, scale=scale)
    return dense_of(get_method(name).apply(factors, weights, settings))


def test_every_registered_method_has_an_oracle() -> None:
    assert sorted(ORACLES) == sorted(METHODS)


@pytest.mark.parametrize("scale", [1.0, 0.4])
@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("name", sorted(ORACLES))
def test_every_method_is_its_papers_formula_times_the_scale(name: str, density: float, scale: float) -> None:
    factors = random_factors(seed=3)
    d = density if METHODS[name].uses_density else 1.0
    want = scale * ORACLES[name](factors, WEIGHTS, d, SEED)
    got = run(name, factors, density, scale).double()
    assert got.dtype == torch.float64 and got.shape == (OUT, IN)
    err = float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))
    assert err < 1e-5, (name, density, scale, err)


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_scale_multiplies_the_merged_delta_exactly(name: str) -> None:
    """λ = 0.5 halves the merge bit for bit (a power of two), λ = 1.5 scales it to round-off."""
    factors = random_factors(seed=8)
    one = run(name, factors, 0.5, 1.0)
    assert torch.equal(run(name, factors, 0.5, 0.5), one * 0.5)
    assert torch.allclose(
        run(name, factors, 0.5, 1.5), one * 1.5, rtol=1e-6, atol=1e-7 * float(one.abs().max())
    )


def test_the_scale_must_be_a_positive_finite_number() -> None:
    factors = random_factors()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(Exception, match="scale"):
            run("ties", factors, 0.5, bad)


def test_every_ties_path_elects_plus_where_the_sum_is_zero() -> None:
    """Two sources of opposite signs with equal weights: each entry's sum is 0, so TIES elects + and keeps
    the positive values (peft's "total", mergekit's "sum"). ops.py did; the SVD-based paths gave 0."""
    a = torch.eye(4)
    b = torch.diag(torch.tensor([1.0, -2.0, 3.0, -4.0]))
    factors = [(a, b, 1.0), (a, -b, 1.0)]
    want = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(ops.ties_merge([b, -b], 1.0), want)
    assert torch.equal(run("ties", factors, 1.0, 1.0, [1.0, 1.0]), want)
    assert torch.equal(run("dare_ties", factors, 1.0, 1.0, [1.0, 1.0]), want)
    # In the shared bases the sources are ±C: the same rule keeps |C| (it gave 0 everywhere).
    for name in ("knots", "core_space"):
        got = run(name, factors, 1.0, 1.0, [1.0, 1.0])
        want_norm = torch.linalg.matrix_norm(ORACLES[name](factors, [1.0, 1.0], 1.0, SEED))
        # which entries are positive depends on the SVD's sign convention, the norm does not
        assert abs(float(torch.linalg.matrix_norm(got.double()) - want_norm)) < 1e-5 * float(want_norm), name


def test_dare_ties_sums_the_agreeing_entries_and_normalize_keeps_the_mean() -> None:
    """The DARE paper and mergekit sum; with the mean the output's scale drifts with density."""
    factors = random_factors(seed=4)
    total = run("dare_ties", factors, 1.0, 1.0)
    assert torch.allclose(total.double(), oracle_dare_ties(factors, WEIGHTS, 1.0, SEED), rtol=1e-5, atol=1e-6)
    settings = MethodSettings(density=1.0, seed=SEED, scale=1.0, normalize=True)
    mean = dense_of(get_method("dare_ties").apply(factors, WEIGHTS, settings))
    assert torch.allclose(mean.double(), ties64(dense64(factors), WEIGHTS), rtol=1e-5, atol=1e-6)
    assert float(total.norm()) > 1.4 * float(mean.norm())  # three sources mostly agreeing: ~2× the mean


def test_ties_without_normalize_is_the_agreeing_sum() -> None:
    factors = random_factors(seed=6)
    settings = MethodSettings(density=0.5, seed=SEED, scale=2.0, normalize=False)
    got = dense_of(get_method("ties").apply(factors, WEIGHTS, settings)).double()
    blocks = [d * top_k_mask(d, 0.5) for d in dense64(factors)]
    assert torch.allclose(got, 2.0 * ties64(blocks, WEIGHTS, mean=False), rtol=1e-5, atol=1e-6)


def test_normalize_is_refused_by_methods_without_that_choice() -> None:
    with pytest.raises(Exception, match="normalize"):
        get_method("knots").check_settings(MethodSettings(density=0.5, seed=0, normalize=True))


def test_iso_c_is_at_the_papers_level_and_iso_c_core_at_the_spans() -> None:
    """Iso-C's level is Σσ/min(out, in); the old iso_c's (now iso_c_core) Σσ/R is min(out, in)/R times it."""
    factors = random_factors(seed=2)
    paper, core = run("iso_c", factors, 1.0, 1.0), run("iso_c_core", factors, 1.0, 1.0)
    s_paper = torch.linalg.svdvals(paper.double())
    s_core = torch.linalg.svdvals(core.double())
    rank = sum(RANKS)
    sigma = torch.linalg.svdvals(oracle_linear(factors, WEIGHTS, 1.0, 0))
    assert torch.allclose(s_paper[:rank], torch.full((rank,), float(sigma.sum()) / min(OUT, IN)).double())
    assert torch.allclose(s_core[:rank] / s_paper[:rank], torch.full((rank,), min(OUT, IN) / rank).double())
    assert float(s_paper[rank:].max()) < 1e-5 * float(s_paper[0])  # the span only, no arbitrary directions


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_methods_and_recent_do_not_import_each_other() -> None:
    """methods.py calls into recent.py; recent.py (and lowrank.py, which both use) never imports back."""
    package = Path(get_method.__code__.co_filename).parent
    for name in ("recent.py", "lowrank.py", "ops.py", "base.py"):
        back = {m for m in imported_modules(package / name) if m.startswith("datm.merge.methods")}
        assert not back, (name, back)
