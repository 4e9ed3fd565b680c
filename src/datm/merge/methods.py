"""Merge methods: one registered class per method, all with one interface on one module's sources.

A method gets the module's factored sources, ``factors = [(A_i, B_i, s_i)]`` with
ΔW_i = s_i · B_i @ A_i, the per-source weights (already resolved) and `MethodSettings` (density and
a seed derived for this module), and returns the merged ΔW either as a dense float32 out×in tensor
or as a low-rank result (any object with ``.factors(k) -> (A, B)`` and ``.dense()``, such as
`LowRank`), so that the lowrank form can skip the dense SVD. Adding a method = one class here with
`@register`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Union

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
class LowRank:
    """A thin SVD ΔW = u · diag(s) · vh."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def rank(self) -> int:
        return self.s.numel()

    def float(self) -> LowRank:
        return LowRank(self.u.float(), self.s.float(), self.vh.float())

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors (A k×in, B out×k), B @ A the best rank-k approximation, √s on each side;
        zero rows/columns pad a larger k. The adapter's scaling must be 1."""
        import torch

        if k < 1:
            raise MergeError(f"rank must be >= 1, got {k}")
        n = min(k, self.s.numel())
        root = self.s[:n].sqrt()
        b = torch.zeros(self.u.shape[0], k)
        a = torch.zeros(k, self.vh.shape[1])
        b[:, :n] = self.u[:, :n] * root
        a[:n, :] = root[:, None] * self.vh[:n, :]
        return a, b

    def dense(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. the run's seed and a module name)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class MethodSettings:
    density: float  # the kept fraction (methods that trim); 1.0 for those that do not
    seed: int  # derived per module (see `derive_seed`) for methods that draw random numbers


class Method:
    """One merge method. Subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str]
    title: ClassVar[str]  # for messages
    uses_density: ClassVar[bool] = False  # whether `density` means anything to it
    min_sources: ClassVar[int] = 1

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

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
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
    """TIES-merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging
    Models"): trim, elect sign, weighted disjoint mean (see `datm.merge.ops.ties_merge`)."""

    name = "ties"
    title = "TIES"
    uses_density = True
    min_sources = 2
    rank_within_sources = False  # trimming: a full-rank ΔW

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.ops import ties_merge_factored

        return ties_merge_factored(factors, settings.density, weights)


@register
class Linear(Method):
    """Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"): Σ w_i ΔW_i,
    weights 1/n by default (the mean)."""

    name = "linear"
    title = "linear"

    def default_weight(self, n_sources: int) -> float:
        return 1.0 / n_sources

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.ops import linear_merge_factored

        return linear_merge_factored(factors, weights)


@dataclass(frozen=True)
class Exact:
    """A merged ΔW = b @ a held exactly (rank = a's rows); truncated by SVD only below that rank."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if k < self.rank:
            from datm.merge.recent import svd_of_product

            return svd_of_product(self.b, self.a).factors(k)
        a = torch.zeros(k, self.a.shape[1])
        b = torch.zeros(self.b.shape[0], k)
        a[: self.rank], b[:, : self.rank] = self.a, self.b
        return a, b

    def dense(self) -> torch.Tensor:
        return self.b @ self.a


@register
class Cat(Method):
    """Concatenation (peft's ``cat``): B = [B_1 … B_n], A = [w_1 s_1 A_1; …], so B A = Σ w_i ΔW_i
    exactly — no interference resolved, no loss. The no-loss reference: its LoRA has rank Σ r_i
    (the sum of the sources' sizes), which is the default rank it ships at."""

    name = "cat"
    title = "concatenation"

    def default_rank(self, source_ranks: Sequence[int]) -> int:
        return sum(source_ranks)

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import cat

        return Exact(*cat(factors, weights))


@register
class DareTies(Method):
    """DARE-TIES (Yu et al., ICML 2024, "Language Models are Super Mario"): each ΔW_i's entries
    kept at random with probability `density` and rescaled by 1/density (seeded per module), then
    TIES's sign election and weighted disjoint mean. Full-rank result (see `datm.merge.recent`)."""

    name = "dare_ties"
    title = "DARE-TIES"
    uses_density = True
    min_sources = 2
    rank_within_sources = False  # trimming: a full-rank ΔW

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import dare_ties

        return dare_ties(factors, weights, density=settings.density, seed=settings.seed)


@register
class Knots(Method):
    """KnOTS-TIES (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS"): SVD of the
    concatenated LoRA updates gives a shared basis; the sources' coefficient blocks are TIES-merged
    (density) and mapped back. Exact at rank Σ r_i; computed through the factors."""

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
    Model Merging"): each source's singular vectors, decorrelated across sources (nearest orthonormal
    sets), then summed. Computed through the factors; weights default to 1 (a sum, as the paper)."""

    name = "tsv"
    title = "TSV-Merge"
    min_sources = 2

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import tsv_svd

        return tsv_svd(factors, weights)


@register
class IsoC(Method):
    """Iso-C (Marczak et al., 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces"): the summed ΔW with its singular values replaced by their mean over
    its rank (a flat spectrum). Ship it at full rank (Σ r_i): truncation loses most of a flat
    spectrum."""

    name = "iso_c"
    title = "Iso-C"
    min_sources = 2

    def default_rank(self, source_ranks: Sequence[int]) -> int:
        return sum(source_ranks)

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import iso_c_svd

        return iso_c_svd(factors, weights)


@register
class CoreSpace(Method):
    """Core Space merging (Panariello et al., 2025, "Accurate and Efficient Low-Rank Model Merging in
    Core Space"): the sources expressed in the reference bases of the stacked B's and A's (a lossless
    alignment), TIES on the Σr×Σr cores, mapped back. Exact at rank Σ r_i."""

    name = "core_space"
    title = "Core Space TIES"
    uses_density = True
    min_sources = 2

    def merge(self, factors: Factors, weights: Sequence[float], settings: MethodSettings) -> Merged:
        from datm.merge.recent import core_space_svd

        return core_space_svd(factors, weights, density=settings.density)


def dense_of(merged: Merged) -> torch.Tensor:
    """The dense float32 ΔW of a method's result."""
    import torch

    return merged if isinstance(merged, torch.Tensor) else merged.dense()
