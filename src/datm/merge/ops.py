"""The math of merging: trim, TIES (factored: the production path; dense: the reference), linear,
and the truncated-SVD re-factoring. Everything is computed in float32 on out×in ΔW matrices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from datm.merge.base import MergeError

# Exact SVD is fast enough up to this smaller dimension; above it a seeded randomized SVD is used.
EXACT_SVD_MAX_DIM = 1024
SVD_OVERSAMPLE = 16
SVD_NITER = 8  # TIES output has a flat spectrum: 4 iterations cost ~0.2% extra error, 8 ~0.02%
SVD_SEED = 0
# Above 8× this many entries, trim thresholds are found among the entries above a sampled lower bound.
THRESHOLD_SAMPLE = 1 << 16
THRESHOLD_SEED = 0


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest magnitude (at least 1), zero the rest (TIES step 1).

    The count is `int(density * n)` as peft's `magnitude_based_pruning` and mergekit's `magnitude`
    compute it (the float product, floored), so that on the same ΔW they keep the same entries.
    Entries tied in magnitude with the last kept one are all kept, so the result is deterministic
    (peft's topk keeps an arbitrary subset of such ties).
    """
    check_density(density)
    return _zero_below(delta.clone(), _trim_threshold(delta, density))


def _trim_threshold(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """The smallest magnitude `trim` keeps (the keep-th largest), or None when it keeps everything."""
    n = delta.numel()
    if n == 0 or density >= 1.0:
        return None
    keep = max(1, int(density * n))  # exactly peft's and mergekit's count
    return _kth_largest(delta.abs().reshape(-1), keep)


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of the 1-D `values` (no NaN), exactly what torch.kthvalue gives.

    kthvalue copies its whole input and an int64 index per entry. On large inputs a lower bound is
    taken from a seeded random sample, a few standard errors below the k-th largest, and kthvalue
    runs on the entries at or above it only. When at least k entries pass the bound, all k largest
    are among them, so the answer is exact; if the sample misled (very rare), the full kthvalue runs.
    """
    n = values.numel()
    if n > 8 * THRESHOLD_SAMPLE:
        generator = torch.Generator().manual_seed(THRESHOLD_SEED)
        sample = values[torch.randint(n, (THRESHOLD_SAMPLE,), generator=generator)]
        fraction = k / n
        margin = 6 * math.sqrt(fraction * (1 - fraction) / THRESHOLD_SAMPLE) + 2 / THRESHOLD_SAMPLE
        sample_k = min(THRESHOLD_SAMPLE, math.ceil((fraction + margin) * THRESHOLD_SAMPLE))
        bound = torch.kthvalue(sample, THRESHOLD_SAMPLE - sample_k + 1).values
        candidates = values[values >= bound]
        if candidates.numel() >= k:
            return torch.kthvalue(candidates, candidates.numel() - k + 1).values
        del candidates
    return torch.kthvalue(values, n - k + 1).values


def _zero_below(delta: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Set `delta`'s entries of magnitude below `threshold` to 0, in place (None keeps all); returns it."""
    if threshold is None:
        return delta
    # |x| >= t as (x >= t or x <= -t): two boolean masks instead of a float copy of |delta|.
    keep = delta.ge(threshold)
    keep.logical_or_(delta.le(-threshold))
    return delta.masked_fill_(keep.logical_not_(), 0.0)


def ties_merge(
    deltas: Sequence[torch.Tensor],
    density: float,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of same-shaped task deltas, computed in float32.

    1. trim each delta to its top-`density` entries by magnitude;
    2. multiply by its weight w_i (default 1) and elect, per entry, the sign of the sum over sources;
    3. take, per entry, the weighted disjoint mean of the sources whose trimmed value is nonzero and
       has the elected sign: Σ_agreeing w_i·t_i / Σ_agreeing w_i. This is the mean of the agreeing
       values weighted by w (mergekit's TIES with `normalize: true`); with unit weights it is the
       paper's and peft's plain mean over the agreeing sources. With normalize=False, the agreeing
       values' weighted sum Σ_agreeing w_i·t_i instead (mergekit's `normalize: false`).

    A sum of exactly 0 elects + (`elect_sign`, the one rule of every TIES path); an entry that every
    source trimmed to 0 merges to 0, and so does one whose agreeing weights sum to 0 (possible only
    with negative weights; mergekit then divides by 1, as here). The global scale λ is applied by the
    method (`datm.merge.lowrank.scaled`), after this.
    """
    _check_same_shape(deltas)
    weights = resolve_weights(weights, len(deltas), default=1.0)
    trimmed = [trim(d.float(), density).mul_(w) for d, w in zip(deltas, weights, strict=True)]
    elected = torch.zeros_like(trimmed[0])
    for t in trimmed:
        elected.add_(t)
    elect_sign(elected)
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for t, w in zip(trimmed, weights, strict=True):
        agrees = (t * elected) > 0  # nonzero with the elected sign
        total.add_(t * agrees)
        divisor.add_(agrees, alpha=w)
    return _normalized(total, divisor, normalize)


def ties_merge_factored(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    density: float,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """`ties_merge` of LoRA deltas ΔW_i = s_i · B_i @ A_i given as factors (A_i, B_i, s_i).

    The result equals ``ties_merge([delta_of(a, b, s) for a, b, s in factors], density, weights, normalize)``
    bit for bit (for finite deltas), but no two ΔW_i exist at once: pass 1 forms each ΔW_i, finds its
    trim threshold and adds its weighted trimmed values to the sign-electing sum; pass 2 forms each
    ΔW_i again from its (small) factors, trims it with the stored threshold and adds the entries that
    agree with the elected sign (and their weights to the divisor). Peak: about four out×in float32
    matrices (ΔW_i, the elected signs, the weighted sum, the divisor) whatever the number of sources.
    """
    check_density(density)
    if not factors:
        raise MergeError("nothing to merge: no deltas given")
    shapes = {(b.shape[0], a.shape[-1]) for a, b, _ in factors}
    if len(shapes) != 1:
        raise MergeError(f"deltas to merge must share one shape, got {sorted(shapes)}")
    weights = resolve_weights(weights, len(factors), default=1.0)

    thresholds: list[torch.Tensor | None] = []
    elected: torch.Tensor | None = None
    for (a, b, scaling), w in zip(factors, weights, strict=True):
        delta = delta_of(a, b, scaling)
        thresholds.append(_trim_threshold(delta, density))
        trimmed = _zero_below(delta, thresholds[-1]).mul_(w)
        if elected is None:
            elected = torch.zeros_like(trimmed)
        elected.add_(trimmed)
        del delta, trimmed
    assert elected is not None
    elect_sign(elected)

    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for (a, b, scaling), w, threshold in zip(factors, weights, thresholds, strict=True):
        trimmed = _zero_below(delta_of(a, b, scaling), threshold).mul_(w)
        # Multiplying by the elected sign (±1) in place: > 0 marks the agreeing entries, and a
        # second multiplication restores them exactly (x · ±1 · ±1 = x); the rest are zeroed.
        agrees = trimmed.mul_(elected) > 0
        divisor.add_(agrees, alpha=w)
        trimmed.mul_(elected).masked_fill_(agrees.logical_not_(), 0.0)
        total.add_(trimmed)
        del trimmed, agrees
    del elected
    return _normalized(total, divisor, normalize)


def elect_sign(summed: torch.Tensor) -> torch.Tensor:
    """TIES's sign election, the one rule of every TIES path (here, `dare_ties`, and the cores of
    `knots` and `core_space`): the per-entry weighted sum of the sources becomes its sign, in place,
    +1 where the sum is ≥ 0 (exactly 0 elects +, as peft's majority_sign_method="total" and mergekit's
    "sum" do), else −1."""
    return summed.sign_().masked_fill_(summed.eq(0), 1.0)


def _normalized(total: torch.Tensor, divisor: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES's disjoint mean total / divisor (entries no source agrees on stay 0), or the sum `total`."""
    return total.div_(divisor.masked_fill_(divisor.eq(0), 1.0)) if normalize else total


def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Task arithmetic: Σ w_i Δ_i in float32 (weights default to 1/n, i.e. the mean)."""
    _check_same_shape(deltas)
    weights = resolve_weights(weights, len(deltas), default=1.0 / len(deltas))
    merged = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d, w in zip(deltas, weights, strict=True):
        merged.add_(d.float(), alpha=w)
    return merged


def lowrank_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ΔW (out×in) as B @ A by truncated SVD: B = U_k √S_k (out×rank), A = √S_k V_kᵀ (rank×in).

    Splitting √S between the factors keeps A and B on the same scale. k = min(rank, out, in); when
    rank exceeds the matrix's smaller dimension the extra rows/columns are zero, so every module
    has the same rank. Small matrices use the exact SVD; large ones a randomized SVD with a fixed
    seed, so the result is deterministic.
    """
    if rank < 1:
        raise MergeError(f"rank must be >= 1, got {rank}")
    if delta.dim() != 2:
        raise MergeError(f"lowrank_factor expects a matrix, got shape {list(delta.shape)}")
    delta = delta.float()
    out_features, in_features = delta.shape
    k = min(rank, out_features, in_features)
    small_dim = min(out_features, in_features)
    q = min(k + SVD_OVERSAMPLE, small_dim)
    if small_dim <= EXACT_SVD_MAX_DIM or 2 * q >= small_dim:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        # svd_lowrank draws its random projection from the global RNG: seed a forked RNG so the
        # factors do not depend on (or disturb) whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SVD_SEED)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=SVD_NITER)
        vh = v.T
    root = s[:k].sqrt()
    b = torch.zeros(out_features, rank)
    a = torch.zeros(rank, in_features)
    b[:, :k] = u[:, :k] * root
    a[:k, :] = root[:, None] * vh[:k, :]
    return a, b


def linear_merge_factored(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """`linear_merge` of the LoRA deltas s_i · B_i @ A_i, forming one at a time (same result, bit for bit)."""
    if not factors:
        raise MergeError("nothing to merge: no deltas given")
    weights = resolve_weights(weights, len(factors), default=1.0 / len(factors))
    merged: torch.Tensor | None = None
    for (a, b, scaling), w in zip(factors, weights, strict=True):
        delta = delta_of(a, b, scaling)
        if merged is None:
            merged = torch.zeros_like(delta)
        if merged.shape != delta.shape:
            raise MergeError(
                f"deltas to merge must share one shape, got {list(merged.shape)} and {list(delta.shape)}"
            )
        merged.add_(delta, alpha=w)
        del delta
    assert merged is not None
    return merged


def delta_of(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One source's ΔW = scaling · B @ A in float32."""
    return (b.float() @ a.float()) * scaling


def check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise MergeError(f"density must be in (0, 1], got {density!r}")


def _check_same_shape(deltas: Sequence[torch.Tensor]) -> None:
    if not deltas:
        raise MergeError("nothing to merge: no deltas given")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise MergeError(f"deltas to merge must share one shape, got {sorted(shapes)}")


def resolve_weights(weights: Sequence[float] | None, n: int, default: float) -> list[float]:
    if weights is None:
        return [default] * n
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} sources; give one weight per source")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise MergeError(f"weights must be finite numbers, got {list(weights)}")
    return [float(w) for w in weights]
