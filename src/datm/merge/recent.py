"""Merge methods newer than TIES, for LoRA updates, one module at a time (pure torch math, no I/O).

Every method takes one module's sources as factors ``[(A_i, B_i, s_i)]`` (A_i r_i×in, B_i out×r_i,
ΔW_i = s_i · B_i @ A_i), one weight per source (default 1) and its own parameters, and returns
float32. The SVD-based ones never form a source's out×in ΔW: QRs of the stacked factors reduce every
decomposition to a core of at most Σr×Σr. They compute in float64, which is cheap at these sizes:
in float32, round-off moves KnOTS's coefficients by ~1e-5 of the largest singular value, enough to
change TIES's elementwise choices and the merged ΔW by 0.2–0.9% (7 sources of rank 16, 2048×640).
`*_svd` returns the result as a float32 thin SVD (`LowRank`), from which `LowRank.factors(k)` gives
the best rank-k LoRA with no SVD of a dense matrix; the plain name returns the dense merged ΔW
(out×in). `cat` returns exact LoRA factors. All are deterministic (`dare_ties` through its seed).
The global scale λ of every method is applied to these results by `datm.merge.lowrank.scaled` (the
registered methods in `datm.merge.methods` do it), so the functions here compute the merge at λ = 1.

Singular values below RANK_RTOL × the largest count as zero everywhere (round-off of a product of
lower rank); "the sources' span" below means the column/row spaces the sources' factors span.

What each keeps and loses, and its size when shipped as a LoRA re-factored at rank k (a module costs
k·(out+in) values; the n sources cost Σr_i·(out+in)):

- ``cat``: keeps everything, ΔW = Σ w_i ΔW_i exactly, and resolves no interference (it is the
  linear merge). Rank Σr_i: the sum of the sources' sizes, the no-loss reference.
- ``dare_ties``: drops entries of each ΔW at random and rescales the rest, then TIES's sign election
  and the agreeing entries' sum (the paper's and mergekit's; the mean with normalize=True). Loses
  minority-sign entries and, being elementwise, the low-rank structure: the result has full rank,
  so a rank-k LoRA keeps only part of it; dense (out·in) or sparse (about min(1, n·density)·out·in
  nonzeros) forms are exact.
- ``knots``: one shared basis (SVD of [ΔW_1 … ΔW_n]) in which each source is a coefficient block;
  TIES on the blocks. Rank ≤ Σr_i: exact at k = Σr_i (cat's size); below, a truncated SVD.
- ``tsv``: each source's top ⌊fraction·r_i⌋ singular directions, decorrelated across sources
  (nearest orthonormal sets), summed. Keeps the sources' span, loses the overlap between sources'
  directions (counted once) and the cut directions. Rank ≤ Σ⌊fraction·r_i⌋, exact at that rank.
- ``iso_c``: the summed update with its spectrum flattened to the paper's level Σσ/min(out, in):
  keeps its subspace, boosts weak directions and damps dominant ones. Rank ≤ Σr_i; a flat spectrum
  is the worst case for truncation (rank k keeps k/rank of its energy), so ship it at its full rank.
- ``iso_c_core``: the same flat spectrum at the level of the sum's own span, Σσ/R (R its numerical
  rank ≤ Σr_i): Core Space's "isotropize in core", min(out, in)/R times Iso-C's level.
- ``core_space``: TIES on each source's Σr×Σr core in the reference bases of the stacked B's and A's
  (lossless alignment, cheapest of the TIES-like ones). Rank ≤ Σr_i, exact at k = Σr_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from datm.merge.base import MergeError, derive_seed
from datm.merge.lowrank import LowRank, compose, svd_of_product, thin_svd
from datm.merge.ops import elect_sign

Factors = Sequence[tuple[torch.Tensor, torch.Tensor, float]]

ZERO_RTOL = 1e-6  # coefficients this small (relative) are zeros blurred by the float32 inputs' round-off


class MethodError(MergeError):
    """Bad input to a merge method: inconsistent factor shapes, bad weights or parameters."""


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def cat(factors: Factors, weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation (peft's ``cat``): A_cat = [w_1 s_1 A_1; …] (Σr×in), B_cat = [B_1 … B_n]
    (out×Σr), so B_cat @ A_cat = Σ w_i ΔW_i with no loss. Weights and scalings are folded into A: the
    written adapter has rank Σr_i and scaling 1 (lora_alpha = Σr_i, no rsLoRA)."""
    factors, weights = _prepare(factors, weights)
    a_cat = torch.cat([a * (w * s) for (a, _, s), w in zip(factors, weights, strict=True)], dim=0)
    return a_cat, torch.cat([b for _, b, _ in factors], dim=1)


def dare_ties(
    factors: Factors,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE then TIES (Yu et al., ICML 2024, "Language Models are Super Mario"; mergekit's
    ``dare_ties``) on the dense ΔW_i: Σ_{i agreeing} w_i · m_i ⊙ ΔW_i / density.

    1. Drop and rescale: each entry of ΔW_i is kept (m_i = 1) with probability `density` and divided
       by it (so E[kept] = ΔW_i); no magnitude trim.
    2. TIES's sign election (`elect_sign` of Σ w_i x_i) and the agreeing entries' weighted sum, as
       the paper and mergekit's default (normalize: false) do; normalize=True gives their weighted
       mean Σ_agree w_i x_i / Σ_agree w_i instead (peft's dare_ties). The mean of rescaled entries
       drifts with density: two agreeing sources x1, x2 give E = (x1 + x2)(1 − density/2), not
       their mean; the sum is unbiased where all sources agree.
    With density 1 nothing is dropped: TIES at density 1 without its mean (with it, with normalize).

    Randomness: source i's keep-mask comes from a CPU generator seeded with derive_seed(seed, i), so
    the result depends only on (seed, sources, weights, density). Merging a model, pass
    seed=derive_seed(run_seed, module_name) so each module draws its own masks whatever order or
    worker merges it. ΔW_i is formed twice (election, then averaging) instead of keeping n of them.
    """
    factors, weights = _prepare(factors, weights)
    _check_unit("density", density)
    _check_positive(weights, "dare_ties")

    def dropped(i: int) -> torch.Tensor:
        a, b, scaling = factors[i]
        delta = (b @ a).mul_(scaling)
        if density >= 1.0:
            return delta
        generator = torch.Generator().manual_seed(derive_seed(seed, i))
        keep = torch.rand(delta.shape, generator=generator) < density
        return delta.mul_(keep).div_(density)

    return _elect_and_average(dropped, weights, normalize)


def knots_svd(factors: Factors, weights: Sequence[float] | None = None, density: float = 1.0) -> LowRank:
    """KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS") with TIES.

    The SVD of the concatenated updates [ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ] gives a basis U shared by all
    sources, in which ΔW_i = U C_i with C_i = Σ V_iᵀ (k×in, k ≤ Σr; singular values under RANK_RTOL
    dropped as the reference drops s ≤ 1e-5). The C_i are merged with TIES (`_zero_round_off`, each
    trimmed to its top `density` entries, then `_elect_and_average`) and mapped back: ΔW = U C. As in
    the reference, Σ is folded into the C_i. Departures, on purpose: the trim is per module (the
    reference takes one top-k over the whole model, which a module-by-module stream cannot), and it
    keeps ⌊density·n⌋ entries as peft and mergekit count them (the KnOTS code keeps ⌊density·n⌋ + 1).
    Via factors: [ΔW_1 … ΔW_n] = B_cat · blockdiag(s_i A_i), decomposed by `svd_of_product`.
    """
    factors, weights = _prepare(factors, weights, torch.float64)
    _check_unit("density", density)
    _check_positive(weights, "knots")
    in_features = factors[0][0].shape[1]
    b_cat = torch.cat([b for _, b, _ in factors], dim=1)
    shared = svd_of_product(b_cat, torch.block_diag(*[a * s for a, _, s in factors]))
    blocks = [
        shared.s[:, None] * shared.vh[:, i * in_features : (i + 1) * in_features] for i in range(len(factors))
    ]
    coefficients = [_trim(c, density) for c in _zero_round_off(blocks)]
    merged = _elect_and_average(lambda i: coefficients[i].clone(), weights)
    return compose(shared.u, thin_svd(merged), None).float()


def tsv_svd(factors: Factors, weights: Sequence[float] | None = None, fraction: float = 1.0) -> LowRank:
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
    Model Merging").

    1. Per source, the SVD ΔW_i = U_i S_i V_iᵀ, kept to its top k_i = max(1, ⌊fraction·r_i⌋) directions
       (at most its numerical rank); weights scale S_i. The paper keeps 1/n of a full-rank matrix's
       directions; a LoRA is low-rank already, so the default keeps all r_i.
    2. Concatenate U_cat = [U_1 … U_n], S_cat, V_cat = [V_1 … V_n] and replace U_cat and V_cat by their
       nearest orthonormal matrices (Procrustes: P Qᵀ from svd(U_cat) = P Σ Qᵀ), which decorrelates the
       sources' singular vectors.
    3. ΔW = U⊥ diag(S_cat) V⊥ᵀ.
    The reference takes P Qᵀ over all columns; where sources share directions U_cat is rank-deficient
    and those extra columns are arbitrary, so here P Qᵀ spans U_cat's numerical rank only (unique).
    Then n identical sources give that source back, and mutually orthogonal ones give their sum.
    """
    factors, weights = _prepare(factors, weights, torch.float64)
    _check_unit("fraction", fraction)
    us, ss, vhs = [], [], []
    for (a, b, scaling), w in zip(factors, weights, strict=True):
        one = svd_of_product(b, a * scaling)
        k = min(one.rank, max(1, int(fraction * a.shape[0])))
        us.append(one.u[:, :k])
        ss.append(one.s[:k] * w)
        vhs.append(one.vh[:k])
    s_cat = torch.cat(ss)
    return svd_of_product(_polar(torch.cat(us, dim=1)) * s_cat, _polar(torch.cat(vhs, dim=0))).float()


def iso_c_svd(factors: Factors, weights: Sequence[float] | None = None) -> LowRank:
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces").

    The SVD of the summed update Σ w_i ΔW_i = U S Vᵀ with every singular value replaced by the
    paper's level σ̄ = Σ_j σ_j / min(out, in), the mean of all min(out, in) singular values as the
    reference code takes it (`S.mean()` of the full thin SVD): ΔW = σ̄ U_R V_Rᵀ. A sum of LoRAs has
    rank R ≤ Σr; the reference flattens its min(out, in) − R zero singular values too, which adds
    arbitrary null-space directions (whatever the SVD routine returns there), so datm keeps the
    sum's span (U_R, V_R) at the paper's level — a departure only where the sum is not full rank.
    Via factors: the sum is B_cat · [w_1 s_1 A_1; …].
    """
    summed = _summed(factors, weights)
    out_features, in_features = summed.u.shape[0], summed.vh.shape[1]
    level = float(summed.s.sum()) / min(out_features, in_features)
    return LowRank(summed.u, torch.full_like(summed.s, level), summed.vh).float()


def iso_c_core_svd(factors: Factors, weights: Sequence[float] | None = None) -> LowRank:
    """Iso-C's flat spectrum at the level of the sum's own span: σ̄ = Σ_j σ_j / R over its numerical
    rank R, ΔW = σ̄ U_R V_Rᵀ (Core Space's "isotropize in core"; datm's `iso_c` before issue 24).
    min(out, in)/R times `iso_c_svd`'s level: ≈ 9× for a 1024-wide module merging seven rank-16
    sources."""
    summed = _summed(factors, weights)
    return LowRank(summed.u, torch.full_like(summed.s, float(summed.s.mean())), summed.vh).float()


def _summed(factors: Factors, weights: Sequence[float] | None) -> LowRank:
    """The thin SVD of Σ w_i ΔW_i (float64) at its numerical rank, from B_cat · [w_1 s_1 A_1; …]."""
    factors, weights = _prepare(factors, weights, torch.float64)
    return svd_of_product(
        torch.cat([b for _, b, _ in factors], dim=1),
        torch.cat([a * (w * s) for (a, _, s), w in zip(factors, weights, strict=True)], dim=0),
    )


def core_space_svd(factors: Factors, weights: Sequence[float] | None = None, density: float = 1.0) -> LowRank:
    """Core Space merging with TIES (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank
    Model Merging in Core Space").

    Reference bases: U_ref, the left singular vectors of B_cat = [B_1 … B_n], and V_ref, the right ones
    of A_cat = [A_1; …; A_n] (as the paper, from the factors without their scalings). Each source is
    exactly ΔW_i = U_ref M_i V_refᵀ with the core M_i = s_i (U_refᵀ B_i)(A_i V_ref), at most Σr×Σr.
    The M_i are merged with TIES (`_zero_round_off`, trim to `density`, `_elect_and_average`), and
    ΔW = U_ref M V_refᵀ.

    Why it is here: it aligns both sides of every source (KnOTS aligns one and merges in×Σr blocks),
    loses nothing in the projection, and costs O((out+in)·Σr²). TSV and Iso-C give the same result in
    core space as in full space (they are invariant to the orthonormal bases), and `tsv`/`iso_c` here
    already run in that Σr-sized space; only elementwise methods (TIES) change, hence TIES in the core.
    """
    factors, weights = _prepare(factors, weights, torch.float64)
    _check_unit("density", density)
    _check_positive(weights, "core_space")
    u_ref = thin_svd(torch.cat([b for _, b, _ in factors], dim=1)).u
    vh_ref = thin_svd(torch.cat([a for a, _, _ in factors], dim=0)).vh
    cores = [
        _trim(m, density)
        for m in _zero_round_off([(u_ref.T @ b) @ (a @ vh_ref.T) * s for a, b, s in factors])
    ]
    merged = _elect_and_average(lambda i: cores[i].clone(), weights)
    return compose(u_ref, thin_svd(merged), vh_ref).float()


def knots(factors: Factors, weights: Sequence[float] | None = None, density: float = 1.0) -> torch.Tensor:
    """`knots_svd` as a dense out×in ΔW."""
    return knots_svd(factors, weights, density).dense()


def tsv(factors: Factors, weights: Sequence[float] | None = None, fraction: float = 1.0) -> torch.Tensor:
    """`tsv_svd` as a dense out×in ΔW."""
    return tsv_svd(factors, weights, fraction).dense()


def iso_c(factors: Factors, weights: Sequence[float] | None = None) -> torch.Tensor:
    """`iso_c_svd` as a dense out×in ΔW."""
    return iso_c_svd(factors, weights).dense()


def iso_c_core(factors: Factors, weights: Sequence[float] | None = None) -> torch.Tensor:
    """`iso_c_core_svd` as a dense out×in ΔW."""
    return iso_c_core_svd(factors, weights).dense()


def core_space(
    factors: Factors, weights: Sequence[float] | None = None, density: float = 1.0
) -> torch.Tensor:
    """`core_space_svd` as a dense out×in ΔW."""
    return core_space_svd(factors, weights, density).dense()


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the ⌊density·n⌋ (at least 1) entries of largest magnitude, as peft and
    mergekit count them, plus any tied with the last kept; zero the rest."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    keep = max(1, int(density * n))
    magnitude = x.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1), n - keep + 1).values
    return x * (magnitude >= threshold)


def _zero_round_off(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Set entries within round-off of 0 (|x| ≤ ZERO_RTOL × the largest block's norm) to exactly 0.

    A source that does not touch a direction of the shared basis has zeros there, computed as ~1e-7
    (float32 factors are orthogonal only to ~1e-7); left as they are, TIES would count that source in
    the entry's mean and halve it. TIES's mean jumps at 0 whatever the cut; this one keeps every entry
    that carries more than a millionth of the largest source.
    """
    scale = max(float(torch.linalg.matrix_norm(b)) for b in blocks)
    return [b.masked_fill(b.abs() <= ZERO_RTOL * scale, 0.0) for b in blocks]


def _elect_and_average(
    source: Callable[[int], torch.Tensor], weights: list[float], normalize: bool = True
) -> torch.Tensor:
    """TIES steps 2–3 (Yadav et al. 2023) over sources source(0..n-1), weights > 0.

    Each entry's sign is elected from Σ w_i x_i by `elect_sign` (a sum of exactly 0 elects +, as in
    `ops.ties_merge`); the result is the weighted disjoint mean of the sources that agree with it,
    Σ_agree w_i x_i / Σ_agree w_i (mergekit's TIES with normalize: true); an entry no source agrees
    with is 0. With equal weights it is peft's mean of the agreeing values; normalize=False returns
    Σ_agree w_i x_i. `source(i)` returns a new tensor
    (modified here) and is called twice per source, so only a few result-sized tensors exist at once.
    """
    elected = source(0).mul_(weights[0])
    for i, w in enumerate(weights[1:], start=1):
        elected.add_(source(i), alpha=w)
    elect_sign(elected)
    total = torch.zeros_like(elected)
    weight_sum = torch.zeros_like(elected)
    for i, w in enumerate(weights):
        x = source(i).mul_(elected)  # > 0 exactly where source i agrees with the elected sign
        agrees = x > 0
        weight_sum.add_(agrees, alpha=w)
        total.add_(x.mul_(elected).masked_fill_(agrees.logical_not_(), 0.0), alpha=w)  # ×(±1)² = x
    return total.div_(weight_sum.masked_fill_(weight_sum == 0, 1.0)) if normalize else total


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to x (Procrustes): P Qᵀ of svd(x) = P Σ Qᵀ over x's numerical rank."""
    one = thin_svd(x)
    return one.u @ one.vh


def _prepare(
    factors: Factors, weights: Sequence[float] | None, dtype: torch.dtype = torch.float32
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], list[float]]:
    """Check the sources and weights; returns the factors in `dtype` and one weight per source (default 1)."""
    if not factors:
        raise MethodError("nothing to merge: no sources given")
    checked = []
    for i, (a, b, scaling) in enumerate(factors):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MethodError(
                f"source {i}: lora_A is {list(a.shape)} and lora_B is {list(b.shape)}; expected "
                "[r, in] and [out, r] with the same rank r"
            )
        shape, first = (b.shape[0], a.shape[1]), (factors[0][1].shape[0], factors[0][0].shape[1])
        if shape != first:
            raise MethodError(
                f"source {i}: its ΔW is {shape[0]}×{shape[1]} but source 0's is {first[0]}×{first[1]}; "
                "the sources of one module must share its shape"
            )
        if not math.isfinite(float(scaling)):
            raise MethodError(f"source {i}: scaling must be a finite number, got {scaling!r}")
        a, b = a.to(dtype), b.to(dtype)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise MethodError(f"source {i}: lora_A or lora_B holds NaN or infinite values")
        checked.append((a, b, float(scaling)))
    if weights is None:
        return checked, [1.0] * len(checked)
    if len(weights) != len(checked):
        raise MethodError(f"got {len(weights)} weights for {len(checked)} sources; give one per source")
    if not all(math.isfinite(float(w)) for w in weights):
        raise MethodError(f"weights must be finite numbers, got {list(weights)}")
    return checked, [float(w) for w in weights]


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise MethodError(f"{name} must be in (0, 1], got {value!r}")


def _check_positive(weights: list[float], method: str) -> None:
    if any(w <= 0 for w in weights):
        raise MethodError(f"{method} needs positive weights (its mean divides by them), got {weights}")
