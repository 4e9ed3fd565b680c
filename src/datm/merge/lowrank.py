"""Merged ΔW held as thin factorizations, and the SVD building blocks the methods share.

`LowRank` (a thin SVD) and `Exact` (LoRA factors held exactly) are what the SVD-based methods and
`cat` return; the lowrank form takes their factors without a dense SVD. `svd_of_product` computes the
thin SVD of a product of tall and wide factors through QRs, never forming the out×in matrix. `scaled`
applies the global scale λ to any method's result. Both `methods` and `recent` import this module;
it imports neither, so the two never import each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datm.merge.base import MergeError

RANK_RTOL = 1e-5  # relative cut for numerical rank (the KnOTS code cuts s ≤ 1e-5, absolute)


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


@dataclass(frozen=True)
class Exact:
    """A merged ΔW = b @ a held exactly (rank = a's rows); truncated by SVD only below that rank."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k < self.rank:
            return svd_of_product(self.b, self.a).factors(k)
        a = torch.zeros(k, self.a.shape[1])
        b = torch.zeros(self.b.shape[0], k)
        a[: self.rank], b[:, : self.rank] = self.a, self.b
        return a, b

    def dense(self) -> torch.Tensor:
        return self.b @ self.a


Held = torch.Tensor | LowRank | Exact


def check_scale(scale: float) -> float:
    """The global scale λ: a finite number > 0."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise MergeError(f"scale (λ) must be a finite number > 0, got {scale!r}")
    return float(scale)


def scaled(merged: Held, scale: float) -> Held:
    """λ · ΔW, exactly as the method's result is held: a dense ΔW is multiplied (in place), a thin SVD's
    singular values are, and an exact factorization's A is. λ = 1 returns `merged` itself; a power of
    two (λ = 0.5) scales every written value exactly."""
    scale = check_scale(scale)
    if scale == 1.0:
        return merged
    if isinstance(merged, torch.Tensor):
        return merged.mul_(scale)
    if isinstance(merged, LowRank):
        return LowRank(merged.u, merged.s * scale, merged.vh)
    return Exact(merged.a * scale, merged.b)


def svd_of_product(left: torch.Tensor, right: torch.Tensor) -> LowRank:
    """Thin SVD of left @ right (out×m @ m×in) at its numerical rank, from the QRs of left and rightᵀ
    and the SVD of their m×m core: O((out+in)·m²), never an out×in matrix."""
    if left.shape[1] == 0:
        return LowRank(left[:, :0], left.new_zeros(0), right[:0])
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    return compose(q_left, thin_svd(r_left @ r_right.T), q_right.T)


def thin_svd(x: torch.Tensor) -> LowRank:
    """torch.linalg.svd of x, cut to its numerical rank."""
    if x.numel() == 0:
        return LowRank(x.new_zeros(x.shape[0], 0), x.new_zeros(0), x.new_zeros(0, x.shape[1]))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = int((s > s[0] * RANK_RTOL).sum()) if float(s[0]) > 0 else 0
    return LowRank(u[:, :k], s[:k], vh[:k])


def compose(left: torch.Tensor, core: LowRank, right: torch.Tensor | None) -> LowRank:
    """The SVD of left @ core @ right, for `left` with orthonormal columns and `right` rows (None: I)."""
    return LowRank(left @ core.u, core.s, core.vh if right is None else core.vh @ right)
