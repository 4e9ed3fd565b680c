"""`merge.candidates`: what `merge: {method: auto}` chooses among (a list, or a grid), read and checked
when the config loads; `datm.merge.select` merges, translates and scores them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from datm.config.names import MERGE_AUTO as AUTO
from datm.config.names import MERGE_METHODS, NORMALIZING_METHODS
from datm.config.schema import Config, ConfigError, MergeConfig

SELECT_ON = ("valid",)
CANDIDATE_KEYS = ("method", "density", "rank", "scale")
GRID_KEYS = ("methods", "densities", "ranks", "scales")
# merge auto's candidates when the config lists none: at the adapters' rank (one adapter's size per
# group, DATM's parameter budget), the methods that did best in benchmarks/results/merge_methods.md
# (iso_c_core — measured as iso_c before issue 24 —, core_space, knots: +1.25, +0.42, +0.37 mean
# chrF++ vs the unmerged adapters at rank 16, one seed; ties -0.78), and ties, the paper's.
DEFAULT_METHODS = ("iso_c_core", "core_space", "knots", "ties")
EXAMPLE = "e.g. [{method: ties, density: 0.2, rank: 16}] or {methods: [ties, linear], ranks: [16, 64]}"


@dataclass(frozen=True)
class Candidate:
    method: str
    density: float
    rank: int | None  # None: the sources' rank (merge_adapters' default)
    scale: float = 1.0  # the global scale λ

    @property
    def name(self) -> str:
        name = f"{self.method}-d{self.density:g}-r{self.rank if self.rank is not None else 'src'}"
        return name if self.scale == 1 else f"{name}-s{self.scale:g}"


def registered_methods() -> list[str]:
    """The merge methods `merge_adapters` knows: the names its registry is held to."""
    return list(MERGE_METHODS)


def normalizing_methods() -> list[str]:
    """The methods that can average or sum the agreeing entries (merge.normalize)."""
    return list(NORMALIZING_METHODS)


# --- config ------------------------------------------------------------------------------------------


def candidates(m: MergeConfig, where: str = "merge", adapter_rank: int | None = None) -> list[Candidate]:
    """The candidates of `merge.candidates` (a list of {method, density, rank, scale}, or a grid of
    {methods, densities, ranks, scales}); an unset density, rank or scale is merge.density /
    merge.rank / merge.scale. Duplicates
    are dropped (the first one stays). Unset: DEFAULT_METHODS at merge.rank, else `adapter_rank`."""
    raw = m.candidates
    if raw is None:
        rank = m.rank if m.rank is not None else adapter_rank
        raw = {"methods": list(DEFAULT_METHODS), "ranks": [rank] if rank is not None else None}
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(GRID_KEYS))
        if unknown or "methods" not in raw:
            raise ConfigError(f"{where}.candidates: a grid needs 'methods' and may have {list(GRID_KEYS)}")
        grid = {k: raw.get(k) for k in GRID_KEYS}
        for k, v in grid.items():
            if v is not None and (not isinstance(v, list) or not v):
                raise ConfigError(f"{where}.candidates.{k}: expected a non-empty list, got {v!r}")
        rows = [
            {"method": a, "density": b, "rank": c, "scale": d}
            for a, b, c, d in itertools.product(
                grid["methods"],
                grid["densities"] or [m.density],
                grid["ranks"] or [m.rank],
                grid["scales"] or [m.scale],
            )
        ]
    elif isinstance(raw, list) and raw:
        rows = raw
    else:
        raise ConfigError(f"{where}.candidates: method auto needs a non-empty list of candidates, {EXAMPLE}")
    out: list[Candidate] = []
    for i, row in enumerate(rows):
        at = f"{where}.candidates[{i}]"
        if not isinstance(row, dict) or "method" not in row or set(row) - set(CANDIDATE_KEYS):
            raise ConfigError(
                f"{at}: expected a mapping with 'method' and optional 'density', 'rank', 'scale'; got {row!r}"
            )
        cand = Candidate(
            row["method"], row.get("density", m.density), row.get("rank", m.rank), row.get("scale", m.scale)
        )
        _check_candidate(cand, at)
        if cand not in out:
            out.append(cand)
    return out


def config_candidates(cfg: Config) -> list[Candidate]:
    """A run's candidates: `candidates` of its merge config, unset ranks defaulting to the adapters'."""
    return candidates(cfg.merge, f"{cfg.source}: merge", cfg.lora.r)


def _check_candidate(c: Candidate, at: str) -> None:
    methods = registered_methods()
    if c.method not in methods:
        raise ConfigError(f"{at}.method: unknown merge method {c.method!r}; registered: {', '.join(methods)}")
    d = c.density
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise ConfigError(f"{at}.density: expected a number in (0, 1], got {d!r}")
    if c.rank is not None and (isinstance(c.rank, bool) or not isinstance(c.rank, int) or c.rank < 1):
        raise ConfigError(f"{at}.rank: expected an integer >= 1 (or null: the sources' rank), got {c.rank!r}")
    x = c.scale
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < float("inf"):
        raise ConfigError(f"{at}.scale: expected a finite number > 0 (the global λ), got {x!r}")


def validate(cfg: Config) -> None:
    """The merge method (a registered one, or auto) and auto's keys."""
    s, m = cfg.source, cfg.merge
    methods = registered_methods()
    if m.method != AUTO and m.method not in methods:
        raise ConfigError(
            f"{s}: merge.method: unknown merge method {m.method!r}; "
            f"expected auto or one of {', '.join(methods)}"
        )
    if m.normalize is not None and m.method != AUTO and m.method not in normalizing_methods():
        raise ConfigError(
            f"{s}: merge.normalize applies to {', '.join(normalizing_methods())} only, "
            f"not to merge.method {m.method!r}"
        )
    if m.method != AUTO:
        if m.candidates is not None:
            raise ConfigError(f"{s}: merge.candidates is for merge.method: auto (got method {m.method!r})")
        return
    config_candidates(cfg)
    if m.select_on not in SELECT_ON:
        raise ConfigError(f"{s}: merge.select_on must be one of {list(SELECT_ON)}, got {m.select_on!r}")
    n = m.dev_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{s}: merge.dev_size must be an integer >= 1, got {n!r}")
    # that data.valid holds no test pairs is checked before the run trains (preflight.check_merge_dev)
