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

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

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


def dense_of(merged: Merged) -> torch.Tensor:
    """The dense float32 ΔW of a method's result."""
    import torch

    return merged if isinstance(merged, torch.Tensor) else merged.dense()
