"""Typed results of analysis: `Analysis`, what `datm analyze` writes to analysis.json (its keys are a
contract: `datm plan` reads a pilot's analysis.json as measurements), with its rows. The records of
evaluation (`RunScores`, `BootstrapResult`) are `datm.eval.results`.

Each has `from_json` (with errors naming the file and key) and `to_json` (the exact JSON layout).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datm.eval.results import require

# ----------------------------------------------------------------------------------- analysis.json

# How an analysis made its intervals: one run per arm, or several (`datm.analysis.seeds`).
SEGMENTS = "paired bootstrap over test segments (one seed per arm)"
SEEDS = "t interval over training seeds, standard error sqrt(s²/n + segment bootstrap se²), Welch df"


@dataclass(frozen=True)
class DeltaRow:
    """One direction compared between two runs: Δ = b − a in the analysis metric, its interval."""

    delta: float
    low: float
    high: float
    p_value: float
    scores: dict[str, float]  # role -> corpus score: system a's role first, then b's
    metric_deltas: dict[str, float]  # metric -> point Δ ("chrf", "bleu")
    kind: str | None = None  # conflict | synergy | neutral (not given for merge degradation)
    seed_deltas: dict[str, float] | None = None  # seed -> that seed's Δ (runs at several seeds)

    def score(self, role: str) -> float:
        return self.scores[role]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "delta": self.delta,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
        }
        out.update(self.scores)
        out.update({f"{m}_delta": v for m, v in self.metric_deltas.items()})
        if self.kind is not None:
            out["kind"] = self.kind
        if self.seed_deltas is not None:
            out["seed_deltas"] = self.seed_deltas
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> DeltaRow:
        data = require(data, where, ("delta", "low", "high", "p_value"))
        fixed = {"delta", "low", "high", "p_value", "kind", "seed_deltas"}
        deltas = {k[: -len("_delta")]: v for k, v in data.items() if k.endswith("_delta") and k not in fixed}
        scores = {k: v for k, v in data.items() if k not in fixed and not k.endswith("_delta")}
        return cls(
            data["delta"],
            data["low"],
            data["high"],
            data["p_value"],
            scores,
            deltas,
            data.get("kind"),
            data.get("seed_deltas"),
        )


@dataclass(frozen=True)
class FamilyDelta:
    """Mean Δ over a family's directions, with a bootstrap interval of that mean."""

    delta: float
    low: float
    high: float
    kind: str | None  # not given for merge degradation
    n_directions: int
    resampling: str  # joint (one index draw shared by the directions) | independent
    seed_deltas: dict[str, float] | None = None  # seed -> that seed's family mean Δ

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("kind", "seed_deltas"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> FamilyDelta:
        data = require(data, where, ("delta", "low", "high", "n_directions", "resampling"))
        return cls(
            data["delta"],
            data["low"],
            data["high"],
            data.get("kind"),
            data["n_directions"],
            data["resampling"],
            data.get("seed_deltas"),
        )


def _comparison_from_json(data: Any, where: str) -> tuple[dict[str, DeltaRow], dict[str, FamilyDelta]]:
    data = require(data, where, ("directions", "families"))
    rows = {d: DeltaRow.from_json(r, f"{where}: directions.{d}") for d, r in data["directions"].items()}
    fams = {f: FamilyDelta.from_json(r, f"{where}: families.{f}") for f, r in data["families"].items()}
    return rows, fams


@dataclass(frozen=True)
class MergeDegradation:
    """merged − unmerged, over the directions the merged run serves from a merge."""

    directions: dict[str, DeltaRow]
    families: dict[str, FamilyDelta]

    def to_json(self) -> dict[str, Any]:
        return {
            "directions": {d: r.to_json() for d, r in self.directions.items()},
            "families": {f: r.to_json() for f, r in self.families.items()},
        }


@dataclass(frozen=True)
class RunRef:
    path: str
    strategy: str | None


@dataclass(frozen=True)
class Analysis:
    """What `datm analyze` produces: joint − separate, and optionally merged − unmerged (`merge`)."""

    metric: str
    n_samples: int
    seed: int
    runs: dict[str, RunRef]  # role -> run
    directions: dict[str, DeltaRow]  # joint − separate
    families: dict[str, FamilyDelta]
    merge: MergeDegradation | None = None
    pilot: dict[str, Any] | None = None  # the settings of an `auto` pilot that made this analysis
    seeds: list[str] | None = None  # the training seeds of the runs compared (one run per arm: None)
    interval: str = SEGMENTS  # how the intervals were made (SEGMENTS or SEEDS)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "runs": {role: asdict(run) for role, run in self.runs.items()},
            "directions": {d: r.to_json() for d, r in self.directions.items()},
            "families": {f: r.to_json() for f, r in self.families.items()},
        }
        if self.merge is not None:
            out["merge"] = self.merge.to_json()
        if self.pilot is not None:
            out["pilot"] = self.pilot
        if self.seeds is not None:  # one run per arm: the layout of before seeds
            out["seeds"] = self.seeds
            out["interval"] = self.interval
        return out

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "analysis.json") -> Analysis:
        where = str(path)
        data = require(data, where, ("metric", "n_samples", "seed", "runs", "directions", "families"))
        rows, fams = _comparison_from_json(data, where)
        merge = (
            MergeDegradation(*_comparison_from_json(data["merge"], f"{where}: merge"))
            if "merge" in data
            else None
        )
        runs = {
            role: RunRef(**require(r, f"{where}: runs.{role}", ("path", "strategy")))
            for role, r in data["runs"].items()
        }
        return cls(
            data["metric"],
            data["n_samples"],
            data["seed"],
            runs,
            rows,
            fams,
            merge,
            data.get("pilot"),
            data.get("seeds"),
            data.get("interval", SEGMENTS),
        )
