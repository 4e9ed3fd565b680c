"""Merge methods: one registered class per method, all with one interface on one module's sources.

A method gets the module's factored sources, ``factors = [(A_i, B_i, s_i)]`` with
ΔW_i = s_i · B_i @ A_i, the per-source weights (already resolved) and `MethodSettings` (density, a
seed derived for this module, the global scale λ and, for the TIES family, whether to normalize),
and returns the merged ΔW either as a dense float32 out×in tensor or as a low-rank result (any
object with ``.factors(k) -> (A, B)`` and ``.dense()``, such as `datm.merge.lowrank.LowRank`), so
that the lowrank form can skip the dense SVD. Adding a method = one class here with `@register`.

Every method's merged ΔW is multiplied by the global scale λ (`merge.scale`, `--scale`, default 1),
as every reference scales its merged task vector (TIES's, DARE's and task arithmetic's λ, KnOTS's
and Core Space's scaling coefficient, Iso-C's α): `Method.apply` computes the method's formula at
λ = 1 (`merge`) and multiplies the result exactly (`datm.merge.lowrank.scaled`). Each class's
docstring states its formula with λ and the reference setting it corresponds to; the weights w_i
are per-source (default 1, linear 1/n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Union

from datm.config import names
from datm.merge.base import MergeError

if TYPE_CHECKING:
    import torch

Factors = Sequence[tuple["torch.Tensor", "torch.Tensor", float]]


class LowRankResult(Protocol):
    """A merged ΔW held as a thin factorization."""

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of rank k with B @ A ≈ ΔW (zero-padded when k exceeds the held rank)."""
        ...

    def dense(self) -> torch.Tensor:
        """ΔW as a dense float32 out×in tensor."""
        ...


Merged = Union["torch.Tensor", LowRankResult]


@dataclass(frozen=True)
class MethodSettings:
    density: float  # the kept fraction (methods that trim); 1.0 for those that do not
    seed: int  # derived per module (see `derive_seed`) for methods that draw random numbers
    scale: float = 1.0  # the global scale λ multiplying the merged ΔW
    normalize: bool | None = None  # TIES family: the agreeing entries' mean (True) or sum; None: default


class Method:
    """One merge method. Subclasses set the class attributes and implement `merge` (at λ = 1)."""

    name: ClassVar[str]
    title: ClassVar[str]  # for messages
    uses_density: ClassVar[bool] = False  # whether `density` means anything to it
    min_sources: ClassVar[int] = 1
    # TIES-like methods that can take the agreeing entries' mean or sum: the paper's choice; None
    # for the others (asking them to normalize is an error).
    normalize_default: ClassVar[bool | None] = None

    def default_weight(self, n_sources: int) -> float:
        return 1.0

    # Whether ΔW's rank is at most Σ r_i (sums and re-bases of the sources' updates; trimming makes
    # a full-rank ΔW): a LoRA of a larger rank would only add zeros.
    rank_within_sources: ClassVar[bool] = True

    def default_rank(self, source_ranks: Sequence[int]) -> int:
        """The rank a LoRA-shaped merged module gets when none is asked for."""
        return max(source_ranks)

    def max_rank(self, source_ranks: Sequence[int]) -> int | None:
        """The rank of the merged ΔW at most (None: full rank, any rank keeps more of it)."""
        return sum(source_ranks) if self.rank_within_sources else None

    def check_settings(self, settings: MethodSettings) -> None:
        """Refuse settings this method cannot honour (a bad scale; normalize where it means nothing)."""
        from datm.merge.lowrank import check_scale

        check_scale(settings.scale)
        if settings.normalize is not None and self.normalize_default is None:
            with_it = ", ".join(n for n, m in METHODS.items() if m.normalize_default is not None)
            raise MergeError(f"normalize applies to {with_it} only, not to method {self.name}")

    def normalize(self, settings: MethodSettings) -> bool:
        """Whether the agreeing entries are averaged (True) or summed: the setting, else the default."""
        return bool(self.normalize_default if settings.normalize is None else settings.normalize)

    def apply(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        """The merged ΔW at the global scale: λ · `merge` (exact; see `datm.merge.lowrank.scaled`)."""
        from datm.merge.lowrank import scaled

        self.check_settings(settings)
        return scaled(self.merge(factors, weights, settings), settings.scale)

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        """The method's merged ΔW at λ = 1."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


@register
class Ties(Method):
    """TIES-merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"):

        ΔW = λ · Σ_{i ∈ A} w_i t_i / Σ_{i ∈ A} w_i,   t_i = trim(ΔW_i, density),
        A = the sources whose t_i is nonzero with the sign of Σ_j w_j t_j (+ where that sum is 0).

    trim keeps the ⌊density·n⌋ entries of largest magnitude per module (peft's and mergekit's count).
    With normalize=False the agreeing sum Σ_{i∈A} w_i t_i instead. Reference settings: the paper's
    λ with weights 1; mergekit's `ties` (normalize: true) with `weight` w_i, `density` and `lambda`
    λ; peft's `ties` with uniform weights w is weights 1 and λ = w (peft divides by the count of
    agreeing sources, datm and mergekit by their weights, so here uniform weights cancel and λ, not
    the weights, sets the merge's scale)."""

    name = "ties"
    title = "TIES"
    uses_density = True
    min_sources = 2
    rank_within_sources = False  # trimming: a full-rank ΔW
    normalize_default = True

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.ops import ties_merge_factored

        return ties_merge_factored(factors, settings.density, weights, self.normalize(settings))


@register
class Linear(Method):
    """Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"):

        ΔW = λ · Σ_i w_i ΔW_i,   weights 1/n by default (the mean).

    The paper's θ₀ + λ Σ τ_i is weights 1 (`--weights 1,1,…`) and scale λ, or the default weights
    1/n and scale n·λ; mergekit's `task_arithmetic` is weights w_i, `lambda` λ."""

    name = "linear"
    title = "linear"

    def default_weight(self, n_sources: int) -> float:
        return 1.0 / n_sources

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.ops import linear_merge_factored

        return linear_merge_factored(factors, weights)


@register
class Cat(Method):
    """Concatenation (peft's ``cat``): B = [B_1 … B_n], A = λ · [w_1 s_1 A_1; …], so

        ΔW = B A = λ · Σ_i w_i ΔW_i   exactly — no interference resolved, no loss.

    The no-loss reference: its LoRA has rank Σ r_i (the sum of the sources' sizes), which is the
    default rank it ships at. peft's `cat` is λ 1 (its weights are the w_i)."""

    name = "cat"
    title = "concatenation"

    def default_rank(self, source_ranks: Sequence[int]) -> int:
        return sum(source_ranks)

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.lowrank import Exact
        from datm.merge.recent import cat

        return Exact(*cat(factors, weights))


@register
class DareTies(Method):
    """DARE-TIES (Yu et al., ICML 2024, "Language Models are Super Mario"):

        ΔW = λ · Σ_{i ∈ A} w_i d_i,   d_i = m_i ⊙ ΔW_i / density,  m_i ~ Bernoulli(density),
        A = the sources whose d_i is nonzero with the sign of Σ_j w_j d_j (+ where that sum is 0).

    The masks are drawn per module from its derived seed. The agreeing entries are summed, as the
    paper and mergekit's `dare_ties` (normalize: false, its default) do; normalize=True gives their
    weighted mean Σ_A w_i d_i / Σ_A w_i (peft's dare_ties), whose scale drifts with density (1.5×
    at 0.5). Reference settings: mergekit's `dare_ties` with `weight` w_i, `density`, `lambda` λ
    (mergekit rescales the kept entries to the L1 norm of ΔW_i, not by 1/density: the two agree at
    density 1, measured in benchmarks/results/mergekit_agreement.md). Full-rank result."""

    name = "dare_ties"
    title = "DARE-TIES"
    uses_density = True
    min_sources = 2
    rank_within_sources = False  # trimming: a full-rank ΔW
    normalize_default = False

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import dare_ties

        return dare_ties(
            factors,
            weights,
            density=settings.density,
            seed=settings.seed,
            normalize=self.normalize(settings),
        )


@register
class Knots(Method):
    """KnOTS-TIES (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS"):

        [ΔW_1 … ΔW_n] = U S [V_1ᵀ … V_nᵀ],   ΔW = λ · U · TIES_density(S V_1ᵀ, …, S V_nᵀ; w),

    TIES being the weighted disjoint mean of the trimmed, sign-agreeing coefficients (as `ties`).
    Reference setting: the KnOTS code's LLM configs scale the merged update by 0.4–0.5: λ = 0.4–0.5
    with weights 1. Departures: the trim is per module, and keeps ⌊density·n⌋ entries (the KnOTS
    code: one top-k over the model, ⌊density·n⌋ + 1). Exact at rank Σ r_i; computed through the
    factors."""

    name = "knots"
    title = "KnOTS-TIES"
    uses_density = True
    min_sources = 2

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import knots_svd

        return knots_svd(factors, weights, density=settings.density)


@register
class Tsv(Method):
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
    Model Merging"): with ΔW_i = U_i S_i V_iᵀ,

        ΔW = λ · polar([U_1 … U_n]) · diag(w_1 S_1, …, w_n S_n) · polar([V_1 … V_n])ᵀ,

    polar(X) the nearest orthonormal matrix (P Qᵀ of X = P Σ Qᵀ). Reference setting: the TSV code's
    scaling coefficient `alpha` is λ, with weights 1 (a sum, the default). Departure: the paper keeps
    each full-rank task's top 1/n directions; a LoRA is low-rank already, so all r_i are kept.
    Computed through the factors."""

    name = "tsv"
    title = "TSV-Merge"
    min_sources = 2

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import tsv_svd

        return tsv_svd(factors, weights)


@register
class IsoC(Method):
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
    and Task-Specific Subspaces"): with Σ_i w_i ΔW_i = U S Vᵀ of rank R,

        ΔW = λ · (Σ_j σ_j / min(out, in)) · U_R V_Rᵀ,

    the paper's level: the mean of all min(out, in) singular values, as its code takes it. Reference
    setting: the paper's α (tuned on validation) is λ, weights 1. Departure: the reference also
    flattens the min(out, in) − R zero singular values of a low-rank sum (arbitrary null-space
    directions); datm keeps the sum's span. Ship it at full rank (Σ r_i): truncation loses most of
    a flat spectrum."""

    name = "iso_c"
    title = "Iso-C"
    min_sources = 2

    def default_rank(self, source_ranks: Sequence[int]) -> int:
        return sum(source_ranks)

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import iso_c_svd

        return iso_c_svd(factors, weights)


@register
class IsoCCore(IsoC):
    """Iso-C's flat spectrum at the level of the sum's own span (Core Space's "isotropize in core";
    datm's `iso_c` before issue 24, the best method of its single-seed benchmark):

        ΔW = λ · (Σ_j σ_j / R) · U_R V_Rᵀ,   R the numerical rank of Σ_i w_i ΔW_i (≤ Σ r_i),

    min(out, in)/R times `iso_c`'s level (≈ 9× for a 1024-wide module merging seven rank-16
    sources). With λ = R/min(out, in) it is `iso_c`."""

    name = "iso_c_core"
    title = "Iso-C in the sum's span"

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import iso_c_core_svd

        return iso_c_core_svd(factors, weights)


@register
class CoreSpace(Method):
    """Core Space merging (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model
    Merging in Core Space"): U_B from the SVD of [B_1 … B_n], V_A from that of [A_1; …; A_n],

        M_i = U_Bᵀ ΔW_i V_A,   ΔW = λ · U_B · TIES_density(M_1, …, M_n; w) · V_Aᵀ,

    TIES on the Σr×Σr cores as `ties` (weighted disjoint mean). Reference setting: the Core Space
    code's scaling coefficient 0.2 is λ = 0.2, weights 1. Departure: per-module trim. Exact at rank
    Σ r_i."""

    name = "core_space"
    title = "Core Space TIES"
    uses_density = True
    min_sources = 2

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import core_space_svd

        return core_space_svd(factors, weights, density=settings.density)


names.check_registry("merge method", names.MERGE_METHODS, METHODS)


def dense_of(merged: Merged) -> torch.Tensor:
    """The dense float32 ΔW of a method's result."""
    import torch

    return merged if isinstance(merged, torch.Tensor) else merged.dense()
